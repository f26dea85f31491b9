"""Do similar prompts share a best guidance text? Leave-one-out on the SFT bootstrap, under both judges.

The SFT stage (``bootstrap_neighbours=-1``) picks each prompt's target as the fixed text with the best mean
training reward over the prompt and its N most similar bootstrap prompts, N chosen by leave-one-out on the
training reward. This re-scores every bootstrap answer with the independent judge and reports, for each N, the
reward a prompt gets from the text its N neighbours (not itself) pick — under the training reward that made the
pick and under the judge that never saw it — and that pick's win rate against "no change". If N = all ties
the small neighbourhoods, the kind of prompt does not predict the best text and the prompter can only learn
the best text on average; if a small N wins under the independent judge too, there is a per-kind choice to
learn. Nothing here trains: it reads bootstrap.jsonl and the SFT stage's answer cache.

    python benchmarks/bootstrap_smoothing.py [--out runs/bench]    # after the benchmark's SFT stage; ~2 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    bootstrap_answers,
    judges,
    machine,
    publish,
    sft_bootstrap_stats,
    sft_library,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument("--quick", action="store_true", help="the quick budget's answer length")
    args = ap.parse_args()
    out = Path(args.out)
    if not (out / "sft" / "alignpro.json").exists() or not (out / "judge" / "alignpro_reward.json").exists():
        raise SystemExit(f"{out} has no finished SFT stage or judge yet: run run_benchmark.py first")
    import torch

    from alignpro_plugins.embeddings import Embedder
    from alignpro_plugins.stats import win_rate
    from trainers import bootstrap_labels

    t0 = time.time()
    budget = BUDGETS["quick" if args.quick else "standard"]
    rows = bootstrap_answers(out, budget)
    # Fixed candidates (library texts, "no change") are the same on every prompt; keep prompts with all answered.
    texts = [*sft_library(budget), ""]
    groups = [(x, {c["text"]: c for c in found}) for x, found in rows]
    groups = [(x, g) for x, g in groups if all(t in g for t in texts)]
    prompts = [x for x, _ in groups]
    train = torch.tensor([[g[t]["reward"] for t in texts] for _, g in groups], dtype=torch.float64)
    judge = judges(out)["independent"]
    scores = judge.score(
        [x for x in prompts for _ in texts], [g[t]["answer"] for _, g in groups for t in texts]
    )
    indep = torch.tensor(scores, dtype=torch.float64).view(len(groups), len(texts))
    order = bootstrap_labels.neighbour_order(Embedder("all-minilm-l6-v2").embed(prompts).double())
    none = texts.index("")
    n_other = len(prompts) - 1
    sizes = sorted({min(k, n_other) for k in bootstrap_labels.NEIGHBOUR_GRID})
    boot = sft_bootstrap_stats(out)

    def row(label: str, picks: list[int]) -> str:
        tr = sum(train[i, j] for i, j in enumerate(picks)) / len(picks)
        ind = sum(indep[i, j] for i, j in enumerate(picks)) / len(picks)
        w = win_rate([float(indep[i, j]) for i, j in enumerate(picks)], indep[:, none].tolist())
        return (
            f"| {label} | {tr:.3f} | {ind:.3f} | {w['win_rate']:.1%} [{100 * w['ci_low']:.0f}–{100 * w['ci_high']:.0f}] | "
            f"{len(set(picks))} |"
        )

    table = [
        row(
            f"N = {k}{' (all)' if k == n_other else ''}{' ← the SFT stage' if k == boot.get('neighbours') else ''}",
            bootstrap_labels.smoothed_picks(train, order, k, include_self=False),
        )
        for k in sizes
    ]
    in_sample = [int(train[i].argmax()) for i in range(len(prompts))]
    md = [
        "## Experiment: do similar prompts share a best guidance text? (SFT bootstrap, leave-one-out)",
        "",
        f"- command: `python benchmarks/bootstrap_smoothing.py{' --quick' if args.quick else ''}` "
        "(after run_benchmark.py's SFT stage)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; "
        f"{time.time() - t0:.0f} s",
        f"- {len(prompts)} bootstrap prompts (BPO instructions, training data), {len(texts)} fixed candidates each "
        "(the guidance library and 'no change'), one greedy answer per candidate; neighbours by all-MiniLM-L6-v2 "
        "cosine similarity of the prompts",
        "- each row: every prompt gets the text with the best mean *training* reward over its N nearest *other* "
        "prompts; columns: that text's mean reward on the prompt under the training reward and under the "
        "independent judge, and its win rate against 'no change' under the independent judge",
        f"- the SFT stage chose N = {boot.get('neighbours', '?')} by the training-reward column "
        f"({boot.get('neighbours_chosen_by', '?')})",
        "",
        "| pick | training reward | independent judge | vs no change (independent) | distinct picks |",
        "|---|---|---|---|---|",
        *table,
        row("in sample: the prompt's own best (not leave-one-out)", in_sample),
        row("no change", [none] * len(prompts)),
    ]
    publish("\n".join(md), out / "eval-smoothing" / "section.md", "bootstrap-smoothing-experiment")


if __name__ == "__main__":
    main()
