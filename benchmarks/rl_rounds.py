"""What each kl-optimum round of the benchmark's RL stage bought, on the benchmark's held-out prompts.

Evaluates the SFT prompter and the prompter after every round (``rl-kl/round-N/``) with the same frozen target,
judges and prompts as ``run_benchmark.py``, and writes one table into docs/benchmarks.md: mean reward and win
rate against the frozen model and against SFT under both judges, plus how concentrated the rewrites are (the
share of prompts that receive the single most common rewrite). Run it after ``run_benchmark.py``; the
benchmark's records and answer cache are reused, so only the round prompters' rewrites cost anything.

    python benchmarks/rl_rounds.py [--out runs/bench]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    eval_prompts,
    judges,
    machine,
    publish,
    side_evaluation,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument("--quick", action="store_true", help="the quick budget's prompt count")
    args = ap.parse_args()
    out = Path(args.out)
    from trainers.kl_optimum import round_dirs

    rounds = [
        (r, f) for r, f in round_dirs(out / "rl-kl") if r > 0
    ]  # round 0 (validation runs) is the SFT prompter
    if not rounds:
        raise SystemExit(f"no {out}/rl-kl/round-N/ prompters: run benchmarks/run_benchmark.py first")

    from alignpro_plugins.evaluation import Evaluator, FrozenAlone, WithPrompter
    from alignpro_plugins.manifest import weights_hash
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.stats import win_rate

    budget = BUDGETS["quick" if args.quick else "standard"]
    prompts = eval_prompts(budget)
    ev_dir, target = side_evaluation(out, budget, "eval-rounds")  # reuses the benchmark's answers and records
    scorers = judges(out)
    labels = {"sft": "sft"}
    align_round = 0  # the round align-pro is (kl_keep_best may keep an earlier one; 0: the SFT prompter)
    configs = [
        FrozenAlone(),
        WithPrompter(prompter=Prompter.from_pretrained(out / "sft"), name="sft", description="SFT prompter"),
    ]
    for r, folder in rounds:
        if weights_hash(folder) == weights_hash(out / "rl-kl"):
            # The round the RL stage kept is the benchmark's align-pro prompter: same name and setup reuse its records.
            final = Prompter.from_pretrained(out / "rl-kl")
            configs.append(
                WithPrompter(prompter=final, description="(ii) Align-Pro prompter (RL: kl-optimum)")
            )
            labels["align-pro"] = f"rl round {r} (= align-pro)"
            align_round = r
        else:
            configs.append(
                WithPrompter(
                    prompter=Prompter.from_pretrained(folder),
                    name=f"rl-round-{r}",
                    description=f"RL after round {r}",
                )
            )
            labels[f"rl-round-{r}"] = f"rl round {r}"
    t = time.time()
    report = Evaluator(prompts, target, scorers, out_dir=ev_dir, focus="sft").run(configs)
    by: dict[str, list[dict]] = collections.defaultdict(list)
    for rec in sorted(report.records, key=lambda r: r["idx"]):
        by[rec["config"]].append(rec)

    def cell(a: str, b: str, judge: str) -> str:
        w = win_rate([r["rewards"][judge] for r in by[a]], [r["rewards"][judge] for r in by[b]])
        return f"{w['win_rate']:.1%} [{w['ci_low']:.0%}–{w['ci_high']:.0%}]"

    # The deployed (greedy) rewrite's training reward on the next round's fresh training prompts: a held-out
    # curve the RL stage logs for free (kl_include_greedy), on training-distribution prompts.
    log = out / "rl-kl" / "metrics.jsonl"
    greedy = {
        row["step"]: row["reward_greedy"]
        for row in map(json.loads, log.read_text().splitlines() if log.exists() else [])
        if "reward_greedy" in row
    }
    next_round = {"sft": 1, **{f"rl-round-{r}": r + 1 for r, _ in rounds}, "align-pro": align_round + 1}
    rows = []
    for c in [c.name for c in configs[1:]]:
        g = greedy.get(next_round[c])
        rewrites = collections.Counter(r["rewrite"] or "" for r in by[c])
        top, count = rewrites.most_common(1)[0]
        means = [sum(r["rewards"][j] for r in by[c]) / len(by[c]) for j in scorers]
        rows.append(
            f"| {labels[c]} | {means[0]:.3f} | {means[1]:.3f} | {cell(c, 'frozen', 'reward')} | "
            f"{cell(c, 'frozen', 'independent')} | "
            + (
                "— | — | "
                if c == "sft"
                else f"{cell(c, 'sft', 'reward')} | {cell(c, 'sft', 'independent')} | "
            )
            + f"{len(rewrites)} | {count / len(by[c]):.0%} ({top[:48]}…) | "
            + (f"{g:.3f} |" if g is not None else "— |")
        )
    md = [
        "## What each RL round bought",
        "",
        f"- command: `python benchmarks/rl_rounds.py{' --quick' if args.quick else ''}` (after run_benchmark.py)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; "
        f"{time.time() - t:.0f} s",
        f"- {len(prompts)} held-out prompts, the benchmark's target and judges; each round trained on "
        f"{budget['kl_prompts']} fresh training prompts (held-out BPO and AlpacaEval, interleaved) from the "
        "previous round's prompter",
        "- last column: the training reward of the prompter's deployed rewrites on the *next* round's fresh "
        "training prompts, logged by the RL stage itself (`reward_greedy`; — after the last round)",
        "",
        "| prompter | mean (reward) | mean (independent) | vs frozen (reward) | vs frozen (independent) "
        "| vs SFT (reward) | vs SFT (independent) | distinct rewrites | most common rewrite "
        "| deployed reward, next round's prompts |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    section = "\n".join(md)
    publish(section, ev_dir / "rounds_section.md", "align-pro-rl-rounds")


if __name__ == "__main__":
    main()
