"""Guidance search on the benchmark's training prompts, then the found text on its held-out prompts.

`alignpro guidance` (trainers/guidance_search_trainer.py) scores the guidance library and recombinations of its
sentences across the SFT bootstrap's 128 training prompts by successive halving with the training reward, and
picks among the finalists on the 64 AlpacaEval validation prompts the RL stage holds out. No evaluation prompt is
seen until the chosen text is appended, as a fixed template (`template-searched`), to the benchmark's 100
held-out prompts, beside frozen, the best library text (`template-picked`) and the Align-Pro prompter, under both
judges. Answers the SFT bootstrap already has (library texts on its prompts) come from its cache.

    python benchmarks/guidance_search.py [--out runs/bench]    # after run_benchmark.py; 27 min measured (first run)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    PICKED,
    eval_prompts,
    judges,
    machine,
    picked_template,
    publish,
    rewards_by_config,
    run_guidance_search,
    sft_library,
    side_evaluation,
    win_cell,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument("--min-prompts", type=int, default=16, help="prompts per candidate in the first rung")
    args = ap.parse_args()
    out = Path(args.out)
    if (
        not (out / "rl-kl" / "alignpro.json").exists()
        or not (out / "judge" / "alignpro_reward.json").exists()
    ):
        raise SystemExit(f"{out} has no finished benchmark (rl-kl/, judge/): run run_benchmark.py first")

    from alignpro_plugins.evaluation import Evaluator, FixedTemplate, FrozenAlone, WithPrompter
    from alignpro_plugins.prompter import Prompter

    budget = BUDGETS["standard"]
    search_dir = out / "guidance"
    search_dir.mkdir(parents=True, exist_ok=True)
    cache = search_dir / "target_cache.jsonl"
    if not cache.exists() and (out / "sft" / "target_cache.jsonl").exists():
        shutil.copy(out / "sft" / "target_cache.jsonl", cache)  # the library texts' answers on these prompts
    t0 = time.time()
    result = run_guidance_search(out, budget, min_prompts=args.min_prompts)
    search_s = time.time() - t0

    picked = picked_template(out)
    prompts = eval_prompts(budget)
    ev_dir, target = side_evaluation(out, budget, "eval-guidance")
    configs = [
        FrozenAlone(),
        FixedTemplate(template=picked, name="template-picked", description=PICKED),
        FixedTemplate(
            template=result.best, name="template-searched", description="the guidance search's text"
        ),
        WithPrompter(
            prompter=Prompter.from_pretrained(out / "rl-kl"),
            description="(ii) Align-Pro prompter (RL: kl-optimum)",
        ),
    ]
    t1 = time.time()
    report = Evaluator(prompts, target, judges(out), out_dir=ev_dir, focus="template-searched").run(configs)
    eval_s = time.time() - t1
    by = rewards_by_config(report.records)

    def wr(a: str, b: str, judge: str) -> str:
        return win_cell(by[a, judge], by[b, judge])

    def var_ratio(a: str, judge: str) -> str:
        return f"{statistics.pvariance(by[a, judge]) / statistics.pvariance(by['frozen', judge]):.2f}"

    rows = [
        f"| {name} | {wr(name, 'frozen', 'independent')} | {wr(name, 'frozen', 'reward')} | "
        f"{statistics.fmean(by[name, 'independent']):+.3f} | {var_ratio(name, 'independent')} | "
        f"{wr('template-searched', name, 'independent') if name != 'template-searched' else '—'} |"
        for name in ("template-searched", "template-picked", "align-pro")
    ]
    finalists = sorted(
        (c for c in result.candidates if c["validation_mean"] is not None),
        key=lambda c: -c["validation_mean"],
    )
    final_rows = [
        f"| {c['text'] or '(no change)'} | {c['origin']} | {c['mean']:.3f} | {c['win_rate_over_no_change']:.1%} | "
        f"{c['validation_mean']:.3f} |"
        for c in finalists
    ]
    rung_rows = [
        f"| {i} | {r['candidates']} | {r['prompts']} | {r['best_mean']:.3f} | {r['no_change_mean']:.3f} |"
        for i, r in enumerate(result.rungs)
    ]
    md = [
        "## Experiment: guidance search across prompts (successive halving)",
        "",
        "- command: `python benchmarks/guidance_search.py` (after run_benchmark.py)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f"- search: {len(result.candidates) - 1} candidate texts (the {len(sft_library(budget))} library texts, each "
        "sentence alone, each text extended by a sentence of another) on the SFT bootstrap's "
        f"{result.search_prompts} training prompts, training reward, {args.min_prompts} prompts in the first rung, "
        f"half kept per rung; {len(finalists) - 1} finalists and 'no change' compared on {result.validation_prompts} "
        f"held-out AlpacaEval training prompts; {result.target_calls} target answers generated "
        f"({search_s:.0f} s)",
        f"- chosen: **{result.best or '(no change)'}** (on {result.chosen_on}); the best library text on the "
        f"bootstrap's prompts (`template-picked`): {picked}",
        f"- evaluation: the benchmark's {len(prompts)} held-out prompts, answers capped at {budget['eval_tokens']} "
        f"tokens ({eval_s:.0f} s, {target.stats.calls} new answers)",
        "",
        "| rung | candidates | prompts (cumulative) | best mean reward | no change |",
        "|---|---|---|---|---|",
        *rung_rows,
        "",
        "| finalist | origin | mean reward (search prompts) | vs no change (search prompts) | mean reward (validation) |",
        "|---|---|---|---|---|",
        *final_rows,
        "",
        "| held-out, 100 prompts | vs frozen (independent) | vs frozen (training reward) | mean (independent) "
        "| variance / frozen (independent) | template-searched vs it (independent) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    publish("\n".join(md), ev_dir / "section.md", "guidance-search-experiment")


if __name__ == "__main__":
    main()
