"""Distil a guidance search's text into a prompter (SFT stage) and evaluate the prompter on held-out prompts.

The recipe a user follows after `alignpro guidance`: `alignpro sft --templates_from <search folder>` scores the
search's best text beside "no change" on the SFT bootstrap's 128 training prompts (training reward), smooths the
targets over similar prompts (leave-one-out), and trains the LoRA prompter on them. The prompter is then evaluated
on the benchmark's 100 held-out prompts beside frozen and the text itself appended as a fixed template, under both
judges: does the trained prompter keep what the text buys (win rate, and the reward variance across prompts)?

    python benchmarks/distil_guidance.py --guidance runs/bench/guidance-mean_minus_std --name sft-risk-averse
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    against_frozen_cells,
    bootstrap_prompts,
    command_line,
    eval_prompts,
    judges,
    machine,
    publish,
    rewards_by_config,
    sft_config,
    side_evaluation,
    win_cell,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder (reward/, judge/)")
    ap.add_argument("--guidance", required=True, help="a guidance search's output folder")
    ap.add_argument("--name", default="sft-distilled", help="folder and configuration name of the prompter")
    ap.add_argument("--epochs", type=float, default=None, help="SFT epochs (default: the standard budget's)")
    ap.add_argument("--seed-eval", default="eval-objectives", help="evaluation folder whose answers to reuse")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out, searched = Path(args.out), Path(args.guidance)

    from alignpro_plugins.evaluation import Evaluator, FixedTemplate, FrozenAlone, WithPrompter
    from alignpro_plugins.prompter import Prompter
    from trainers.guidance_search_trainer import GuidanceSearchResult
    from trainers.sft_trainer import AlignProSFTTrainer

    budget = dict(BUDGETS["standard"])
    if args.epochs is not None:
        budget["sft_epochs"] = args.epochs
    text = GuidanceSearchResult.load(searched).best
    if not text:
        raise SystemExit(f"{searched}: the search chose 'no change'; there is no text to distil")
    new_dir = out / args.name
    new_dir.mkdir(parents=True, exist_ok=True)
    if not (new_dir / "target_cache.jsonl").exists() and (searched / "target_cache.jsonl").exists():
        # The search answered the text and "no change" on these prompts with the same target settings.
        shutil.copy(searched / "target_cache.jsonl", new_dir / "target_cache.jsonl")
    t0 = time.time()
    if not (new_dir / "alignpro.json").exists():
        cfg = sft_config(
            new_dir, out / "reward", budget, templates=[], templates_from=str(searched), templates_from_top=1
        )
        AlignProSFTTrainer(cfg, prompts=bootstrap_prompts(budget)).train()
    sft_s = time.time() - t0
    stage = Prompter.from_pretrained(new_dir).manifest.provenance["stages"][-1]
    boot, fit = stage.get("bootstrap", {}), stage.get("fit_check") or {}

    seed = out / args.seed_eval
    ev_dir = out / f"eval-{args.name}"
    ev_dir.mkdir(parents=True, exist_ok=True)
    if (seed / "target_cache.jsonl").exists() and not (ev_dir / "target_cache.jsonl").exists():
        shutil.copy(seed / "target_cache.jsonl", ev_dir / "target_cache.jsonl")
    ev_dir, target = side_evaluation(out, budget, ev_dir.name)
    prompts = eval_prompts(budget)
    configs = [
        FrozenAlone(),
        FixedTemplate(template=text, name="text", description="the searched text, appended"),
        WithPrompter(
            prompter=Prompter.from_pretrained(new_dir), name=args.name, description="SFT on the text"
        ),
    ]
    t1 = time.time()
    report = Evaluator(prompts, target, judges(out), out_dir=ev_dir, focus=args.name).run(configs)
    eval_s = time.time() - t1
    by = rewards_by_config(report.records)
    rewrites = Counter(rec["rewrite"] or "" for rec in report.records if rec["config"] == args.name)

    rows = [
        f"| {name} | {against_frozen_cells(by, name, 'independent')} | {against_frozen_cells(by, name, 'reward')} |"
        for name in ("text", args.name)
    ]
    md = [
        f"## Experiment: the searched text distilled into a prompter ({args.name})",
        "",
        f"- command: `{command_line()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; SFT stage "
        f"{sft_s:.0f} s ({budget['sft_epochs']:g} epochs), evaluation {eval_s:.0f} s",
        f"- text ({searched}): {text}",
        f"- SFT targets: {boot.get('winners')} (neighbourhood {boot.get('neighbours')}, chosen by "
        f"{boot.get('neighbours_chosen_by')}); fit check: the prompter emits its target on "
        f"{fit.get('reproduced', float('nan')):.0%} of {fit.get('prompts', 0)} training prompts",
        f"- held-out rewrites: {len(rewrites)} distinct on {len(prompts)} prompts; the text itself on "
        f"{sum(n for r, n in rewrites.items() if r.strip() == text.strip())}",
        "",
        "| against frozen, 100 held-out prompts | win (independent) | mean gain (independent) | variance / frozen "
        "(independent) | win (reward) | mean gain (reward) | variance / frozen (reward) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Head to head, the prompter against the text: {win_cell(by[args.name, 'independent'], by['text', 'independent'])} "
        "(independent judge).",
    ]
    publish("\n".join(md), ev_dir / "section.md", f"distil-{args.name}")


if __name__ == "__main__":
    main()
