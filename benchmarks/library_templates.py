"""Does the SFT prompter beat the best *fixed* guidance text, chosen on training prompts?

The bootstrap scores every text of the guidance library on each of its training prompts (bootstrap.jsonl), so
a user could skip the prompter and append the one text with the best mean training reward there. This evaluates
every library text as a fixed template on the benchmark's held-out prompts, beside the SFT and Align-Pro
prompters, with the benchmark's target, judges and cached answers, and writes one table into docs/benchmarks.md.
The pick is made on the bootstrap's training prompts by the training reward; the evaluation columns only report.

    python benchmarks/library_templates.py [--out runs/bench]    # after run_benchmark.py; about 25 min here
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    bootstrap_answers,
    eval_prompts,
    judges,
    machine,
    publish,
    side_evaluation,
    training_side,
)


def in_sample(out: Path, budget: dict, judge: Any) -> dict[str, float]:
    """On the bootstrap's own prompts: does the independent judge agree with the training reward's per-prompt pick?

    Re-scores every bootstrap candidate's answer (from the SFT stage's answer cache) with ``judge``:
    the share of prompts where both judges pick the same candidate, and the pick's win rate against "no change"
    under each judge. High agreement with a much lower held-out win rate means the pick is real for the answers
    it saw but not predictable from the prompt alone.
    """
    from alignpro_plugins.stats import win_rate

    groups = [
        (x, [(c["reward"], c["answer"], c["fallback"] == "no_change") for c in found])
        for x, found in bootstrap_answers(out, budget)
        if len(found) >= 3 and any(c["fallback"] == "no_change" for c in found)
    ]
    scores = iter(judge.score([x for x, g in groups for _ in g], [a for _, g in groups for _, a, _ in g]))
    agree, picked, unchanged, picked_tr, unchanged_tr = 0, [], [], [], []
    for _, g in groups:
        ind = [next(scores) for _ in g]
        best = max(range(len(g)), key=lambda j: g[j][0])
        base = next(j for j, (_, _, u) in enumerate(g) if u)
        agree += best == max(range(len(g)), key=lambda j: ind[j])
        picked.append(ind[best])
        unchanged.append(ind[base])
        picked_tr.append(g[best][0])
        unchanged_tr.append(g[base][0])
    return {
        "prompts": len(groups),
        "candidates": sum(len(g) for _, g in groups) / len(groups),
        "top1_agreement": agree / len(groups),
        "pick_vs_unchanged_independent": win_rate(picked, unchanged)["win_rate"],
        "pick_vs_unchanged_reward": win_rate(picked_tr, unchanged_tr)["win_rate"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    args = ap.parse_args()
    out = Path(args.out)
    if not (out / "sft" / "bootstrap.jsonl").exists() or not (out / "rl-kl" / "alignpro.json").exists():
        raise SystemExit(
            f"{out} has no finished benchmark (sft/bootstrap.jsonl, rl-kl/): run run_benchmark.py first"
        )

    from alignpro_plugins.evaluation import Evaluator, FixedTemplate, FrozenAlone, WithPrompter
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.stats import win_rate

    train = training_side(out / "sft" / "bootstrap.jsonl")
    budget = BUDGETS["standard"]
    scorers = judges(out)
    sample = in_sample(out, budget, scorers["independent"])
    texts = sorted(train, key=lambda t: -train[t]["mean"])
    prompts = eval_prompts(budget)
    ev_dir, target = side_evaluation(
        out, budget, "eval-library"
    )  # reuses the benchmark's answers and records
    names = {text: f"library-{i + 1}" for i, text in enumerate(texts)}
    configs = [
        FrozenAlone(),
        *(FixedTemplate(template=t, name=names[t], description="a library text appended") for t in texts),
        WithPrompter(prompter=Prompter.from_pretrained(out / "sft"), name="sft", description="SFT prompter"),
        WithPrompter(
            prompter=Prompter.from_pretrained(out / "rl-kl"),
            description="(ii) Align-Pro prompter (RL: kl-optimum)",
        ),
    ]
    t0 = time.time()
    report = Evaluator(prompts, target, scorers, out_dir=ev_dir, focus="sft").run(configs)
    by: dict[str, list[float]] = defaultdict(list)
    for rec in sorted(report.records, key=lambda r: r["idx"]):
        by[rec["config"]].append(rec["rewards"]["independent"])

    def wr(a: str, b: str) -> str:
        w = win_rate(by[a], by[b])
        return f"{w['win_rate']:.1%} [{w['ci_low']:.0%}–{w['ci_high']:.0%}]"

    rows = [
        f"| {names[t]}{' (picked)' if i == 0 else ''}: {t} | {train[t]['mean']:.3f} | {train[t]['vs_unchanged']:.1%} "
        f"| {wr(names[t], 'frozen')} | {wr('sft', names[t])} | {wr('align-pro', names[t])} |"
        for i, t in enumerate(texts)
    ]
    n_train = next(iter(train.values()))["n"]
    md = [
        "## Experiment: the best fixed guidance text against the trained prompters",
        "",
        "- command: `python benchmarks/library_templates.py` (after run_benchmark.py)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; "
        f"{time.time() - t0:.0f} s; target calls {target.stats.calls}, cache hits {target.stats.cache_hits}",
        f"- training side: the bootstrap's {n_train} training prompts, training reward (bootstrap.jsonl); the "
        "text with the best mean there is the one a user would pick without a prompter ('picked')",
        f"- in sample: on {sample['prompts']} bootstrap prompts with {sample['candidates']:.1f} answered candidates "
        f"each, the training reward's per-prompt pick wins {sample['pick_vs_unchanged_reward']:.1%} against 'no "
        f"change' under the training reward and {sample['pick_vs_unchanged_independent']:.1%} under the independent "
        f"judge; both judges pick the same candidate on {sample['top1_agreement']:.0%} of the prompts",
        f"- evaluation side: the benchmark's {len(prompts)} held-out prompts, independent judge; "
        f"SFT vs frozen {wr('sft', 'frozen')}, align-pro vs frozen {wr('align-pro', 'frozen')}",
        "",
        "| fixed text | mean training reward (bootstrap prompts) | vs no change (bootstrap prompts) "
        "| text vs frozen (held-out) | SFT vs text (held-out) | align-pro vs text (held-out) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    publish("\n".join(md), ev_dir / "section.md", "library-templates-experiment")


if __name__ == "__main__":
    main()
