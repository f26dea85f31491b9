"""Paired statistics for comparing configurations on the same prompts."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from statistics import fmean, pstdev, pvariance
from typing import Any


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


def variance_ratio(
    a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Reward variance of a across prompts over that of b, with a paired percentile bootstrap 95% interval.

    Both are resampled on the same prompts, so the interval reflects how much the ratio depends on which
    prompts were drawn (with 100 prompts a ratio of 1.2 is often within noise of 1).
    """
    if len(a) != len(b):
        raise ValueError(f"paired statistics need equal lengths, got {len(a)} and {len(b)}")
    nan = float("nan")
    if len(a) < 2 or pvariance(b) == 0:
        return {"ratio": nan, "ci_low": nan, "ci_high": nan, "n": len(a)}
    rng = random.Random(seed)
    n = len(a)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        vb = pvariance([b[i] for i in idx])
        if vb > 0:
            boots.append(pvariance([a[i] for i in idx]) / vb)
    boots.sort()
    m = len(boots)
    return {
        "ratio": pvariance(a) / pvariance(b),
        "ci_low": boots[int(0.025 * m)] if m else nan,
        "ci_high": boots[min(int(0.975 * m), m - 1)] if m else nan,
        "n": n,
    }


def mean_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> dict[str, float]:
    """Paired mean of a − b over prompts, with a bootstrap 95% interval (resampling prompts)."""
    if len(a) != len(b):
        raise ValueError(f"paired statistics need equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    lo, hi = bootstrap_ci(d, seed=seed)
    return {"mean_diff": fmean(d) if d else float("nan"), "ci_low": lo, "ci_high": hi, "n": len(d)}


def length_controlled_win_rate(
    a: Sequence[float],
    b: Sequence[float],
    len_a: Sequence[float],
    len_b: Sequence[float],
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """Win rate of a over b at equal answer length, in the manner of AlpacaEval's length-controlled win rate.

    Reward models and LLM judges both favour longer answers; a prompter can "win" by asking for length alone.
    Fits P(a wins) = σ(θ + φ·tanh(Δ/s)) on the per-prompt win indicators (ties half), with Δ the length
    difference a − b and s its standard deviation, and reports σ(θ): the predicted win rate where the two
    answers are equally long. ``length_coef`` is φ (> 0: the judge prefers the longer answer). Interval:
    percentile bootstrap over prompts.
    """
    w = win_indicators(a, b)
    if len({len(w), len(len_a), len(len_b)}) != 1:
        raise ValueError("paired statistics need equal lengths for scores and answer lengths")
    nan = float("nan")
    if not w:
        return {"win_rate": nan, "ci_low": nan, "ci_high": nan, "length_coef": nan, "n": 0}
    d = [x - y for x, y in zip(len_a, len_b, strict=True)]
    scale = pstdev(d) if len(d) > 1 else 0.0
    if scale == 0:  # one length difference everywhere: its effect cannot be told apart from the win rate
        return {**win_rate(a, b), "length_coef": nan}
    z = [math.tanh(v / scale) for v in d]
    theta, phi = _logistic_fit(w, z)
    rng = random.Random(seed)
    n = len(w)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(_sigmoid(_logistic_fit([w[i] for i in idx], [z[i] for i in idx])[0]))
    boots.sort()
    return {
        "win_rate": _sigmoid(theta),
        "ci_low": boots[int(0.025 * n_boot)],
        "ci_high": boots[min(int(0.975 * n_boot), n_boot - 1)],
        "length_coef": phi,
        "n": n,
    }


def pairwise_agreement(
    groups: Sequence[Sequence[tuple[float, float]]],
    *,
    tie_tol: float = 1e-9,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """How often a selector and a judge agree on which of two answers is better.

    ``groups`` holds, per prompt, the (selector score, judge score) of each answer the selector chose between.
    Every pair of answers of a prompt that both tell apart (neither scores them within ``tie_tol``) counts once:
    agreement is the share of those pairs where they prefer the same answer. Interval: percentile bootstrap
    over prompts (a prompt's pairs stay together). ``pairs`` and ``prompts`` say how much it rests on.
    """
    per_prompt: list[tuple[int, int]] = []  # (pairs agreed on, pairs told apart by both)
    for group in groups:
        agreed = decided = 0
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                ds, dj = group[i][0] - group[j][0], group[i][1] - group[j][1]
                if abs(ds) > tie_tol and abs(dj) > tie_tol:
                    decided += 1
                    agreed += (ds > 0) == (dj > 0)
        if decided:
            per_prompt.append((agreed, decided))
    nan = float("nan")
    pairs = sum(d for _, d in per_prompt)
    if not pairs:
        return {"agreement": nan, "ci_low": nan, "ci_high": nan, "pairs": 0, "prompts": 0}
    rng = random.Random(seed)
    n = len(per_prompt)
    boots = []
    for _ in range(n_boot):
        draw = [per_prompt[rng.randrange(n)] for _ in range(n)]
        boots.append(sum(a for a, _ in draw) / sum(d for _, d in draw))
    boots.sort()
    return {
        "agreement": sum(a for a, _ in per_prompt) / pairs,
        "ci_low": boots[int(0.025 * n_boot)],
        "ci_high": boots[min(int(0.975 * n_boot), n_boot - 1)],
        "pairs": pairs,
        "prompts": n,
    }


def most_common_share(values: Sequence[str]) -> dict[str, Any]:
    """How many distinct values there are, the most common one and the share of items that have it.

    Shows at a glance whether a prompter wrote one text for every prompt (``distinct`` 1, ``top_share`` 1.0).
    """
    counts = Counter(values)
    if not counts:
        return {"distinct": 0, "top": None, "top_share": float("nan"), "n": 0}
    top, count = counts.most_common(1)[0]
    return {"distinct": len(counts), "top": top, "top_share": count / len(values), "n": len(values)}


def _sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)  # no overflow for large negative v
    return e / (1.0 + e)


def _logistic_fit(y: Sequence[float], z: Sequence[float], ridge: float = 0.1) -> tuple[float, float]:
    """(θ, φ) maximising Σ y·log σ(θ+φz) + (1−y)·log(1−σ(θ+φz)) − ridge·φ²/2, by Newton's method.

    The small ridge on φ keeps the fit finite when length alone separates wins from losses.
    """
    theta = phi = 0.0
    for _ in range(50):
        g0 = h00 = h01 = 0.0
        g1, h11 = -ridge * phi, ridge
        for yi, zi in zip(y, z, strict=True):
            p = _sigmoid(theta + phi * zi)
            r, v = yi - p, p * (1 - p)
            g0 += r
            g1 += r * zi
            h00 += v
            h01 += v * zi
            h11 += v * zi * zi
        h00 += 1e-9
        det = h00 * h11 - h01 * h01
        step0 = (h11 * g0 - h01 * g1) / det
        step1 = (h00 * g1 - h01 * g0) / det
        theta, phi = theta + step0, phi + step1
        if abs(step0) + abs(step1) < 1e-8:
            break
    return theta, phi


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
