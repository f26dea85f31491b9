"""DSPy integration: rewrite a program's inputs with a prompter, and train that prompter as a DSPy optimizer.

* :class:`AlignProModule` wraps any DSPy program and rewrites chosen input fields before it runs.
* :class:`AlignProOptimizer` is a ``Teleprompter`` whose ``compile`` trains a prompter with the Align-Pro RL
  stage, using the student program as the frozen target and the DSPy metric as the reward.
* :func:`LocalTransformersLM` is a ``dspy.LM`` over a local transformers model (a custom lm15 engine), and
  :class:`SimpleFieldAdapter` lets small models that cannot follow DSPy's field markers answer plainly.

Install with ``pip install 'alignpro-plugins[dspy]'``. Importing this package changes no environment variable:
set ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (no cost-map download when LiteLLM is imported) and ``DSPY_CACHEDIR``
yourself, before DSPy is imported, if you want them.
"""

from __future__ import annotations

from alignpro_plugins.extras import require

require("dspy", "alignpro_plugins.dspy")

from alignpro_plugins.dspy.lm import (
    LocalTransformersLM,
    SimpleFieldAdapter,
    TransformersEngine,
)
from alignpro_plugins.dspy.module import (
    AlignProModule,
    PrompterMismatchError,
    RewriteRecord,
    default_answer_field,
    default_fields,
    get_gate,
    get_rewrites,
    manifest_sha256,
)
from alignpro_plugins.dspy.optimizer import AlignProOptimizer, metric_score

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
