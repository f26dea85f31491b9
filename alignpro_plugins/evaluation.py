"""Evaluation harness: named configurations answered by the frozen target and scored under several judges.

Each configuration says how a prompt x becomes the target's input (and, for the RLHF oracle, which model
answers). Every configuration is scored on the same prompts by every judge, so all statistics are paired:
mean reward, reward variance, win rate against the frozen model alone with a bootstrap 95% interval and the
same win at equal answer length, head-to-head win rates, the share of the frozen→oracle gap closed, fallback
rate and rewrite length. A configuration that asks the target more than once (best-of-K, best-of-n, the gate,
rerank) keeps the answer the selection judge (the first judge) scores best, through :class:`RetryGate`'s flow;
its target calls per prompt, its agreement with the other judges on the answers it chose between, and the
best-of-n sampling baseline with as many calls are reported beside it. :class:`RefineAndKeepBetter` is the gate
with a refinement prompter: it reads the first answer before writing the second input, and its records keep the
guidance it wrote. Records are written incrementally, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

from alignpro_plugins import stats
from alignpro_plugins.eval_report import (  # noqa: F401 - answer_words and render_markdown re-exported
    answer_words,
    paired_win,
    prompter_outputs,
    render_markdown,
)
from alignpro_plugins.extras import require
from alignpro_plugins.gate import GateResult, RetryGate, retry_threshold  # noqa: F401 - retry_threshold re-exported: it sets WithRetryGate.threshold
from alignpro_plugins.guidance import DEFAULT_TEMPLATE
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.refining import first_answer
from alignpro_plugins.rewards import RewardFunction, judge_identity, prompts_trained_on
from alignpro_plugins.targets import (
    CachedTarget,
    FrozenTarget,
    TargetError,
    TargetRequest,
    append_jsonl,
    read_jsonl_rows,
)
from alignpro_plugins.targets.base import as_requests

logger = logging.getLogger(__name__)


@dataclass
class TargetInput:
    text: str
    generated: str | None = None
    fallback_reason: str | None = None
    draw: int | None = None  # best-of-n: which sampled answer to x this input asks for (None: not sampled)

    def request(self) -> str | TargetRequest:
        """What the target is asked: the text, or for a sampled draw a request whose draw number is its own."""
        return self.text if self.draw is None else TargetRequest(self.text, context={"draw": self.draw})


@dataclass
class _Judged:
    """A target answer and every judge's score of it against its original prompt."""

    text: str
    rewards: dict[str, float] = field(default_factory=dict)


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


