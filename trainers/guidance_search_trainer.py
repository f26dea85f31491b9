"""Guidance search: successive halving over fixed guidance texts, scored across prompts.

Leave-one-out on the SFT bootstrap showed that the best guidance for one prompt does not carry to similar
prompts, while the best text on average does: the transferable signal is *which text*, measured across many
prompts. This stage spends target calls where that signal is — many candidate texts on few prompts, then the
better half on twice the prompts, the finalists on all of them — and picks among the finalists on validation prompts no rung saw, so the
winner is not just the luckiest of many noisy means.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any

from tqdm.auto import tqdm

from alignpro_plugins.prompter import compose
from alignpro_plugins.rewards import as_reward
from alignpro_plugins.stats import win_indicators
from alignpro_plugins.targets import TargetError
from trainers.common import build_target, check_reward_source, target_cache_path, wrap_target
from trainers.guidance_search_config import GuidanceSearchConfig

logger = logging.getLogger(__name__)

NO_CHANGE = ""  # the reference: x as the user wrote it
RESULT_FILE = "guidance_search.json"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def recombinations(seeds: Sequence[str]) -> list[tuple[str, str]]:
    """(text, origin): the seeds, each seed sentence alone, and each seed extended by one other seed's sentence."""
    seeds = [s.strip() for s in seeds if s.strip()]
    out: dict[str, str] = {s: f"seed {i}" for i, s in enumerate(seeds)}
    parts = [(i, s) for i, seed in enumerate(seeds) for s in sentences(seed)]
    for i, s in parts:
        out.setdefault(s, f"sentence of seed {i}")
    for i, seed in enumerate(seeds):
        for j, s in parts:
            if j != i and s not in seed:
                out.setdefault(f"{seed} {s}", f"seed {i} + sentence of seed {j}")
    return list(out.items())


def objective_score(
    rewards: Sequence[float], reference: Sequence[float], objective: str, risk_aversion: float = 1.0
) -> float:
    """A text's score across prompts: its rewards there, against "no change" on the same prompts."""
    if not rewards:
        return float("-inf")
    if objective == "win_rate":
        return fmean(win_indicators(list(rewards), list(reference[: len(rewards)])))
    if objective == "mean_minus_std":
        return fmean(rewards) - risk_aversion * pstdev(rewards)
    return fmean(rewards)


