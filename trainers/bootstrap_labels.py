"""Neighbourhood-smoothed bootstrap targets: which fixed guidance suits which *kind* of prompt.

The best-of-K bootstrap scores every fixed candidate (guidance texts, "no change") on every prompt, but a
prompt's single greedy answer per candidate is a noisy measurement: on the benchmark's prompts two independent
judges pick the same best candidate for only 61% of them. Taking the per-prompt argmax as the SFT target teaches
the prompter that noise. Averaging each candidate's reward over the prompt's nearest neighbours (sentence
embeddings) keeps the part of the choice that carries to similar prompts; with every prompt as a neighbour it is
the best text on average. The neighbourhood size is chosen by leave-one-out on the bootstrap's own rewards:
for each prompt, the pick made from the *other* prompts' rewards is scored by this prompt's reward; the largest
size within one standard error of the best score is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Neighbourhood sizes tried by leave-one-out (capped at the number of other prompts; that cap is "all").
NEIGHBOUR_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def neighbour_order(embeddings: torch.Tensor) -> torch.Tensor:
    """Row i: every *other* prompt's index, most similar first (cosine similarity of normalised embeddings)."""
    sim = embeddings @ embeddings.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argsort(dim=1, descending=True)[:, :-1]


def smoothed_picks(
    rewards: torch.Tensor, order: torch.Tensor, k: int, *, include_self: bool = True
) -> list[int]:
    """Per prompt, the candidate (column of ``rewards``, shape prompts × candidates) with the best mean reward
    over the prompt's k nearest neighbours, plus the prompt itself unless ``include_self`` is off."""
    picks = []
    for i in range(rewards.shape[0]):
        rows = order[i, :k].tolist() + ([i] if include_self else [])
        picks.append(int(rewards[rows].mean(0).argmax()))
    return picks


def leave_one_out_rewards(
    rewards: torch.Tensor, order: torch.Tensor, k: int, realized: torch.Tensor | None = None
) -> torch.Tensor:
    """Per prompt, the reward it gets from the candidate its k neighbours (not itself) pick by ``rewards``; scored
    by ``realized`` (same shape, e.g. another judge's rewards of the same answers) when given."""
    picks = smoothed_picks(rewards, order, k, include_self=False)
    scored = rewards if realized is None else realized
    return torch.stack([scored[i, j] for i, j in enumerate(picks)])


def choose_neighbours(
    rewards: torch.Tensor, order: torch.Tensor, grid: Sequence[int] = NEIGHBOUR_GRID
) -> tuple[int, dict[int, float]]:
    """The neighbourhood size chosen by leave-one-out, and every size's mean leave-one-out reward.

    One-standard-error rule (as in cross-validation): the *largest* size whose score is within one standard
    error of the best one's, the error taken over prompts of the paired difference to the best. Smaller
    neighbourhoods give more varied SFT targets, which a small prompter blends into paraphrases; a size should
    win by more than noise before it is preferred over a larger one.
    """
    n_other = rewards.shape[0] - 1
    if n_other < 1:
        raise ValueError("choosing a neighbourhood by leave-one-out needs at least 2 bootstrap prompts")
    sizes = sorted({min(k, n_other) for k in grid if k >= 1})
    per_prompt = {k: leave_one_out_rewards(rewards, order, k).double() for k in sizes}
    scores = {k: float(v.mean()) for k, v in per_prompt.items()}
    best = max(sizes, key=lambda k: (round(scores[k], 9), k))
    n = rewards.shape[0]

    def within_one_se(k: int) -> bool:
        diff = per_prompt[best] - per_prompt[k]
        se = float(diff.std(unbiased=True)) / n**0.5  # n >= 2: checked above
        return scores[best] - scores[k] <= se + 1e-12

    return max(k for k in sizes if within_one_se(k)), scores
