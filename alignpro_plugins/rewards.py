"""Rewards r(x, y): score an answer y against the ORIGINAL prompt x.

One interface, ``reward(prompts, answers) -> list[float]``, with backends for a reward-model artifact (the
reward stage's output, or any sequence-classification model), and a plain Python callable. A prompt is the
user's x as a string, or the :class:`~alignpro_plugins.targets.TargetRequest` the answer came from: the reward
scores against its ``original``, never the rewrite the target saw.
"""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignpro_plugins.manifest import weights_hash
from alignpro_plugins.models import resolve_model
from alignpro_plugins.targets.base import TargetRequest, as_requests

REWARD_MANIFEST = "alignpro_reward.json"


def prompt_digest(prompt: str) -> str:
    """What a reward model's manifest records of each training prompt (``train_prompt_digests``)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def prompts_trained_on(reward: Any, prompts: Sequence[str]) -> int | None:
    """How many of ``prompts`` a reward-model artifact trained on; None when it records no digests."""
    digests = (getattr(reward, "meta", None) or {}).get("train_prompt_digests")
    if digests is None:
        return None
    seen = set(digests)
    return sum(prompt_digest(x) in seen for x in prompts)


def judge_identity(judge: Any) -> str:
    """What records and caches know a judge by: its ``identity``, or a plain callable's qualified name."""
    identity = getattr(judge, "identity", None)
    return str(identity) if identity else getattr(judge, "__qualname__", type(judge).__qualname__)


class RewardFunction(ABC):
    """Scores answers against the user's prompts. Subclasses implement ``score`` on the original prompts' text;
    one that needs a request's framework context overrides ``score_requests``."""

    @property
    @abstractmethod
    def identity(self) -> str: ...

    @abstractmethod
    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]: ...

    def score_requests(self, requests: Sequence[TargetRequest], answers: Sequence[str]) -> list[float]:
        return self.score([r.original for r in requests], answers)

    def __call__(self, prompts: Sequence[str | TargetRequest], answers: Sequence[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
        return self.score_requests(as_requests(prompts), answers)


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, max_length: int, max_prompt_length: int
):
    """Tokenize (prompt, answer) as one sequence: prompt truncated first to ``max_prompt_length``.

    The reward trainer and the scorer share this, so training and inference see identical inputs.
    """
    enc = tokenizer(
        [_clip(tokenizer, p, max_prompt_length) for p in prompts],
        list(answers),
        truncation="only_second",
        max_length=max_length,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


def _clip(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


class RewardModel(RewardFunction):
    """A sequence-classification model with one output (a reward-stage artifact, or any hub/local model)."""

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        resolved = resolve_model(path)
        meta = {}
        meta_file = Path(resolved) / REWARD_MANIFEST
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
        self.meta = meta
        self.path = resolved
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1).to(device).eval()
        )
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length or meta.get("max_length", 256)
        self.max_prompt_length = max_prompt_length or meta.get("max_prompt_length", 96)
        self._lock = threading.Lock()
        # The weights, not only the path: a reward model retrained in place is another judge.
        try:
            self._weights: str | None = weights_hash(resolved).removeprefix("sha256:")[:12]
        except (FileNotFoundError, NotADirectoryError):  # a hub id: transformers keeps it elsewhere
            self._weights = None

    @property
    def identity(self) -> str:
        return f"reward-model:{self.path}" + (f"@{self._weights}" if self._weights else "")

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        import torch  # here, not at the top: the gate and the adapters import this module without torch

        if not prompts and not answers:
            return []  # the tokenizer cannot encode an empty batch
        ids = encode_pairs(
            self.tokenizer,
            prompts,
            answers,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
        )
        scores = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id or 0
        # Batches of similar length pad little; scores go back in input order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            members = order[start : start + self.batch_size]
            chunk = [ids[i] for i in members]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=self.device)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            for i, value in zip(members, logits[:, 0].float().tolist(), strict=True):
                scores[i] = value
        return scores


class CallableReward(RewardFunction):
    """Wrap ``fn(prompts, answers) -> scores`` (batched) or ``fn(prompt, answer) -> score``."""

    def __init__(self, fn: Callable[..., Any], *, batched: bool = True, name: str | None = None) -> None:
        self.fn = fn
        self.batched = batched
        self._name = name or getattr(fn, "__qualname__", repr(fn))

    @property
    def identity(self) -> str:
        return f"callable:{self._name}"

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        if self.batched:
            out = [float(s) for s in self.fn(list(prompts), list(answers))]
        else:
            out = [float(self.fn(p, a)) for p, a in zip(prompts, answers, strict=True)]
        if len(out) != len(prompts):
            raise ValueError(f"reward function returned {len(out)} scores for {len(prompts)} answers")
        return out


def as_reward(obj: Any, **kwargs: Any) -> RewardFunction:
    """Coerce a reward artifact path / model name / callable into a :class:`RewardFunction`."""
    if isinstance(obj, RewardFunction):
        return obj
    if isinstance(obj, (str, Path)):
        return RewardModel(str(obj), **kwargs)
    if callable(obj):
        return CallableReward(obj, **kwargs)
    raise TypeError(
        f"A reward must be a reward-model path or name, a RewardFunction or a callable; got {type(obj).__name__}"
    )