@dataclass
class Candidate:
    text: str
    origin: str
    rewards: list[float] = field(default_factory=list)  # per search prompt, in the rungs' prompt order
    validation: list[float] = field(default_factory=list)
    rung_out: int | None = None  # the rung after which halving dropped it (None: reached the end)

    @property
    def mean(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else float("-inf")

    @property
    def validation_mean(self) -> float | None:
        return sum(self.validation) / len(self.validation) if self.validation else None


@dataclass
class GuidanceSearchResult:
    """What the search found: ``best`` ('' when no text beats leaving x alone) and every candidate's scores."""

    best: str
    chosen_on: str  # "validation" or "search prompts"
    candidates: list[dict[str, Any]]
    rungs: list[dict[str, Any]]
    search_prompts: int
    validation_prompts: int
    target_calls: int
    # What produced it: reward artifact, target identity and answer settings, search settings.
    provenance: dict[str, Any] = field(default_factory=dict)

    def ranked(self, n: int | None = None) -> list[str]:
        """Non-empty texts, best first (objective on validation, then on the search prompts), at most n."""

        def key(c: dict[str, Any]) -> tuple[float, int, float]:
            # The search's objective where it recorded one (results before objectives: the mean).
            v = c.get("validation_score", c["validation_mean"])
            s = c.get("score", c["mean"])
            return (v if v is not None else float("-inf"), c["prompts_scored"], s)

        texts = [c["text"] for c in sorted(self.candidates, key=key, reverse=True) if c["text"]]
        return texts[:n] if n else texts

    def save(self, output_dir: str | os.PathLike[str]) -> Path:
        path = Path(output_dir) / RESULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GuidanceSearchResult:
        """From an output folder or its guidance_search.json (plain JSON, never a pickle)."""
        p = Path(path)
        file = p / RESULT_FILE if p.is_dir() else p
        if not file.exists():
            raise FileNotFoundError(
                f"{path} holds no {RESULT_FILE}: give the output_dir of `alignpro guidance` or the file itself"
            )
        data = json.loads(file.read_text())
        missing = {"best", "candidates"} - set(data)
        if missing:
            raise ValueError(f"{file} is not a guidance search result: it lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class GuidanceSearchTrainer:
    def __init__(
        self,
        config: GuidanceSearchConfig,
        *,
        prompts: Sequence[str] | None = None,
        validation_prompts: Sequence[str] | None = None,
        target: Any | None = None,
        reward: Any | None = None,
    ) -> None:
        self.config = config
        check_reward_source("The guidance search", reward, config.reward_model)
        if prompts is None and not config.prompts_data:
            raise ValueError(
                "the guidance search needs training prompts: set prompts_data or pass prompts=..."
            )
        self._prompts = list(prompts) if prompts is not None else None
        self._validation = list(validation_prompts) if validation_prompts is not None else None
        self._target = target
        self._reward = reward

    def candidates(self) -> list[Candidate]:
        seeds = self.config.seed_texts
        pairs = (
            recombinations(seeds)
            if self.config.recombine
            else [(s.strip(), f"seed {i}") for i, s in enumerate(seeds) if s.strip()]
        )
        return [Candidate(t, o) for t, o in dict(pairs).items()] + [Candidate(NO_CHANGE, "no change")]

    def prompt_sets(self) -> tuple[list[str], list[str]]:
        """(search prompts, validation prompts): de-duplicated, disjoint, the search prompts shuffled by seed."""
        from alignpro_plugins.data import load_prompts

        cfg = self.config

        def read(source: str) -> list[str]:
            return load_prompts(source, field=cfg.prompt_field, context_field=cfg.context_field)

        prompts = self._prompts if self._prompts is not None else read(str(cfg.prompts_data))
        prompts = list(dict.fromkeys(prompts))
        random.Random(cfg.seed).shuffle(prompts)
        if self._validation is not None or cfg.validation_data:
            val = self._validation if self._validation is not None else read(str(cfg.validation_data))
            held = set(prompts)
            val = [x for x in dict.fromkeys(val) if x not in held][: cfg.validation_prompts]
        else:
            n_val = min(cfg.validation_prompts, len(prompts) // 2)
            val, prompts = prompts[:n_val], prompts[n_val:]
        if cfg.max_prompts:
            prompts = prompts[: cfg.max_prompts]
        if not prompts:
            raise ValueError(
                "the guidance search got no search prompts (after holding out validation prompts)"
            )
        return prompts, val

    def search(self) -> GuidanceSearchResult:
        cfg = self.config
        out_dir = str(cfg.output_dir)
        target = (
            wrap_target(self._target, target_cache_path(out_dir))
            if self._target is not None
            else build_target(cfg, out_dir)
        )
        reward = as_reward(self._reward if self._reward is not None else cfg.reward_model)

        def score(texts: Sequence[str], prompts: Sequence[str], desc: str) -> list[list[float]]:
            """rewards[text][prompt]: the target's answer to x + text, scored against x."""
            pairs = [(x, t) for t in texts for x in prompts]
            rewards: list[float] = []
            step = 64
            for s in tqdm(range(0, len(pairs), step), desc=desc, disable=len(pairs) <= step):
                chunk = pairs[s : s + step]
                inputs = [compose(x, t, "augment") if t else x for x, t in chunk]
                try:
                    answers = target.generate(inputs)
                except TargetError as exc:  # counted in target.stats; a missing answer scores as empty
                    answers = exc.answers_or_empty()
                rewards += reward([x for x, _ in chunk], answers)
            return [rewards[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(texts))]

        prompts, val = self.prompt_sets()
        pool = self.candidates()
        reference = pool[-1]  # "no change": scored on every prompt, never dropped

        def on_search(c: Candidate) -> float:
            return objective_score(c.rewards, reference.rewards, cfg.objective, cfg.risk_aversion)

        def on_validation(c: Candidate) -> float:
            return objective_score(c.validation, reference.validation, cfg.objective, cfg.risk_aversion)

        alive = pool[:-1]
        rungs: list[dict[str, Any]] = []
        seen, upto = 0, min(cfg.min_prompts, len(prompts))
        while True:
            new = prompts[seen:upto]
            for c, rs in zip(
                [*alive, reference],
                score([c.text for c in [*alive, reference]], new, f"rung {len(rungs)}"),
                strict=True,
            ):
                c.rewards += rs
            seen = upto
            # Stable: ties (frequent for win rates on few prompts) keep the previous rung's order.
            alive.sort(key=on_search, reverse=True)
            rungs.append(
                {
                    "prompts": seen,
                    "candidates": len(alive),
                    "best": alive[0].text,
                    "best_mean": alive[0].mean,
                    "best_score": on_search(alive[0]),
                    "no_change_mean": reference.mean,
                    "no_change_score": on_search(reference),
                }
            )
            logger.info("guidance search rung %d: %s", len(rungs) - 1, rungs[-1])
            if seen >= len(prompts):
                break
            keep = max(cfg.finalists, math.ceil(len(alive) * cfg.keep_fraction))
            for c in alive[keep:]:
                c.rung_out = len(rungs) - 1
            alive = alive[:keep]
            # Once only the finalists are left, they take every remaining search prompt in one last rung.
            upto = len(prompts) if len(alive) <= cfg.finalists else min(len(prompts), upto * 2)
        for c in alive[cfg.finalists :]:
            c.rung_out = len(rungs) - 1
        finalists = [*alive[: cfg.finalists], reference]
        if val:
            for c, rs in zip(finalists, score([c.text for c in finalists], val, "validation"), strict=True):
                c.validation = rs
            best = max(finalists, key=lambda c: (on_validation(c), on_search(c)))
        else:
            best = max(finalists, key=on_search)
        if best is reference:
            logger.warning("guidance search: no candidate text beat leaving the prompt unchanged")
        result = GuidanceSearchResult(
            best=best.text,
            chosen_on="validation" if val else "search prompts",
            candidates=[self._row(c, reference, on_search, on_validation) for c in pool],
            rungs=rungs,
            search_prompts=len(prompts),
            validation_prompts=len(val),
            target_calls=target.stats.calls,
            provenance={
                "reward_model": cfg.reward_model if self._reward is None else "in-memory",
                "target": target.identity,
                "target_settings": target.settings,
                "prompts_data": cfg.prompts_data if self._prompts is None else "in-memory",
                "validation_data": cfg.validation_data if self._validation is None else "in-memory",
                **{
                    k: getattr(cfg, k)
                    for k in (
                        "objective",
                        "risk_aversion",
                        "recombine",
                        "min_prompts",
                        "keep_fraction",
                        "finalists",
                        "seed",
                    )
                },
            },
        )
        path = result.save(out_dir)
        logger.info(
            "guidance search: best %r (chosen on %s); written to %s", best.text, result.chosen_on, path
        )
        return result

    @staticmethod
    def _row(c: Candidate, reference: Candidate, on_search: Any, on_validation: Any) -> dict[str, Any]:
        """A candidate's scores, with its paired gain, win rate and variance against 'no change' on the same
        prompts (the variance ratio is what a risk-averse objective trades against the gain)."""
        n = len(c.rewards)
        paired = reference.rewards[:n]

        def var_ratio(a: list[float], b: list[float]) -> float | None:
            return pstdev(a) ** 2 / pstdev(b) ** 2 if len(a) > 1 and pstdev(b) > 0 else None

        return {
            "text": c.text,
            "origin": c.origin,
            "prompts_scored": n,
            "mean": c.mean,
            "std": pstdev(c.rewards) if n else None,
            "score": on_search(c) if n else None,
            "gain_over_no_change": fmean(c.rewards) - fmean(paired) if n else None,
            "win_rate_over_no_change": fmean(win_indicators(c.rewards, paired)) if n else None,
            "variance_ratio_over_no_change": var_ratio(c.rewards, paired),
            "validation_mean": c.validation_mean,
            "validation_std": pstdev(c.validation) if c.validation else None,
            "validation_score": on_validation(c) if c.validation else None,
            "validation_win_rate_over_no_change": fmean(win_indicators(c.validation, reference.validation))
            if c.validation
            else None,
            "validation_variance_ratio": var_ratio(c.validation, reference.validation),
            "dropped_after_rung": c.rung_out,
        }


def search_guidance(config: GuidanceSearchConfig, **kwargs: Any) -> GuidanceSearchResult:
    os.makedirs(str(config.output_dir), exist_ok=True)
    return GuidanceSearchTrainer(config, **kwargs).search()
