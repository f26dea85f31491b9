"""Evaluation configurations: how a prompt x becomes the frozen target's input(s).

:class:`~alignpro_plugins.evaluation.Evaluator` answers and scores each configuration on the same prompts. One
input per prompt: :class:`FrozenAlone`, :class:`FixedTemplate`, :class:`WithPrompter`, :class:`Oracle` (its own
target). Several, of which the selection judge keeps the best: :class:`BestOfK` (sampled rewrites),
:class:`BestOfN` (sampled answers to x), :class:`WithRetryGate` (the run-time gate and rerank) and
:class:`RefineAndKeepBetter` (a refinement prompter reading the first answer).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from alignpro_plugins.guidance import DEFAULT_TEMPLATE
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.targets import CachedTarget, FrozenTarget, TargetRequest
from alignpro_plugins.targets.sampled import SampledTarget, check_temperature


@dataclass
class TargetInput:
    text: str
    generated: str | None = None
    fallback_reason: str | None = None
    draw: int | None = None  # best-of-n: which sampled answer to x this input asks for (None: not sampled)

    def request(self) -> str | TargetRequest:
        """What the target is asked: the text, or for a sampled draw a request whose draw number is its own."""
        return self.text if self.draw is None else TargetRequest(self.text, context={"draw": self.draw})


class Configuration:
    """How x becomes the target's input; ``target`` overrides the shared frozen target (RLHF oracle)."""

    name: str
    description: str = ""
    target: FrozenTarget | None = None
    k: int = 1
    fingerprint_name: ClassVar[str | None] = None  # the class name in the fingerprint, if not this class's

    def inputs(self, prompts: Sequence[str]) -> list[list[TargetInput]]:
        """Per prompt, one input (or k candidates for best-of-k)."""
        raise NotImplementedError

    def answering(self, shared: FrozenTarget) -> FrozenTarget:
        """The target that answers this configuration's inputs: its own, else the evaluation's shared one."""
        return self.target or shared

    def same_inputs_key(self) -> str | None:
        """Equal for two configurations that give the shared target the same inputs, else None.

        The harness answers and scores such configurations once and gives the later one the earlier one's
        records, e.g. an RL stage that kept its SFT round evaluated beside that SFT prompter.
        """
        return None

    def remember(self, rows: Sequence[dict]) -> None:
        """Take note of this configuration's records (however they were obtained); nothing by default."""

    def record_extra(self, prompt: str) -> dict[str, Any]:
        """Fields this configuration adds to the record of ``prompt`` just answered; none by default."""
        return {}

    def fingerprint(self) -> str:
        """What makes this configuration's records reusable on resume (same name + same setup)."""
        kind = self.fingerprint_name or type(self).__name__
        parts = [kind, self.name, self.description, str(self.k), getattr(self, "template", "")]
        prompter = getattr(self, "prompter", None)
        if prompter is not None:
            # behaviour_id adds the weights, device and dtype: records from another of those are not reused.
            parts += [prompter.manifest.to_json(), str(prompter.behaviour_id)]
        if self.target is not None:
            parts += [self.target.identity, json.dumps(self.target.settings, sort_keys=True, default=str)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class FrozenAlone(Configuration):
    name: str = "frozen"
    description: str = "(i) the frozen model on x"

    def inputs(self, prompts):
        return [[TargetInput(x)] for x in prompts]


@dataclass
class FixedTemplate(Configuration):
    template: str = DEFAULT_TEMPLATE
    name: str = "template"
    description: str = "x with a fixed instruction appended"

    def inputs(self, prompts):
        return [[TargetInput(f"{x.rstrip()}\n\n{self.template}", self.template)] for x in prompts]

    def same_inputs_key(self) -> str | None:
        return None if self.target is not None else f"template:{self.template}"


@dataclass
class WithPrompter(Configuration):
    prompter: Prompter | None = None
    name: str = "align-pro"
    description: str = "(ii) the frozen model on the prompter's rewrite of x"

    def __post_init__(self) -> None:
        # Greedy rewrites of a frozen artifact, kept so a WithRetryGate over this configuration reuses them.
        self._rewrites: dict[tuple[str, str], TargetInput] = {}

    def inputs(self, prompts):
        assert self.prompter is not None
        key = self.same_inputs_key()
        if key is None:
            results = self.prompter.rewrite_results(list(prompts))
            return [[TargetInput(r.text, r.generated, r.fallback_reason)] for r in results]
        todo = list(dict.fromkeys(x for x in prompts if (key, x) not in self._rewrites))
        for x, r in zip(todo, self.prompter.rewrite_results(todo) if todo else [], strict=True):
            self._rewrites[(key, x)] = TargetInput(r.text, r.generated, r.fallback_reason)
        return [[self._rewrites[(key, x)]] for x in prompts]

    def remember(self, rows: Sequence[dict]) -> None:
        # Records answered, copied from a same-inputs twin, or resumed: a WithRetryGate reuses their rewrites.
        key = self.same_inputs_key()
        if key is not None:
            for r in rows:
                self._rewrites[(key, r["prompt"])] = TargetInput(
                    r["input"], r["rewrite"], r["fallback_reason"]
                )

    def same_inputs_key(self) -> str | None:
        assert self.prompter is not None
        ident, sampled = self.prompter.behaviour_id, self.prompter.manifest.generation.do_sample
        return None if ident is None or sampled or self.target is not None else f"prompter:{ident}"


@dataclass
class BestOfK(Configuration):
    prompter: Prompter | None = None
    k: int = 4
    temperature: float = 0.8
    seed: int | None = 0
    name: str = "best-of-k"
    description: str = "K sampled rewrites, the best chosen by the selection judge (RL headroom)"

    def inputs(self, prompts):
        import torch

        assert self.prompter is not None
        prompts = list(prompts)
        # With a seed, each call samples from a seed of its own prompts (chunks do not share one random stream)
        # without touching the caller's RNG state, so a rerun over the same chunks draws the same K rewrites.
        # seed=None samples from the global RNG. All K come from one decode loop per batch, not K loops.
        device = getattr(self.prompter.model, "device", torch.device("cpu"))
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
            if self.seed is not None:
                blob = json.dumps([self.seed, prompts]).encode()
                torch.manual_seed(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))
            per_prompt = self.prompter.sample_rewrites(prompts, self.k, temperature=self.temperature)
        return [[TargetInput(r.text, r.generated, r.fallback_reason) for r in row] for row in per_prompt]

    def fingerprint(self) -> str:
        parts = [super().fingerprint(), repr(self.temperature), repr(self.seed)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class BestOfN(Configuration):
    """n answers of the frozen model sampled on x itself; the selection judge keeps the best one.

    The plain way to spend n target calls per prompt, with no prompter: the equal-compute baseline of rerank
    (2 calls: x and the rewrite), rerank-3 and the retry gate. The choice is made as theirs is (the selection
    judge's maximum, the first of equals). Draws are sampled at ``temperature`` and seeded (see
    :class:`SampledTarget`); records of another ``temperature`` or ``seed`` are not resumed.
    """

    n: int = 2
    temperature: float = 0.7
    seed: int = 0
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"best-of-n needs n >= 1 sampled answers per prompt, got {self.n!r}")
        check_temperature(self.temperature)
        self.k = self.n
        self.name = self.name or f"best-of-{self.n}"
        self.description = self.description or (
            f"{self.n} answers to x sampled at temperature {self.temperature:g}; the selection judge keeps the best"
        )

    def inputs(self, prompts):
        return [[TargetInput(x, draw=d) for d in range(self.n)] for x in prompts]

    def answering(self, shared: FrozenTarget) -> FrozenTarget:
        if self.target is not None:
            shared = self.target
        if isinstance(shared, CachedTarget):
            # The same store (memory, file, lock) with the sampler behind it: its keys differ by settings and
            # draw, so the greedy answers stay apart and best-of-2 and best-of-4 share their first two draws.
            cached = copy.copy(shared)
            cached.target = SampledTarget(shared.target, self.temperature, self.seed)
            return cached
        return SampledTarget(shared, self.temperature, self.seed)

    def fingerprint(self) -> str:
        parts = [super().fingerprint(), repr(float(self.temperature)), repr(self.seed)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class WithRetryGate(Configuration):
    """x first; where the retry gate (:class:`RetryGate` over the selection judge) scores that answer below
    ``threshold``, the target is also asked with each retry configuration's input, and the best-scored answer
    is kept: what ``AlignedChatModel(retry_gate=RetryGate(...))`` does at run time, for one call.

    Spends extra target calls only on the answers the reward model calls poor, which lifts the low tail of the
    reward distribution instead of moving every answer. ``k`` in the records is the target calls per prompt.
    Choose ``threshold`` on prompts other than the evaluation prompts: see :func:`retry_threshold`.
    :meth:`rerank` has no threshold, as ``RetryGate.rerank``.
    """

    # Records were first written under this class name; the fingerprint keeps it so they are still reused.
    fingerprint_name: ClassVar[str] = "GatedRetry"

    retry: Sequence[Configuration] = ()
    threshold: float = float("-inf")
    name: str = "gated-retry"
    description: str = "x; below the gate's threshold, the retry inputs too, the best-scored answer kept"

    def __post_init__(self) -> None:
        if not self.retry:
            raise ValueError(
                "WithRetryGate needs at least one retry configuration, e.g. retry=[WithPrompter(...)]"
            )
        bad = [
            type(c).__name__
            for c in self.retry
            if isinstance(c, (WithRetryGate, BestOfN, RefineAndKeepBetter)) or c.target is not None
        ]
        if bad:
            raise ValueError(
                f"retry configurations must give the shared target an input (FixedTemplate, WithPrompter, "
                f"BestOfK); got {bad}"
            )
        if math.isnan(self.threshold):
            raise ValueError("threshold is NaN: give a number (retry_threshold() computes one)")

    @classmethod
    def rerank(
        cls,
        retry: Sequence[Configuration],
        name: str = "rerank",
        description: str = "x and the prompter's rewrite both answered; the training reward keeps the better",
    ) -> WithRetryGate:
        """No threshold: every prompt is also asked with each retry input (``RetryGate.rerank`` at run time)."""
        return cls(retry=retry, threshold=float("inf"), name=name, description=description)

    def inputs(self, prompts):
        return [[TargetInput(x)] for x in prompts]

    def retry_inputs(self, prompts: Sequence[str]) -> list[list[TargetInput]]:
        per_config = [c.inputs(prompts) for c in self.retry]
        return [[inp for rows in per_config for inp in rows[i]] for i in range(len(prompts))]

    def fingerprint(self) -> str:
        parts = [super().fingerprint(), repr(self.threshold), *(c.fingerprint() for c in self.retry)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class RefineAndKeepBetter(Configuration):
    """x first; then a refinement prompter (mode ``"refine"``) reads that answer y₀ and writes x'' — where the
    selection judge scores y₀ below ``threshold``, or always when it is None — the target answers x'', and the
    better-scored of y₀ and y₁ is kept: what ``AlignedChatModel(prompter=<refine prompter>,
    retry_gate=RetryGate(reward, threshold))`` does at run time (``RetryGate.rerank`` for None).

    Two target calls where it refines, one where it does not or the prompter keeps x (``k`` in the records). Each
    record holds the refinement written for its prompt (``refinement``: the guidance and its fallback reason,
    whichever answer was kept); the summary's ``outputs`` and ``refinements`` count the distinct guidance written.
    """

    prompter: Prompter | None = None
    threshold: float | None = None
    name: str = "refine"
    description: str = (
        "x; the refinement prompter reads the answer and writes x''; the better-scored answer kept"
    )

    def __post_init__(self) -> None:
        mode = getattr(getattr(self.prompter, "manifest", None), "mode", None)
        if mode != "refine":
            raise ValueError(
                f"RefineAndKeepBetter needs a refinement prompter (mode 'refine'), got {mode!r}; for a prompt-only "
                "prompter use WithRetryGate.rerank([WithPrompter(prompter)]) or WithRetryGate(retry=[...], "
                "threshold=...)"
            )
        if self.threshold is not None and (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or math.isnan(self.threshold)
        ):
            raise ValueError(
                f"threshold must be a number (retry_threshold() computes one) or None (always refine), got "
                f"{self.threshold!r}"
            )
        self._refinements: dict[str, TargetInput] = {}

    @property
    def gate_threshold(self) -> float:
        return math.inf if self.threshold is None else float(self.threshold)

    def inputs(self, prompts):
        self._refinements.clear()  # a new chunk: the refinements recorded are this chunk's
        return [[TargetInput(x)] for x in prompts]

    def refine_inputs(self, prompts: Sequence[str], first_answers: Sequence[str]) -> list[list[TargetInput]]:
        """Per prompt, x'' written from (x, its first answer), or no input where the prompter keeps x."""
        assert self.prompter is not None
        out: list[list[TargetInput]] = []
        for x, r in zip(
            prompts, self.prompter.refine_results(list(prompts), list(first_answers)), strict=True
        ):
            self._refinements[x] = TargetInput(r.text, r.generated, r.fallback_reason)
            out.append([self._refinements[x]] if r.rewritten else [])
        return out

    def record_extra(self, prompt: str) -> dict[str, Any]:
        r = self._refinements.get(prompt)
        return {
            "refinement": None
            if r is None
            else {"guidance": r.generated, "fallback_reason": r.fallback_reason}
        }

    def fingerprint(self) -> str:
        parts = [super().fingerprint(), repr(self.threshold)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def refinement_kinds(rows: Sequence[dict], top: int = 5) -> dict[str, Any]:
    """What a refinement configuration wrote where it refined: how often it refined, how often the prompter kept
    x, and the distinct kinds of guidance it wrote (grouped by their words, case and spacing aside), the most
    common first."""
    asked = [r["refinement"] for r in rows if r.get("refinement")]
    written = [
        " ".join(a["guidance"].split()).lower()
        for a in asked
        if a["fallback_reason"] is None and a["guidance"]
    ]
    kinds = Counter(written)
    return {
        "prompts": len(rows),
        "refined": len(asked),
        "kept_x": len(asked) - len(written),
        "distinct": len(kinds),
        "most_common": [[text, n] for text, n in kinds.most_common(top)],
    }


@dataclass
class Oracle(Configuration):
    target: FrozenTarget | None = None
    name: str = "rlhf-oracle"
    description: str = "(iii) the target itself fine-tuned by RL (LoRA) on x"

    def inputs(self, prompts):
        return [[TargetInput(x)] for x in prompts]
