"""An ensemble of K rewards combined per answer (mean, min or mean − k·std of the members' standardised scores).

Opened from an ensemble folder (``alignpro_reward.json`` with ``"kind": "alignpro-reward-ensemble"``) by
:func:`alignpro_plugins.rewards.load_reward`, the one entry point for reward folders.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpro_plugins.rewards import (
    ENSEMBLE_KIND,
    REWARD_MANIFEST,
    RewardFunction,
    RewardModel,
    _checked_requests,
    _length_penalty,
    as_reward,
    read_reward_manifest,
)
from alignpro_plugins.targets.base import TargetRequest, as_requests

logger = logging.getLogger(__name__)

COMBINE_RULES = ("mean", "min", "mean-minus-std")


@dataclass(frozen=True)
class EnsembleScores:
    """One pass of an ensemble: the combined scores, each member's row, and their spread per answer."""

    scores: list[float]
    member_scores: list[list[float]]
    disagreement: list[float]


class RewardEnsemble(RewardFunction):
    """K rewards scored one after another and combined per answer.

    ``combine``: ``"mean"``; ``"min"`` (the most pessimistic member); ``"mean-minus-std"`` (mean minus ``k``
    times the members' population std: an answer the members disagree on scores lower). ``member_scale`` (one
    ``{"mean", "std"}`` per member) standardises each member's scores before they are combined; an ensemble
    folder opened with ``length_control=False`` uses its ``member_scale_raw``, fitted on the raw scores.
    """

    def __init__(
        self,
        members: Sequence[Any],
        combine: str = "mean",
        k: float = 1.0,
        *,
        member_scale: Sequence[dict[str, float]] | None = None,
        path: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        where = f"{path}/{REWARD_MANIFEST}: " if path else ""
        if isinstance(members, (str, Path)) or not members:
            raise ValueError(f"{where}an ensemble needs a non-empty list of member rewards, got {members!r}")
        if combine not in COMBINE_RULES:
            raise ValueError(
                f"{where}combine={combine!r} is unknown; accepted: {', '.join(map(repr, COMBINE_RULES))}"
            )
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
            raise ValueError(f"{where}combine_k must be a finite number >= 0, got {k!r}")
        self.members: list[RewardFunction] = [as_reward(m) for m in members]
        self.combine = combine
        self.k = float(k)
        self.member_scale = _checked_scale(member_scale, len(self.members), where)
        self.path = path
        self.meta = dict(meta or {})
        if self.member_scale is None and combine != "mean" and len(self.members) > 1:
            # Why it matters: see _standardised.
            logger.warning(
                "reward ensemble %s combines raw member scores by %r: without member_scale a member's offset "
                "decides the result",
                path or "(in code)",
                combine,
            )

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> RewardEnsemble:
        """Open an ensemble folder; ``kwargs`` go to every member's :class:`RewardModel`."""
        folder = str(folder)
        meta = read_reward_manifest(folder)
        where = f"{folder}/{REWARD_MANIFEST}"
        if meta.get("kind") != ENSEMBLE_KIND:
            raise ValueError(f"{where}: kind is {meta.get('kind')!r}, not {ENSEMBLE_KIND!r}")
        names = meta.get("members")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"{where}: 'members' must be a non-empty list of member folders relative to {folder} "
                f'(e.g. ["member-0", "member-1"]), got {names!r}'
            )
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: 'members' names a folder twice: {names}")
        paths = [Path(folder) / n for n in names]
        nested = [
            n
            for n, p in zip(names, paths, strict=True)
            if read_reward_manifest(p).get("kind") == ENSEMBLE_KIND
        ]
        if nested:
            raise ValueError(
                f"{where}: member(s) {nested} are ensembles themselves; a member is one reward model"
            )
        missing = [n for n, p in zip(names, paths, strict=True) if not (p / "config.json").is_file()]
        if missing:
            raise ValueError(
                f"{where}: member folder(s) {missing} missing under {folder}; each member is a reward-model "
                "folder (config.json, weights, tokenizer, alignpro_reward.json)"
            )
        members = [
            RewardModel(str(p), **kwargs) for p in paths
        ]  # each loaded once, kept for the ensemble's life
        return cls(
            members,
            meta.get("combine", "mean"),
            meta.get("combine_k", 1.0),
            member_scale=_member_scale(meta, names, members, where),
            path=folder,
            meta=meta,
        )

    @property
    def identity(self) -> str:
        rule = f"{self.combine}(k={self.k!r})" if self.combine == "mean-minus-std" else self.combine
        scale = "" if self.member_scale is None else f"|scale={json.dumps(self.member_scale, sort_keys=True)}"
        return f"reward-ensemble:{rule}[{','.join(m.identity for m in self.members)}]{scale}"

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        return self.score_requests(as_requests(prompts), answers)

    def score_requests(self, requests: Sequence[TargetRequest], answers: Sequence[str]) -> list[float]:
        return self._spread(requests, answers).scores

    def score_with_spread(
        self, prompts: Sequence[str | TargetRequest], answers: Sequence[str]
    ) -> EnsembleScores:
        """Combined scores, member rows and disagreement from one scoring pass."""
        return self._spread(_checked_requests(prompts, answers), answers)

    def member_scores(
        self, prompts: Sequence[str | TargetRequest], answers: Sequence[str]
    ) -> list[list[float]]:
        """One row per member: the scores the rule combines (standardised when the ensemble has member_scale)."""
        return self.score_with_spread(prompts, answers).member_scores

    def disagreement(self, prompts: Sequence[str | TargetRequest], answers: Sequence[str]) -> list[float]:
        """Per answer, the population std of the members' (standardised) scores: 0 when they all agree."""
        return self.score_with_spread(prompts, answers).disagreement

    def fit_member_scale(
        self, prompts: Sequence[str | TargetRequest], answers: Sequence[str]
    ) -> list[dict[str, float]]:
        """Each member's mean and population std of its scores on these answers, before any standardisation:
        the manifest's ``member_scale`` (fit it on held-out answers, chosen and rejected)."""
        requests = _checked_requests(prompts, answers)
        if len(requests) < 2:
            raise ValueError(f"fitting member_scale needs at least 2 answers, got {len(requests)}")
        scale = []
        for member in self.members:
            raw = member.score_requests(requests, answers)
            mean, std = _mean_std(raw)
            if std <= 0:
                raise ValueError(
                    f"member {member.identity} gives every one of the {len(raw)} answers the same score: its "
                    "scale cannot be fitted"
                )
            scale.append({"mean": mean, "std": std})
        return scale

    def _spread(self, requests: Sequence[TargetRequest], answers: Sequence[str]) -> EnsembleScores:
        rows = [
            self._standardised(j, m.score_requests(requests, answers)) for j, m in enumerate(self.members)
        ]
        scores, spread = [], []
        for column in zip(*rows, strict=True):
            mean, std = _mean_std(column)
            spread.append(std)
            if self.combine == "mean":
                scores.append(mean)
            elif self.combine == "min":
                scores.append(min(column))
            else:
                scores.append(mean - self.k * std)
        return EnsembleScores(scores=scores, member_scores=rows, disagreement=spread)

    def _standardised(self, j: int, raw: list[float]) -> list[float]:
        # Bradley-Terry training fixes a reward only up to an offset, and its scale varies from run to run. An
        # offset does not change which answer the mean ranks first, but it decides which member "min" follows
        # and inflates the std of "mean-minus-std"; a larger scale weighs a member more in the mean. So the
        # reward stage fits each member's mean/std on held-out answers (member_scale) and the rules combine
        # z-scores; an ensemble without member_scale combines raw scores.
        if self.member_scale is None:
            return raw
        mean, std = self.member_scale[j]["mean"], self.member_scale[j]["std"]
        return [(s - mean) / std for s in raw]


