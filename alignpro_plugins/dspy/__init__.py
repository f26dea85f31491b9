"""DSPy integration: rewrite a program's inputs with a prompter, and train that prompter as a DSPy optimizer.

* :class:`AlignProModule` wraps any DSPy program and rewrites chosen input fields before it runs.
* :class:`AlignProOptimizer` is a ``Teleprompter`` whose ``compile`` trains a prompter with the Align-Pro RL
  stage, using the student program as the frozen target and the DSPy metric as the reward.
* :func:`LocalTransformersLM` is a ``dspy.LM`` over a local transformers model (a custom lm15 engine), and
  :class:`SimpleFieldAdapter` lets small models that cannot follow DSPy's field markers answer plainly.

Install with ``pip install 'alignpro-plugins[dspy]'``.
"""

from __future__ import annotations

import os

from alignpro_plugins.models import CACHE_ENV

# Both must be set before dspy (and litellm) are imported: litellm fetches a cost map from the network at
# import unless told to use its local copy, and DSPy would otherwise create its cache under the home folder.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault(
    "DSPY_CACHEDIR",
    os.path.join(
        os.environ.get(CACHE_ENV)
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alignpro"),
        "dspy",
    ),
)

try:
    import dspy  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "alignpro_plugins.dspy needs DSPy, which is not installed. Install it with: "
        "pip install 'alignpro-plugins[dspy]'"
    ) from exc

from alignpro_plugins.dspy.lm import (  # noqa: E402
    LocalTransformersLM,
    SimpleFieldAdapter,
    TransformersEngine,
)
from alignpro_plugins.dspy.module import (  # noqa: E402
    AlignProModule,
    PrompterMismatchError,
    RewriteRecord,
    default_answer_field,
    default_fields,
    get_gate,
    get_rewrites,
    manifest_sha256,
)
from alignpro_plugins.dspy.optimizer import AlignProOptimizer, metric_score  # noqa: E402

__all__ = [
    "AlignProModule",
    "AlignProOptimizer",
    "LocalTransformersLM",
    "PrompterMismatchError",
    "RewriteRecord",
    "SimpleFieldAdapter",
    "TransformersEngine",
    "default_answer_field",
    "default_fields",
    "get_gate",
    "get_rewrites",
    "manifest_sha256",
    "metric_score",
]
