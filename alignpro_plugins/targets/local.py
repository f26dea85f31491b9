"""A local transformers model as the frozen target."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alignpro_plugins.engine import GenerationEngine, GenerationSettings
from alignpro_plugins.manifest import weights_hash
from alignpro_plugins.targets.base import FrozenTarget

if TYPE_CHECKING:
    import torch


class TransformersTarget(FrozenTarget):
    """A local causal LM answering through its chat template; batched, greedy by default.

    ``dtype="auto"`` loads bf16 on a CUDA GPU that supports it and fp32 elsewhere. ``"bfloat16"`` on a CPU with
    native bf16 (AMX, recent Xeons) answers faster, but the answers are another model's: compare before you
    switch (benchmarks/bench_target_backends.py). The dtype is part of the answer cache's key.
    """

    def __init__(
        self,
        model: str | Any = "smollm2-135m-instruct",
        tokenizer: Any | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 16,
        system_prompt: str | None = None,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        name: str | None = None,
    ) -> None:
        super().__init__()
        self._weights: str | None = None
        if isinstance(model, str):
            self.engine, path = GenerationEngine.load(
                model, device=device, dtype=dtype, name="alignpro-target"
            )
            self._name = name or model
            # Cached answers are keyed by identity: a folder whose weights change in place is another target.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # a hub id: no folder to hash
                self._weights = weights_hash(path).removeprefix("sha256:")[:12]
        else:
            if tokenizer is None:
                raise TypeError("TransformersTarget(model=<PreTrainedModel>) also needs tokenizer=...")
            self.engine = GenerationEngine(model, tokenizer, name="alignpro-target")
            self._name = name or str(getattr(model.config, "_name_or_path", None) or type(model).__name__)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.system_prompt = system_prompt

    @property
    def model(self) -> Any:
        return self.engine.model

    @model.setter
    def model(self, model: Any) -> None:  # e.g. an oracle: the target's model with an adapter on top
        self.engine.model = model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def identity(self) -> str:
        return f"transformers:{self._name}" + (f"@{self._weights}" if self._weights else "")

    @property
    def settings(self) -> dict[str, Any]:
        # Another dtype gives other answers, so it is part of the cache key; fp32 (the CPU default) leaves the key
        # as it always was, so existing caches stay valid.
        dtype = str(getattr(self.model, "dtype", "torch.float32")).removeprefix("torch.")
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "system": self.system_prompt,
        } | ({} if dtype == "float32" else {"dtype": dtype})

    def format(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.engine.format_chat(messages)

    def _generate(self, prompts: list[str]) -> list[str]:
        return [answer for answer, _ in self._generate_ended(prompts)]

    def generate_ended(self, prompts: Sequence[str]) -> list[tuple[str, bool]]:
        """(answer, ended): ``ended`` is False where generation stopped at ``max_new_tokens``, not at EOS.

        Training on an answer that was cut off must not teach the model to stop there (see kl-optimum
        distillation), so trainers that fit the model to its own answers need to know which ones were cut.
        """
        return self._counted(self._generate_ended, prompts)

    def _generate_ended(self, prompts: list[str]) -> list[tuple[str, bool]]:
        # Sampling with temperature alone: top-k and top-p off (0 and 1.0), whatever the model's defaults say.
        settings = GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature,
            top_p=1.0,
            top_k=0,
        )
        rows = self.engine.generate(
            [self.format(p) for p in prompts], settings, max_rows=self.batch_size, return_exceptions=True
        )
        answers: list[tuple[str, bool]] = []
        for prompt, row in zip(prompts, rows, strict=True):
            if isinstance(row, Exception):  # e.g. out of memory: count it, keep going; nothing here ended
                answers.append((self._failed(row, prompt), False))
            else:
                answers.append((row[0].text.strip(), row[0].ended))
        return answers
