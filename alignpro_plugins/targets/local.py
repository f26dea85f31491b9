"""A local transformers model as the frozen target."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alignpro_plugins.batching import plan_batches
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
        from alignpro_plugins.prompter import _select_device, _select_dtype, load_causal_lm

        self._weights: str | None = None
        if isinstance(model, str):
            dev = _select_device(device)
            self.model, self.tokenizer, path = load_causal_lm(
                model, device=dev, dtype=_select_dtype(dtype, dev)
            )
            self._name = name or model
            # Cached answers are keyed by identity: a folder whose weights change in place is another target.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # a hub id: no folder to hash
                self._weights = weights_hash(path).removeprefix("sha256:")[:12]
        else:
            if tokenizer is None:
                raise TypeError("TransformersTarget(model=<PreTrainedModel>) also needs tokenizer=...")
            self.model, self.tokenizer = model, tokenizer
            self._name = name or str(getattr(model.config, "_name_or_path", None) or type(model).__name__)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self._lock = threading.Lock()

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
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"User: {prompt}\nAssistant:"

    def _generate(self, prompts: list[str]) -> list[str]:
        return [answer for answer, _ in self._generate_ended(prompts)]

    def generate_ended(self, prompts: Sequence[str]) -> list[tuple[str, bool]]:
        """(answer, ended): ``ended`` is False where generation stopped at ``max_new_tokens``, not at EOS.

        Training on an answer that was cut off must not teach the model to stop there (see kl-optimum
        distillation), so trainers that fit the model to its own answers need to know which ones were cut.
        """
        return self._counted(self._generate_ended, prompts)

    def _stop_ids(self) -> set[int]:
        """The token ids ``generate`` stops on (its generation config's EOS ids)."""
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        return set(ids if isinstance(ids, list) else [ids] if ids is not None else [])

    def _generate_ended(self, prompts: list[str]) -> list[tuple[str, bool]]:
        import torch

        texts = [self.format(p) for p in prompts]
        if not texts:
            return []
        eos = self._stop_ids()
        # Calls grouped by prompt length so that few rows are padded far (see plan_batches); order restored.
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        answers: list[tuple[str, bool]] = [("", True)] * len(texts)
        sample = self.temperature > 0
        for idx in plan_batches(lengths, new_tokens=self.max_new_tokens, max_rows=self.batch_size):
            try:
                enc = self.tokenizer(
                    [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                )
                enc = {k: v.to(self.model.device) for k, v in enc.items()}
                with self._lock, torch.inference_mode():
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=sample,
                        temperature=self.temperature if sample else None,
                        top_p=None,
                        top_k=None,
                        pad_token_id=self.tokenizer.pad_token_id,
                        use_cache=True,
                    )
                new = out[:, enc["input_ids"].shape[1] :]
                for i, ids in zip(idx, new, strict=True):
                    ended = any(int(t) in eos for t in ids)  # a cut answer holds no EOS (nor EOS padding)
                    answers[i] = (self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ended)
            except Exception as exc:  # e.g. out of memory: count it, keep going
                for i in idx:  # not an answer that ended: nothing here for a trainer to learn to stop on
                    answers[i] = (self._failed(exc, prompts[i]), False)
        return answers
