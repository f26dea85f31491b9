"""Rewards r(x, y): score an answer y against the ORIGINAL prompt x.

One interface, ``reward(prompts, answers) -> list[float]``, with backends for a reward-model artifact (the
reward stage's output, or any sequence-classification model), an ensemble of reward functions
(:mod:`alignpro_plugins.reward_ensemble`), and a plain Python callable. A prompt is the user's x as a string, or the :class:`~alignpro_plugins.targets.TargetRequest`
the answer came from: the reward scores against its ``original``, never the rewrite the target saw.

:func:`load_reward` (and :func:`as_reward`) open any reward folder: a reward model, or an ensemble folder whose
``alignpro_reward.json`` has ``"kind": "alignpro-reward-ensemble"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignpro_plugins.manifest import weights_hash
from alignpro_plugins.models import resolve_model
from alignpro_plugins.targets.base import TargetRequest, as_requests

REWARD_MANIFEST = "alignpro_reward.json"
ENSEMBLE_KIND = "alignpro-reward-ensemble"
LENGTH_CONTROLS = ("none", "penalty")  # a manifest may also leave length_control out (none)


def prompt_digest(prompt: str) -> str:
    """What a reward model's manifest records of each training prompt (``train_prompt_digests``)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def prompts_trained_on(reward: Any, prompts: Sequence[str]) -> int | None:
    """How many of ``prompts`` a reward-model artifact trained on; None when it records no digests.

    An ensemble has seen a prompt when any of its members trained on it; None when a member records no digests.
    """
    digests = _trained_digests(reward)
    if digests is None:
        return None
    return sum(prompt_digest(x) in digests for x in prompts)


def _trained_digests(reward: Any) -> set[str] | None:
    members = getattr(reward, "members", None)
    if isinstance(members, Sequence) and not isinstance(members, str):
        known = [d for d in (_trained_digests(m) for m in members) if d is not None]
        return set().union(*known) if len(known) == len(members) else None  # a member unknown: all unknown
    digests = (getattr(reward, "meta", None) or {}).get("train_prompt_digests")
    return None if digests is None else set(digests)


def judge_identity(judge: Any) -> str:
    """What records and caches know a judge by: its ``identity``, or a plain callable's qualified name."""
    identity = getattr(judge, "identity", None)
    return str(identity) if identity else getattr(judge, "__qualname__", type(judge).__qualname__)


def read_reward_manifest(folder: str | Path) -> dict[str, Any]:
    """A reward folder's ``alignpro_reward.json`` ({} when it has none: a hub id or a bare model folder)."""
    path = Path(folder) / REWARD_MANIFEST
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


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
        return self.score_requests(_checked_requests(prompts, answers), answers)


def _checked_requests(prompts: Sequence[str | TargetRequest], answers: Sequence[str]) -> list[TargetRequest]:
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    return as_requests(prompts)


