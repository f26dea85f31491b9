"""Guidance search under each objective (mean, win rate, risk-averse), the chosen texts on held-out prompts.

Issue 5 asks for lower reward variance than the frozen model alone, and every configuration measured so far that
gains raises it. `alignpro guidance --objective` ranks texts by their mean reward (the default), by their win rate
against "no change", or by mean minus `risk_aversion` x standard deviation across prompts. This script runs the
search once per objective on the SFT bootstrap's 128 training prompts (training reward; finalists compared on the
64 held-out AlpacaEval validation prompts; the searches share one answer cache), then appends each chosen text to
the benchmark's 100 held-out evaluation prompts, beside frozen and the default fixed instruction, under both judges.
It also reports the search's own frontier: how many texts gained over "no change" with a lower variance.

    python benchmarks/guidance_objectives.py [--out runs/bench]   # trains the two reward models if missing
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    eval_prompts,
    judges,
    machine,
    publish,
    rewards_by_config,
    run_guidance_search,
    side_evaluation,
    train_reward_models,
    win_cell,
)

OBJECTIVES = ("mean", "win_rate", "mean_minus_std")


def frontier(result, min_prompts: int) -> tuple[int, int, int]:
    """(texts scored on at least min_prompts search prompts, of them with a gain, with a gain and lower variance)."""
    rows = [c for c in result.candidates if c["text"] and c["prompts_scored"] >= min_prompts]
    gain = [c for c in rows if c["gain_over_no_change"] > 0]
    calm = [c for c in gain if (c["variance_ratio_over_no_change"] or 9) < 1]
    return len(rows), len(gain), len(calm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument("--risk-aversion", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    budget = BUDGETS["standard"]
    times = train_reward_models(out, budget)

    results = {}
    shared_cache = out / "guidance-objectives-cache.jsonl"
    for objective in OBJECTIVES:
        folder = out / f"guidance-{objective}"
        folder.mkdir(parents=True, exist_ok=True)
        # Same target, prompts and answer settings: each search reuses the answers the others generated.
        if shared_cache.exists():
            shutil.copy(shared_cache, folder / "target_cache.jsonl")
        t = time.time()
        results[objective] = run_guidance_search(
            out, budget, output_dir=str(folder), objective=objective, risk_aversion=args.risk_aversion
        )
        times[f"search ({objective})"] = time.time() - t
        shutil.copy(folder / "target_cache.jsonl", shared_cache)

    from alignpro_plugins.evaluation import Evaluator, FixedTemplate, FrozenAlone
    from alignpro_plugins.stats import variance_ratio

    prompts = eval_prompts(budget)
    ev_dir, target = side_evaluation(out, budget, "eval-objectives")
    configs = [FrozenAlone(), FixedTemplate()]
    by_text: dict[str, list[str]] = {}
    for objective, result in results.items():
        if result.best:
            by_text.setdefault(result.best, []).append(objective)
    named: dict[str, list[str]] = {}  # configuration name -> the objectives that chose its text
    for text, objectives in by_text.items():
        name = "searched-" + objectives[0].replace("_", "-")
        named[name] = objectives
        configs.append(
            FixedTemplate(template=text, name=name, description="objective " + ", ".join(objectives))
        )
    t = time.time()
    report = Evaluator(prompts, target, judges(out), out_dir=ev_dir).run(configs)
    times["evaluation"] = time.time() - t
    by = rewards_by_config(report.records)

    def var_ratio(a: str, judge: str) -> str:
        v = variance_ratio(by[a, judge], by["frozen", judge])
        return f"{v['ratio']:.2f} [{v['ci_low']:.2f}–{v['ci_high']:.2f}]"

    def row(name: str, chosen_by: str) -> str:
        cells = []
        for judge in ("independent", "reward"):
            cells += [
                win_cell(by[name, judge], by["frozen", judge]),
                f"{statistics.fmean(by[name, judge]) - statistics.fmean(by['frozen', judge]):+.3f}",
                var_ratio(name, judge),
            ]
        return f"| {name} | {chosen_by} | " + " | ".join(cells) + " |"

    held = [row("template", "the default fixed instruction")] + [
        row(n, "objective " + ", ".join(o)) for n, o in named.items()
    ]
    search_rows = []
    for objective, r in results.items():
        c = next(c for c in r.candidates if c["text"] == r.best) if r.best else None
        n, g, calm = frontier(r, 64)
        search_rows.append(
            f"| {objective} | {r.best or '(no change)'} | "
            + (
                f"{c['gain_over_no_change']:+.3f} | {c['variance_ratio_over_no_change']:.2f} | "
                f"{c['validation_mean'] - next(x for x in r.candidates if not x['text'])['validation_mean']:+.3f} | "
                f"{c['validation_variance_ratio']:.2f}"
                if c
                else "— | — | — | —"
            )
            + f" | {g}/{n}; {calm} |"
        )
    md = [
        "## Experiment: guidance search objectives (mean, win rate, risk-averse)",
        "",
        "- command: `python benchmarks/guidance_objectives.py`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f"- search: the guidance library and its recombinations on the SFT bootstrap's 128 training prompts, "
        f"training reward, successive halving from {budget['guidance_min_prompts']} prompts, finalists compared on "
        f"{budget['kl_val_prompts']} held-out AlpacaEval validation prompts; `mean_minus_std` with risk_aversion "
        f"{args.risk_aversion}",
        f"- evaluation: the benchmark's {len(prompts)} held-out prompts (50 dolly + 50 self-instruct), answers "
        f"capped at {budget['eval_tokens']} tokens, both judges; {target.stats.calls} new answers",
        "- times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        "",
        "On the search's own prompts (training reward): the chosen text's gain and variance ratio over \"no change\"; "
        "the last column counts the texts scored on at least 64 search prompts that gained, and of those how many "
        'had a lower variance than "no change".',
        "",
        "| objective | chosen text | gain (search) | variance ratio (search) | gain (validation) | "
        "variance ratio (validation) | texts that gained / scored; of them with lower variance |",
        "|---|---|---|---|---|---|---|",
        *search_rows,
        "",
        "On the 100 held-out prompts, against frozen:",
        "",
        "| configuration | chosen by | win (independent) | mean gain (independent) | variance / frozen "
        "(independent) | win (reward) | mean gain (reward) | variance / frozen (reward) |",
        "|---|---|---|---|---|---|---|---|",
        *held,
    ]
    publish("\n".join(md), ev_dir / "section.md", "guidance-objectives-experiment")


if __name__ == "__main__":
    main()