def _member_scale(
    meta: dict[str, Any], names: Sequence[str], members: Sequence[RewardModel], where: str
) -> list[dict[str, float]] | None:
    """The scale fitted on the scores these members give: ``member_scale_raw`` when members with a length penalty
    score without it (``length_control=False``), else ``member_scale``."""
    raw = [
        n
        for n, m in zip(names, members, strict=True)
        if m.length_penalty is None and _length_penalty(m.meta, m.path) is not None
    ]
    if not raw:
        return meta.get("member_scale")
    if "member_scale_raw" not in meta and meta.get("member_scale") is not None:
        raise ValueError(
            f"{where}: member_scale was fitted on the length-penalised scores of {raw}, and there is no "
            "member_scale_raw for their raw scores: open the ensemble with length_control=True, or train it "
            "again (the reward stage records both)"
        )
    return meta.get("member_scale_raw")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _checked_scale(
    scale: Sequence[dict[str, float]] | None, n_members: int, where: str
) -> list[dict[str, float]] | None:
    if scale is None:
        return None
    expected = f'one {{"mean": m, "std": s > 0}} per member ({n_members})'
    if not isinstance(scale, Sequence) or len(scale) != n_members:
        raise ValueError(f"{where}member_scale must be {expected}, got {scale!r}")
    checked = []
    for entry in scale:
        mean, std = (entry.get("mean"), entry.get("std")) if isinstance(entry, dict) else (None, None)
        numbers = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (mean, std)
        )
        if not numbers or std <= 0:  # type: ignore[operator]
            raise ValueError(f"{where}member_scale must be {expected}, got entry {entry!r}")
        checked.append({"mean": float(mean), "std": float(std)})  # type: ignore[arg-type]
    return checked