class SampledTarget(FrozenTarget):
    """``target`` sampling its answers at ``temperature`` (its other settings kept): best-of-n's draws.

    A request's ``context["draw"]`` (0, 1, ...; a plain prompt is draw 0) says which draw it asks for. The draw
    is part of the answer cache's key, so n draws of one prompt are n target calls that a :class:`CachedTarget`
    does not collapse into one, and draw i is the same answer whatever n is (best-of-2's draws are best-of-4's
    first two). Each draw is seeded from ``seed``, its number and the prompts asked together, on a forked RNG
    (the caller's random state is untouched), and an OpenAI-compatible endpoint is sent a seed per draw, so a
    rerun draws the same answers. Works with any target that samples from a ``temperature`` attribute
    (:class:`~alignpro_plugins.targets.TransformersTarget` with top-k and top-p off,
    :class:`~alignpro_plugins.targets.OpenAICompatibleTarget`). Calls count in ``target.stats``.
    """

    def __init__(self, target: FrozenTarget, temperature: float, seed: int = 0) -> None:
        super().__init__()
        if not hasattr(target, "temperature"):
            raise TypeError(
                f"best-of-n samples the target at a temperature, and {type(target).__name__} has no temperature "
                "setting; use a TransformersTarget or an OpenAICompatibleTarget"
            )
        _check_temperature(temperature)
        self.target = target
        self.temperature = float(temperature)
        self.seed = seed
        self.stats = target.stats  # each draw is a call of the target itself, counted there once
        self._draws: dict[int, FrozenTarget] = {}

    @property
    def identity(self) -> str:
        return self.target.identity

    @property
    def settings(self) -> dict[str, Any]:
        return {**self.target.settings, "temperature": self.temperature, "draw_seed": self.seed}

    def generate(self, prompts: Sequence[str | TargetRequest]) -> list[str]:
        return self._answer(as_requests(prompts))  # counted by the draws, in the target's stats

    def _generate(self, prompts: list[str]) -> list[str]:
        return self._answer(as_requests(prompts))

    def _answer(self, requests: list[TargetRequest]) -> list[str]:
        draws = [int((r.context or {}).get("draw", 0)) for r in requests]
        answers: list[str | None] = [None] * len(requests)
        failed: list[TargetError] = []
        for d in sorted(set(draws)):
            at = [m for m, dm in enumerate(draws) if dm == d]
            try:
                got: list[str | None] = list(self._drawn(d, [requests[m].prompt for m in at]))
            except TargetError as exc:  # the other draws still count; the answers that arrived are kept
                failed.append(exc)
                got = list(exc.answers)
            for m, a in zip(at, got, strict=True):
                answers[m] = a
        if failed:
            raise TargetError(f"{failed[0]} ({len(failed)} draws had failures)", answers)
        return [a or "" for a in answers]

    def _drawn(self, draw: int, prompts: list[str]) -> list[str]:
        import torch

        sampler = self._draws.get(draw)
        if sampler is None:
            sampler = copy.copy(self.target)  # shares the model or client; only the sampling settings differ
            sampler.temperature = self.temperature  # type: ignore[attr-defined]
            if hasattr(sampler, "seed"):  # an OpenAI-compatible endpoint seeds each request itself
                sampler.seed = _draw_seed(self.seed, draw)
            self._draws[draw] = sampler
        device: Any = getattr(getattr(self.target, "model", None), "device", None)
        devices = [device.index or 0] if getattr(device, "type", None) == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_draw_seed(self.seed, draw, prompts))
            return sampler.generate(prompts)


def _draw_seed(seed: int, draw: int, prompts: Sequence[str] = ()) -> int:
    blob = json.dumps([seed, draw, list(prompts)]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") >> 1  # fits any API's 32-bit seed


def _check_temperature(temperature: float) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < math.inf
    ):
        raise ValueError(
            f"the sampling temperature must be a number > 0 (at 0 every draw is the same greedy answer), got "
            f"{temperature!r}"
        )


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
        _check_temperature(self.temperature)
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


