"""Paired statistics for comparing configurations on the same prompts."""

from __future__ import annotations

import random
from collections.abc import Sequence
from statistics import fmean, pvariance


def win_indicators(a: Sequence[float], b: Sequence[float], tie_tol: float = 1e-9) -> list[float]:
    """Per prompt: 1 if a beats b, 0.5 on a tie, 0 otherwise (a and b are paired by prompt)."""
    if len(a) != len(b):
        raise ValueError(f"paired statistics need equal lengths, got {len(a)} and {len(b)}")
    return [0.5 if abs(x - y) <= tie_tol else float(x > y) for x, y in zip(a, b, strict=True)]


def bootstrap_ci(
    values: Sequence[float], *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling prompts)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(fmean(values[rng.randrange(n)] for _ in range(n)) for _ in range(n_boot))
    lo = means[int(alpha / 2 * n_boot)]
    hi = means[min(int((1 - alpha / 2) * n_boot), n_boot - 1)]
    return (lo, hi)


def win_rate(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> dict[str, float]:
    w = win_indicators(a, b)
    lo, hi = bootstrap_ci(w, seed=seed)
    return {"win_rate": fmean(w) if w else float("nan"), "ci_low": lo, "ci_high": hi, "n": len(w)}


def mean_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> dict[str, float]:
    """Paired mean of a − b over prompts, with a bootstrap 95% interval (resampling prompts)."""
    if len(a) != len(b):
        raise ValueError(f"paired statistics need equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    lo, hi = bootstrap_ci(d, seed=seed)
    return {"mean_diff": fmean(d) if d else float("nan"), "ci_low": lo, "ci_high": hi, "n": len(d)}


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": fmean(values) if values else float("nan"),
        "variance": pvariance(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def gap_closed(frozen: float, aligned: float, oracle: float) -> float:
    """Share of the frozen→oracle gap in mean reward that the aligned configuration closes.

    Undefined (nan) when the oracle does not beat the frozen model: there is no gap to close.
    """
    gap = oracle - frozen
    return float("nan") if gap <= 1e-12 else (aligned - frozen) / gap