# ---------------------------------------------------------------------------------------------- encoding
def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, max_length: int, max_prompt_length: int
) -> list[list[int]]:
    """Tokenize (prompt, answer) as one sequence: prompt truncated first to ``max_prompt_length``.

    The reward trainer and the scorer share this, so training and inference see identical inputs. An encoder
    tokenizer (a ``sep_token`` and no chat template, e.g. MiniLM) encodes the text pair ``[CLS] x [SEP] y [SEP]``;
    a decoder tokenizer (a chat template, or no ``sep_token``) the chat ``user: x, assistant: y`` as TRL's
    RewardTrainer does for conversational data, the answer cut to fit ``max_length`` before the template's
    closing tokens.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return []
    clipped = [_clip(tokenizer, p, max_prompt_length) for p in prompts]
    if _is_pair_encoder(tokenizer):
        enc = tokenizer(
            clipped,
            list(answers),
            truncation="only_second",
            max_length=max_length,
            return_token_type_ids=False,
        )
        return enc["input_ids"]
    return _encode_chats(tokenizer, clipped, answers, max_length=max_length)


def _is_pair_encoder(tokenizer: Any) -> bool:
    return getattr(tokenizer, "sep_token", None) is not None and not getattr(tokenizer, "chat_template", None)


def _clip(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def _chat(prompt: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": prompt}]
    return turns if answer is None else [*turns, {"role": "assistant", "content": answer}]


def _render(
    tokenizer: Any, chats: Sequence[list[dict[str, str]]], *, generation_prompt: bool
) -> list[list[int]]:
    # As TRL's apply_chat_template(tokenize=True): render the text, then tokenize it without adding specials.
    texts = [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        for chat in chats
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _encode_chats(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, max_length: int
) -> list[list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no sep_token (not a text-pair encoder) and no chat_template: set "
            "tokenizer.chat_template (a base decoder has none) and save the tokenizer with the model"
        )
    full = _render(
        tokenizer, [_chat(x, y) for x, y in zip(prompts, answers, strict=True)], generation_prompt=False
    )
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if not too_long:
        return full
    # What the template puts after an answer (e.g. "<|im_end|>\n"): kept when the answer is cut, so every
    # sequence ends as the model saw it in training.
    (opened,) = _render(tokenizer, [_chat("x")], generation_prompt=True)
    (closed,) = _render(tokenizer, [_chat("x", "")], generation_prompt=False)
    closing = closed[_common_prefix(opened, closed) :]
    heads = _render(tokenizer, [_chat(prompts[i]) for i in too_long], generation_prompt=True)
    for i, head in zip(too_long, heads, strict=True):
        ids = full[i]
        # A template that renders the answer's end differently in context: cut the tail as it is.
        ending = closing if closing and ids[len(ids) - len(closing) :] == closing else []
        keep = max_length - len(ending)
        if keep < len(head):
            raise ValueError(
                f"max_length={max_length} leaves no room for the answer after the prompt ({len(head)} tokens as "
                f"the chat template renders it, clipped to max_prompt_length) and the template's "
                f"{len(ending)} closing tokens: raise max_length or lower max_prompt_length"
            )
        full[i] = ids[:keep] + ending
    return full


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- reward model
class RewardModel(RewardFunction):
    """A sequence-classification model with one output (a reward-stage artifact, or any hub/local model).

    A manifest with ``"length_control": "penalty"`` and ``"length_penalty_per_token": beta`` scores
    ``raw - beta * n`` (n: the answer's tokens under this tokenizer, untruncated); ``length_control=False``
    returns the raw scores.
    """

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        length_control: bool = True,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        resolved = resolve_model(path)
        meta = read_reward_manifest(resolved)
        if meta.get("kind") == ENSEMBLE_KIND:
            raise ValueError(
                f"{resolved} is a reward ensemble ({REWARD_MANIFEST} kind {ENSEMBLE_KIND!r}), not one reward "
                "model: open it with load_reward() or as_reward()"
            )
        self.meta = meta
        self.path = resolved
        self.length_penalty = _length_penalty(meta, resolved) if length_control else None
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1).to(device).eval()
        )
        # A decoder pools its last non-pad token (config.pad_token_id): give it one, as TRL's RewardTrainer does.
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = self.model.config.get_text_config()
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        self._pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length or meta.get("max_length", 256)
        self.max_prompt_length = max_prompt_length or meta.get("max_prompt_length", 96)
        # One lock for the model and the tokenizer: a fast tokenizer's truncation settings are shared state.
        self._lock = threading.Lock()
        # The weights, not only the path: a reward model retrained in place is another judge.
        try:
            self._weights: str | None = weights_hash(resolved).removeprefix("sha256:")[:12]
        except (FileNotFoundError, NotADirectoryError):  # a hub id: transformers keeps it elsewhere
            self._weights = None

    @property
    def identity(self) -> str:
        identity = f"reward-model:{self.path}" + (f"@{self._weights}" if self._weights else "")
        return (
            identity if self.length_penalty is None else f"{identity}+length-penalty={self.length_penalty!r}"
        )

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        import torch  # here, not at the top: the gate and the adapters import this module without torch

        if len(prompts) != len(answers):
            raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            return []  # the tokenizer cannot encode an empty batch
        with self._lock:
            ids = encode_pairs(
                self.tokenizer,
                prompts,
                answers,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
            )
            lengths = (
                [len(x) for x in self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
                if self.length_penalty is not None
                else None
            )
        scores = [0.0] * len(ids)
        pad = self._pad_id
        # Batches of similar length pad little; scores go back in input order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            members = order[start : start + self.batch_size]
            chunk = [ids[i] for i in members]
            width = max(len(x) for x in chunk)
            # Right padding: a decoder pools the last token before the padding.
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=self.device)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            for i, value in zip(members, logits[:, 0].float().tolist(), strict=True):
                scores[i] = value
        if lengths is not None:
            beta = float(self.length_penalty)  # type: ignore[arg-type]
            scores = [s - beta * n for s, n in zip(scores, lengths, strict=True)]
        return scores


def _length_penalty(meta: dict[str, Any], folder: str) -> float | None:
    """beta of a ``"length_control": "penalty"`` manifest; None when the reward has no length control."""
    control = meta.get("length_control")
    if control is None or control == "none":
        return None
    if control not in LENGTH_CONTROLS:
        raise ValueError(
            f"{folder}/{REWARD_MANIFEST}: length_control={control!r} is unknown; accepted: "
            f"{', '.join(map(repr, LENGTH_CONTROLS))} (or leave it out)"
        )
    beta = meta.get("length_penalty_per_token")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(
            f"{folder}/{REWARD_MANIFEST}: length_control 'penalty' needs length_penalty_per_token, a finite "
            f"number (reward points per answer token), got {beta!r}"
        )
    return float(beta)


# ---------------------------------------------------------------------------------------------- callables
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


def load_reward(path_or_name: str | Path, **kwargs: Any) -> RewardFunction:
    """Open a reward folder or model name: an ensemble folder as a
    :class:`~alignpro_plugins.reward_ensemble.RewardEnsemble` (``kwargs`` go to each member), anything else (a
    reward-model folder, a hub id, a packaged name) as a :class:`RewardModel`."""
    if read_reward_manifest(path_or_name).get("kind") == ENSEMBLE_KIND:
        from alignpro_plugins.reward_ensemble import RewardEnsemble  # it builds on this module

        return RewardEnsemble.from_pretrained(path_or_name, **kwargs)
    return RewardModel(str(path_or_name), **kwargs)


def as_reward(obj: Any, **kwargs: Any) -> RewardFunction:
    """Coerce a reward folder / model name (:func:`load_reward`) or a callable into a :class:`RewardFunction`."""
    if isinstance(obj, RewardFunction):
        return obj
    if isinstance(obj, (str, Path)):
        return load_reward(obj, **kwargs)
    if callable(obj):
        return CallableReward(obj, **kwargs)
    raise TypeError(
        f"A reward must be a reward-model path or name, a RewardFunction or a callable; got {type(obj).__name__}"
    )