class PairwiseLLMJudge:
    """Asks an LLM (any target backend) which of two answers is better, in both orders to cancel position bias."""

    TEMPLATE = (
        "Which response answers the user's request better? Reply with exactly one letter, A or B.\n\n"
        "Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nBetter response (A or B):"
    )

    def __init__(self, target: FrozenTarget) -> None:
        self.target = target

    @staticmethod
    def _choice(text: str) -> str | None:
        m = re.search(r"\b([AB])\b", text.strip().upper())
        return m.group(1) if m else None

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Per prompt, P(a better than b): 1, 0.5 (split or unparseable) or 0."""
        ab = [self.TEMPLATE.format(prompt=p, a=x, b=y) for p, x, y in zip(prompts, a, b, strict=True)]
        ba = [self.TEMPLATE.format(prompt=p, a=y, b=x) for p, x, y in zip(prompts, a, b, strict=True)]
        outs = self.target.generate(ab + ba)
        n = len(ab)
        scores = []
        for first, second in zip(outs[:n], outs[n:], strict=True):
            votes = [
                {"A": 1.0, "B": 0.0}.get(self._choice(first) or "", 0.5),
                {"B": 1.0, "A": 0.0}.get(self._choice(second) or "", 0.5),
            ]
            scores.append(sum(votes) / 2)
        return scores


@dataclass
class EvalReport:
    configs: list[str]
    judges: list[str]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def to_markdown(self) -> str:
        return render_markdown(self.summary)


class Evaluator:
    def __init__(
        self,
        prompts: Sequence[str],
        target: FrozenTarget,
        judges: dict[str, RewardFunction],
        *,
        out_dir: str | Path | None = None,
        reference: str = "frozen",
        focus: str = "align-pro",
        pairwise_judge: PairwiseLLMJudge | None = None,
        chunk_size: int = 16,
    ) -> None:
        if not judges:
            raise ValueError("give at least one judge (a reward model or reward function)")
        self.prompts = list(prompts)
        self.target = target
        self.judges = judges
        self.selection_judge = next(iter(judges))
        self.out_dir = Path(out_dir) if out_dir else None
        self.reference = reference
        self.focus = focus
        self.pairwise_judge = pairwise_judge
        self.chunk_size = chunk_size
        # A judge that trained on preference pairs for an evaluation prompt has seen it: count and say so.
        seen = {name: prompts_trained_on(judge, self.prompts) for name, judge in judges.items()}
        self.judge_trained_on_prompts = {name: n for name, n in seen.items() if n is not None}
        for name, n in self.judge_trained_on_prompts.items():
            if n:
                logger.warning(
                    "judge %r trained on preference pairs for %d of the %d evaluation prompts; exclude them when "
                    "training it (reward stage: exclude_prompt_files)",
                    name,
                    n,
                    len(self.prompts),
                )

    # ------------------------------------------------------------------ records
    def _records_path(self) -> Path | None:
        return self.out_dir / "records.jsonl" if self.out_dir else None

    def _fingerprint(self, cfg: Configuration) -> str:
        """What a record of ``cfg`` depends on: its setup, the target that answers it and every judge.

        A record answered by another shared target (model, URL, answer cap) or scored by another judge under the
        same name (a reward model retrained in place has new weights) must not be resumed.
        """
        parts = [cfg.fingerprint()]
        if cfg.target is None:  # a configuration with its own target has it in cfg.fingerprint()
            parts += [self.target.identity, json.dumps(self.target.settings, sort_keys=True, default=str)]
        parts += [f"{name}={judge_identity(judge)}" for name, judge in sorted(self.judges.items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _load_done(self, fingerprints: dict[str, str]) -> dict[tuple[str, int], dict]:
        """Records of an earlier run that still apply: same configuration setup, target and judges, same prompt.

        Matched by prompt text, not position, so a grown or reordered prompt set reuses every record it can.
        """
        path = self._records_path()
        done: dict[tuple[str, int], dict] = {}
        positions: dict[str, list[int]] = {}
        for i, x in enumerate(self.prompts):
            positions.setdefault(x, []).append(i)
        if path and path.exists():
            # A line cut off by an interrupted run is skipped (with a warning); its cell is computed again.
            for row in read_jsonl_rows(path, required=("config", "prompt", "rewards", "answer")):
                if not (
                    isinstance(row["config"], str)
                    and isinstance(row["prompt"], str)
                    and isinstance(row["rewards"], dict)
                ):
                    continue  # not a record this harness wrote
                if row.get("fingerprint") != fingerprints.get(row["config"]) or set(row["rewards"]) != set(
                    self.judges
                ):
                    continue
                for i in positions.get(row["prompt"], []):
                    done[(row["config"], i)] = {**row, "idx": i}
        return done

    def _append(self, rows: list[dict]) -> None:
        path = self._records_path()
        if path:
            append_jsonl(path, [json.dumps(r, ensure_ascii=False) for r in rows])

    def _choose(self, cfg: Configuration, target: FrozenTarget, prompts: list[str]) -> list[GateResult]:
        """Per prompt, the candidates asked and the one the selection judge keeps, through :class:`RetryGate`.

        A gate asks its retry inputs only where the first answer scores below its threshold. Every other
        configuration is the gate with no threshold (``RetryGate.rerank``) over its own candidates: one input
        (frozen, template, a prompter) is simply answered and scored; best-of-K and best-of-n have every candidate
        answered and keep the best-scored one (the first of equals).
        """
        selector = self.judges[self.selection_judge]
        if isinstance(cfg, RefineAndKeepBetter):
            gate = RetryGate(selector, cfg.gate_threshold)
            first = [c for [c] in cfg.inputs(prompts)]

            def more(below: list[int]) -> list[list[TargetInput]]:
                # Inside the gate's retry step each prompt's first answer is known (see alignpro_plugins.refining).
                xs = [prompts[j] for j in below]
                answers: list[str] = []
                for x in xs:
                    answer = first_answer(x)
                    if answer is None:  # refining from "" would score a refinement of nothing
                        raise RuntimeError(
                            f"{cfg.name}: no first answer to refine for the prompt {x!r} in the gate's retry step"
                        )
                    answers.append(answer)
                return cfg.refine_inputs(xs, answers)

        elif isinstance(cfg, WithRetryGate):
            gate = RetryGate(selector, cfg.threshold)
            first = [c for [c] in cfg.inputs(prompts)]

            def more(below: list[int]) -> list[list[TargetInput]]:
                return cfg.retry_inputs([prompts[j] for j in below])

        else:
            rows = cfg.inputs(prompts)
            gate = RetryGate.rerank(selector)
            first = [row[0] for row in rows]

            def more(below: list[int]) -> list[list[TargetInput]]:
                return [rows[j][1:] for j in below]

        def ask(inputs: list[TargetInput]) -> list[_Judged]:
            return self._judged(target.generate([c.request() for c in inputs]))

        return gate.choose(prompts, first, ask, more, text=lambda a: a.text, score=self._score)

    @staticmethod
    def _judged(answers: Sequence[str]) -> list[_Judged]:
        return [_Judged(a) for a in answers]

    def _score(self, prompts: list[str], answers: list[_Judged]) -> list[float]:
        """Every judge scores these answers (one call each); returns the selection judge's scores."""
        scores = {
            name: list(judge(prompts, [a.text for a in answers])) for name, judge in self.judges.items()
        }
        for m, a in enumerate(answers):
            a.rewards = {name: s[m] for name, s in scores.items()}
        return scores[self.selection_judge]

    def _run_config(self, cfg: Configuration, done: dict) -> list[dict]:
        fingerprint = self._fingerprint(cfg)
        todo = [i for i in range(len(self.prompts)) if (cfg.name, i) not in done]
        target = cfg.answering(self.target)
        rows = [done[(cfg.name, i)] for i in range(len(self.prompts)) if (cfg.name, i) in done]
        for s in tqdm(range(0, len(todo), self.chunk_size), desc=f"eval {cfg.name}", disable=not todo):
            idx = todo[s : s + self.chunk_size]
            prompts = [self.prompts[i] for i in idx]
            new = [
                {
                    **self._record(cfg.name, i, self.prompts[i], result, fingerprint),
                    **cfg.record_extra(self.prompts[i]),
                }
                for i, result in zip(idx, self._choose(cfg, target, prompts), strict=True)
            ]
            self._append(new)
            rows += new
        return sorted(rows, key=lambda r: r["idx"])

    @staticmethod
    def _record(config: str, idx: int, prompt: str, result: GateResult, fingerprint: str) -> dict[str, Any]:
        """One prompt's record: the kept input and answer, every judge's score, the target calls it took, and
        where it chose between answers, every candidate's scores and which one it kept."""
        kept: TargetInput = result.input
        answer: _Judged = result.answer
        record = {
            "config": config,
            "idx": idx,
            "prompt": prompt,
            "input": kept.text,
            "rewrite": kept.generated,
            "fallback_reason": kept.fallback_reason,
            "answer": answer.text,
            "rewards": answer.rewards,
            "k": len(result.candidates),
            "fingerprint": fingerprint,
        }
        if len(result.candidates) > 1:
            record["candidates"] = [
                {"rewards": c.answer.rewards, "words": answer_words(c.answer.text)} for c in result.candidates
            ]
            record["kept"] = result.kept
        return record

    def _reuse(self, cfg: Configuration, source: str, source_rows: list[dict], done: dict) -> list[dict]:
        """``cfg``'s records copied from a configuration with the same inputs (see ``same_inputs_key``).

        Always the source's records, so the twins agree; a copy that is missing from the records file or
        differs from the one there (answered on its own by an older run) is appended, and the last wins on resume.
        (Records are matched by prompt text: a prompt listed twice resumes with its last record at both places.)
        """
        logger.info("%s: same inputs as %s; its answers and rewards are reused", cfg.name, source)
        fingerprint = self._fingerprint(cfg)
        rows = [r | {"config": cfg.name, "fingerprint": fingerprint} for r in source_rows]
        self._append([r for r in rows if done.get((cfg.name, r["idx"])) != r])
        return rows

    @staticmethod
    def _same_inputs_key(cfg: Configuration) -> str | None:
        # The class is part of the key: a subclass may build its inputs differently under the same key.
        key = cfg.same_inputs_key()
        return None if key is None else f"{type(cfg).__module__}.{type(cfg).__qualname__}:{key}"

    # ------------------------------------------------------------------ run
    def run(self, configs: Sequence[Configuration]) -> EvalReport:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must be unique, got {names}")
        if self.reference not in names:
            raise ValueError(f"the reference configuration {self.reference!r} is not among {names}")
        done = self._load_done({c.name: self._fingerprint(c) for c in configs})
        by_config: dict[str, list[dict]] = {}
        first_with: dict[str, str] = {}  # same-inputs key -> the configuration that was answered
        same_as: dict[str, str] = {}
        for c in configs:
            key = self._same_inputs_key(c)
            if key in first_with:
                same_as[c.name] = first_with[key]
                by_config[c.name] = self._reuse(c, first_with[key], by_config[first_with[key]], done)
            else:
                by_config[c.name] = self._run_config(c, done)
                if key is not None:
                    first_with[key] = c.name
            c.remember(by_config[c.name])
        summary = self.summarize(by_config, {c.name: c for c in configs})
        for name, source in same_as.items():
            summary["configs"][name]["same_inputs_as"] = source
        if self.pairwise_judge is not None:
            ref = by_config[self.reference]
            for name, rows in by_config.items():
                if name == self.reference:
                    continue
                twin_source = same_as.get(name)
                twin_of = summary["configs"].get(twin_source or "", {})
                if "pairwise_llm_judge_vs_reference" in twin_of:
                    # The same answers as its source: that verdict holds, the judge is not asked again.
                    verdict = dict(twin_of["pairwise_llm_judge_vs_reference"])
                    summary["configs"][name]["pairwise_llm_judge_vs_reference"] = verdict
                    continue
                if twin_source == self.reference:  # the reference's own answers: a tie on every prompt
                    p = [0.5] * len(rows)
                else:
                    p = self.pairwise_judge.prefer(
                        self.prompts, [r["answer"] for r in rows], [r["answer"] for r in ref]
                    )
                summary["configs"][name]["pairwise_llm_judge_vs_reference"] = stats.win_rate(
                    p, [0.5] * len(p)
                ) | {"win_rate": sum(p) / len(p)}
        report = EvalReport(
            names, list(self.judges), summary, [r for rows in by_config.values() for r in rows]
        )
        if self.out_dir:
            self.write(report, by_config)
        return report

    def summarize(
        self, by_config: dict[str, list[dict]], configs: dict[str, Configuration]
    ) -> dict[str, Any]:
        ref = by_config[self.reference]
        out: dict[str, Any] = {
            "n_prompts": len(self.prompts),
            "judges": list(self.judges),
            "selection_judge": self.selection_judge,
            "reference": self.reference,
            "focus": self.focus,
            "configs": {},
            "head_to_head": {},
            "equal_calls": [],
            "gap_closed": {},
            "judge_trained_on_prompts": dict(self.judge_trained_on_prompts),
        }
        for name, rows in by_config.items():
            cfg = configs[name]
            entry: dict[str, Any] = {"description": cfg.description, "k": cfg.k}
            # Best-of-k asks k times; a gated retry asks again only where its gate scored the answer poorly.
            entry["target_calls_per_prompt"] = sum(r["k"] for r in rows) / max(len(rows), 1)
            rewrites = [r["rewrite"] for r in rows if r["rewrite"] and not r["fallback_reason"]]
            entry["fallback_rate"] = sum(bool(r["fallback_reason"]) for r in rows) / max(len(rows), 1)
            entry["mean_rewrite_chars"] = sum(map(len, rewrites)) / len(rewrites) if rewrites else 0.0
            words = [answer_words(r["answer"]) for r in rows]
            entry["mean_answer_words"] = sum(words) / max(len(words), 1)
            if isinstance(cfg, (FixedTemplate, WithPrompter, BestOfK)):
                entry["outputs"] = prompter_outputs(rows)
            if isinstance(cfg, RefineAndKeepBetter):
                # The guidance written where it refined ('' where the prompter kept x), whichever answer was kept.
                entry["outputs"] = stats.most_common_share(
                    [
                        "" if r["refinement"]["fallback_reason"] else r["refinement"]["guidance"] or ""
                        for r in rows
                        if r.get("refinement")
                    ]
                )
                entry["refinements"] = refinement_kinds(rows)
            for judge in self.judges:
                entry[judge] = stats.summary([r["rewards"][judge] for r in rows])
                if name != self.reference:
                    w = paired_win(rows, ref, judge)
                    entry[judge]["vs_reference"] = {k: v for k, v in w.items() if k != "length_controlled"}
                    ref_vals = [r["rewards"][judge] for r in ref]
                    vals = [r["rewards"][judge] for r in rows]
                    entry[judge]["variance_ratio_vs_reference"] = stats.variance_ratio(vals, ref_vals)
                    # Judges favour longer answers: the win rate at equal length shows what is left.
                    entry[judge]["vs_reference_length_controlled"] = w["length_controlled"]
            if isinstance(cfg, (WithRetryGate, BestOfN, RefineAndKeepBetter)) or cfg.k > 1:
                entry["selection"] = self._selection(rows, ref)
            out["configs"][name] = entry
        if self.focus in by_config:
            focus_rows = by_config[self.focus]
            for name, rows in by_config.items():
                if name == self.focus:
                    continue
                out["head_to_head"][name] = {}
                for judge in self.judges:
                    d = stats.mean_difference(
                        [r["rewards"][judge] for r in focus_rows], [r["rewards"][judge] for r in rows]
                    )
                    out["head_to_head"][name][judge] = {
                        **paired_win(focus_rows, rows, judge),
                        "mean_diff": d["mean_diff"],
                        "mean_diff_ci": [d["ci_low"], d["ci_high"]],
                    }
        out["equal_calls"] = self._equal_calls(by_config, configs, out["configs"])
        oracle = next((n for n, c in configs.items() if isinstance(c, Oracle)), None)
        if oracle and self.focus in by_config:
            for judge in self.judges:
                m = {n: out["configs"][n][judge]["mean"] for n in (self.reference, self.focus, oracle)}
                out["gap_closed"][judge] = stats.gap_closed(m[self.reference], m[self.focus], m[oracle])
        return out

    def _selection(self, rows: list[dict], ref: list[dict]) -> dict[str, Any]:
        """How the selection judge's choices look to every other judge, on the answers it chose between.

        ``agreement``: on pairs of candidates both tell apart, the share where they prefer the same one;
        ``kept_is_judge_best``: the share of prompts where the kept answer is also the judge's best;
        ``judge_choice_vs_reference``: the win rate against the reference had the judge chosen among the same
        answers (the headroom of the candidates; only when every record holds its candidates).
        """
        selector = self.selection_judge
        chose = [r for r in rows if r.get("candidates")]
        # Records written before candidates were recorded: the per-prompt headroom cannot be computed.
        complete = all(r.get("candidates") for r in rows if r["k"] > 1)
        out: dict[str, Any] = {
            "selector": selector,
            "prompts_chosen_between": len(chose),
            "complete": complete,
        }
        for judge in self.judges:
            if judge == selector:
                continue
            groups = [[(c["rewards"][selector], c["rewards"][judge]) for c in r["candidates"]] for r in chose]
            kept_best = [
                r["candidates"][r["kept"]]["rewards"][judge]
                >= max(c["rewards"][judge] for c in r["candidates"]) - 1e-9
                for r in chose
            ]
            result: dict[str, Any] = {
                "agreement": stats.pairwise_agreement(groups),
                "kept_is_judge_best": sum(kept_best) / len(kept_best) if kept_best else float("nan"),
            }
            if complete:
                best = [
                    max(c["rewards"][judge] for c in r["candidates"])
                    if r.get("candidates")
                    else r["rewards"][judge]
                    for r in rows
                ]
                result["judge_choice_vs_reference"] = stats.win_rate(best, [r["rewards"][judge] for r in ref])
            out[judge] = result
        return out

    def _equal_calls(
        self, by_config: dict[str, list[dict]], configs: dict[str, Configuration], entries: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Each configuration that asks the target more than once against best-of-n sampling with n its calls per
        prompt rounded up (so the sampling never has fewer calls), when that best-of-n was evaluated."""
        sampling = {c.n: name for name, c in configs.items() if isinstance(c, BestOfN)}
        rows = []
        for name, entry in entries.items():
            calls = entry["target_calls_per_prompt"]
            against = sampling.get(math.ceil(calls - 1e-9))
            if isinstance(configs[name], BestOfN) or calls <= 1 or against is None:
                continue
            row: dict[str, Any] = {
                "config": name,
                "calls": calls,
                "against": against,
                "against_calls": entries[against]["target_calls_per_prompt"],
            }
            for judge in self.judges:
                row[judge] = paired_win(by_config[name], by_config[against], judge)
            rows.append(row)
        return rows

    def write(self, report: EvalReport, by_config: dict[str, list[dict]]) -> None:
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(
            json.dumps({"summary": report.summary, "records": report.records}, indent=1, ensure_ascii=False)
        )
        (self.out_dir / "results.md").write_text(report.to_markdown())
        try:
            plot_distributions(by_config, list(self.judges), self.out_dir / "reward_distributions.png")
        except Exception as exc:  # plotting is a convenience; never lose the results over it
            logger.warning("could not draw plots: %s", exc)


def plot_distributions(by_config: dict[str, list[dict]], judges: list[str], path: Path) -> None:
    matplotlib = require("matplotlib", "Plotting evaluation results")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(judges), figsize=(5 * len(judges), 4), squeeze=False)
    names = list(by_config)
    for ax, judge in zip(axes[0], judges, strict=True):
        data = [[r["rewards"][judge] for r in by_config[n]] for n in names]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_title(f"reward ({judge})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curve(metrics_jsonl: str | Path, path: str | Path, stage: str = "rl") -> None:
    matplotlib = require("matplotlib", "Plotting evaluation results")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    rows = [r for r in logged if r.get("stage") == stage and "reward" in r]
    if not rows:
        raise ValueError(f"no '{stage}' reward entries in {metrics_jsonl}")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="mean reward")
    val = [r for r in logged if r.get("stage") == stage and "val_reward" in r]
    if val:  # kl-optimum's fixed validation prompts, deployed rewrites; step 0 = the SFT prompter
        ax.plot([r["step"] for r in val], [r["val_reward"] for r in val], marker="o", label="validation")
        ax.legend(loc="lower right")
    if "kl" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in rows],
            [r.get("kl", 0) for r in rows],
            color="tab:orange",
            alpha=0.6,
            label="KL",
        )
        ax2.set_ylabel("KL to SFT prompter")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("RL stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
