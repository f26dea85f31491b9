import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# alignpro_plugins.dspy leaves DSPY_CACHEDIR to its user; the tests keep DSPy's cache out of the home folder.
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="alignpro-tests-dspy-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from alignpro_plugins.testing import build_tiny_causal_lm, build_tiny_encoder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """A tiny random Llama with a byte-level tokenizer and a chat template, saved as a local folder."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    """A tiny random BERT sequence classifier (num_labels=1) with a word-level tokenizer."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from alignpro_plugins.models import resolve_model

    return resolve_model("smollm2-135m-instruct")
