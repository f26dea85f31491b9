"""Retrain the benchmark's SFT stage with the current code and evaluate it, without re-running RL.

For a change to how the SFT stage picks its targets (e.g. the leave-one-out neighbourhood rule): the bootstrap's
answers are all in the SFT stage's cache, so this costs the SFT steps and the new prompter's held-out answers.
The new prompter (`sft-recheck`) is evaluated on the benchmark's 100 held-out prompts beside frozen, the best
fixed text (`template-picked`) and the benchmark's own SFT prompter, under both judges.

    python benchmarks/sft_recheck.py [--out runs/bench]    # after run_benchmark.py; about 10 min here
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    PICKED,
    bootstrap_prompts,
    command_line,
    eval_prompts,
    judges,
    machine,
    picked_template,
    publish,
    rewards_by_config,
    sft_config,
    side_evaluation,
    win_cell,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument("--epochs", type=float, default=None, help="SFT epochs (default: the standard budget's)")
    ap.add_argument(
        "--name", default="sft-recheck", help="folder and configuration name of the retrained prompter"
    )
    args = ap.parse_args()
    out = Path(args.out)
    if not (out / "sft" / "alignpro.json").exists():
        raise SystemExit(f"{out} has no finished SFT stage: run run_benchmark.py first")

    from alignpro_plugins.evaluation import Evaluator, FixedTemplate, FrozenAlone, WithPrompter
    from alignpro_plugins.prompter import Prompter
    from trainers.sft_trainer import AlignProSFTTrainer

    budget = dict(BUDGETS["standard"])
    if args.epochs is not None:
        budget["sft_epochs"] = args.epochs
    name = args.name
    if name in {"sft", "rl-kl", "frozen", "template-picked", "eval", "reward", "judge", "oracle", "guidance"}:
        raise SystemExit(
            f"--name {name!r} is one of the benchmark's own folders or configurations; pick another"
        )
    new_dir = out / name
    marker = new_dir / "recheck.json"  # the epochs this folder was trained with, for the heading of a re-run
    if (new_dir / "alignpro.json").exists() and marker.exists():
        trained = json.loads(marker.read_text())["epochs"]
        if args.epochs is not None and args.epochs != trained:
            raise SystemExit(
                f"{new_dir} was trained with {trained:g} epochs, not {args.epochs:g}: use another --name"
            )
        budget["sft_epochs"] = trained
    new_dir.mkdir(parents=True, exist_ok=True)
    if not (new_dir / "target_cache.jsonl").exists():
        shutil.copy(out / "sft" / "target_cache.jsonl", new_dir / "target_cache.jsonl")
    t0 = time.time()
    if not (new_dir / "alignpro.json").exists():
        trainer = AlignProSFTTrainer(
            sft_config(new_dir, out / "reward", budget), prompts=bootstrap_prompts(budget)
        )
        trainer.train()
        marker.write_text(json.dumps({"epochs": budget["sft_epochs"]}))
    boot = Prompter.from_pretrained(new_dir).manifest.provenance["stages"][-1]["bootstrap"]
    sft_s = time.time() - t0

    prompts = eval_prompts(budget)
    ev_dir, target = side_evaluation(out, budget, f"eval-{name}")
    configs = [
        FrozenAlone(),
        FixedTemplate(template=picked_template(out), name="template-picked", description=PICKED),
        WithPrompter(prompter=Prompter.from_pretrained(out / "sft"), name="sft", description="SFT prompter"),
        WithPrompter(prompter=Prompter.from_pretrained(new_dir), name=name, description="SFT, current code"),
    ]
    t1 = time.time()
    report = Evaluator(prompts, target, judges(out), out_dir=ev_dir, focus=name).run(configs)
    by = rewards_by_config(report.records)
    rewrites = Counter(rec["rewrite"] or "" for rec in report.records if rec["config"] == name)

    def wr(a: str, b: str, judge: str = "independent") -> str:
        return win_cell(by[a, judge], by[b, judge])

    var = statistics.pvariance(by[name, "independent"]) / statistics.pvariance(by["frozen", "independent"])
    top, n_top = rewrites.most_common(1)[0]
    md = [
        f"## Re-check: the SFT stage retrained with the current code (no RL), {budget['sft_epochs']:g} epochs",
        "",
        f"- command: `{command_line()}` (after run_benchmark.py)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; SFT {sft_s:.0f} s, "
        f"evaluation {time.time() - t1:.0f} s",
        f"- bootstrap: neighbourhood {boot.get('neighbours')} (chosen by {boot.get('neighbours_chosen_by')}), "
        f"targets {boot.get('winners')}",
        f"- rewrites on the {len(prompts)} held-out prompts: {len(rewrites)} distinct; the most common on "
        f"{n_top}: {top!r}",
        "",
        f"| independent judge, held-out prompts | {name} | the benchmark's sft |",
        "|---|---|---|",
        f"| vs frozen | {wr(name, 'frozen')} | {wr('sft', 'frozen')} |",
        f"| vs frozen (training reward) | {wr(name, 'frozen', 'reward')} | {wr('sft', 'frozen', 'reward')} |",
        f"| vs template-picked | {wr(name, 'template-picked')} | {wr('sft', 'template-picked')} |",
        f"| head to head | {wr(name, 'sft')} | — |",
        f"| variance / frozen | {var:.2f} | — |",
    ]
    publish("\n".join(md), ev_dir / "section.md", name)


if __name__ == "__main__":
    main()
