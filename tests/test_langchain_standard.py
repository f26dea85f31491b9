"""langchain-tests standard suites for AlignedChatModel and ChatLocalTransformers.

Unit suites run on fakes and the tiny model; integration suites run the packaged SmolLM2 for real (short
answers keep them fast). Features the models lack are declared through the suites' own properties.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from alignpro_plugins.langchain import PROMPTER_ENV, AlignedChatModel, ChatLocalTransformers
from tests.test_langchain_adapter import EchoChatModel, StubPrompter

# Suite properties cannot take fixtures; the module fixture below fills these in first.
_MODELS: dict[str, Any] = {}
SMOLLM2 = "smollm2-135m-instruct"
MAX_TOKENS = 12  # real answers, kept short so the integration suites stay fast on CPU


@pytest.fixture(scope="module", autouse=True)
def _models(tiny_lm_dir, tmp_path_factory):
    stub = StubPrompter.build(tiny_lm_dir)
    _MODELS.update(
        tiny=tiny_lm_dir,
        stub=stub,
        artifact=str(stub.save_pretrained(tmp_path_factory.mktemp("lc-standard") / "prompter")),
    )
    yield
    _MODELS.clear()


class TestAlignedChatModelUnit(ChatModelUnitTests):
    """Wrapping a fake model that supports tools and structured output: both delegate through."""

    @property
    def chat_model_class(self) -> type[AlignedChatModel]:
        return AlignedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"llm": EchoChatModel(), "prompter": _MODELS["stub"]}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        artifact = _MODELS["artifact"]
        return {PROMPTER_ENV: artifact}, {"llm": EchoChatModel()}, {"prompter_path": artifact}


class TestChatLocalTransformersUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatLocalTransformers]:
        return ChatLocalTransformers

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": _MODELS["tiny"]}


@pytest.mark.real_models
class TestAlignedChatModelIntegration(ChatModelIntegrationTests):
    """A real local chat model (SmolLM2) behind the aligned wrapper; every call is rewritten."""

    @property
    def chat_model_class(self) -> type[AlignedChatModel]:
        return AlignedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "llm": ChatLocalTransformers(model=SMOLLM2, max_tokens=MAX_TOKENS),
            "prompter": _MODELS["stub"],
        }

    @property
    def has_tool_calling(self) -> bool:
        return False  # SmolLM2 has no tool calling (AlignedChatModel only delegates it)

    @property
    def has_structured_output(self) -> bool:
        return False


@pytest.mark.real_models
class TestChatLocalTransformersIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatLocalTransformers]:
        return ChatLocalTransformers

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": SMOLLM2, "max_tokens": MAX_TOKENS}
