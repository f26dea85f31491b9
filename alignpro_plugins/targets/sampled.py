"""SampledTarget: a frozen target asked for numbered, seeded samples of its answer (best-of-n's draws)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from alignpro_plugins.targets.base import FrozenTarget, TargetError, TargetRequest, as_requests


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
        check_temperature(temperature)
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
                sampler.seed = draw_seed(self.seed, draw)
            self._draws[draw] = sampler
        device: Any = getattr(getattr(self.target, "model", None), "device", None)
        devices = [device.index or 0] if getattr(device, "type", None) == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(draw_seed(self.seed, draw, prompts))
            return sampler.generate(prompts)


def draw_seed(seed: int, draw: int, prompts: Sequence[str] = ()) -> int:
    blob = json.dumps([seed, draw, list(prompts)]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") >> 1  # fits any API's 32-bit seed


def check_temperature(temperature: float) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < math.inf
    ):
        raise ValueError(
            f"the sampling temperature must be a number > 0 (at 0 every draw is the same greedy answer), got "
            f"{temperature!r}"
        )
