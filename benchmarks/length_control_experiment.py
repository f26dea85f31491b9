"""Experiment: kl-optimum RL with the answer-length effect removed from the reward (``kl_length_control=1``).

Both reward models favour longer answers (docs/benchmarks.md, "length-controlled win rate"): the benchmark's
RL prompter wins mostly by making the target answer at length. This trains the same RL stage from the same SFT
prompter on the same prompts, with only ``kl_length_control`` changed, and evaluates frozen / SFT / align-pro /
align-pro-lc on the benchmark's held-out prompts, target and judges (answers shared through the benchmark's
target cache). Writes rl-kl-lc/ and eval-lc/ beside the benchmark's artifacts (runs/bench) and a section of docs/benchmarks.md.

    python benchmarks/length_control_experiment.py    # after run_benchmark.py; about 60 min here
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmark import (  # noqa: E402
    BUDGETS,
    eval_prompts,
    eval_target,
    judges,
    kl_rl_config,
    machine,
    publish,
    rl_prompt_pools,
    rounds_done,
    sft_library,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out", default="runs/bench", help="run_benchmark.py's artifact folder (standard budget)"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainers.rl_trainer import train_rl

    budget = BUDGETS["standard"]
    out = Path(args.out)
    if not (out / "sft" / "alignpro.json").exists() or not (out / "rl-kl" / "alignpro.json").exists():
        raise SystemExit(
            f"{out} has no finished benchmark (sft/ and rl-kl/): run benchmarks/run_benchmark.py first"
        )
    dst = out / "rl-kl-lc"
    started = time.time()
    _, mixed = rl_prompt_pools(budget)
    if rounds_done(dst, "alignpro.json") < budget["kl_rounds"]:
        cfg = kl_rl_config(out, dst, budget, sft_library(budget), kl_length_control=1.0)
        train_rl(cfg, prompts=mixed[: budget["kl_prompts"] * budget["kl_rounds"]])
    rl_s = time.time() - started

    from alignpro_plugins.evaluation import Evaluator, FrozenAlone, WithPrompter
    from alignpro_plugins.prompter import Prompter

    t = time.time()
    target = eval_target(out, budget)
    scorers = judges(out)
    configs = [
        FrozenAlone(),
        WithPrompter(prompter=Prompter.from_pretrained(out / "sft"), name="sft", description="SFT prompter"),
        WithPrompter(
            prompter=Prompter.from_pretrained(out / "rl-kl"), description="benchmark RL (raw reward)"
        ),
        WithPrompter(
            prompter=Prompter.from_pretrained(dst), name="align-pro-lc", description="RL, length-controlled"
        ),
    ]
    ev = Evaluator(eval_prompts(budget), target, scorers, out_dir=out / "eval-lc", focus="align-pro-lc")
    report = ev.run(configs)
    metrics = [json.loads(line) for line in (dst / "metrics.jsonl").read_text().splitlines()]
    rounds = "\n".join(
        f"| {m['step']} | {m['reward']:.3f} | {m['reward_greedy']:.3f} | {m['answer_words']:.0f} | "
        f"{m['length_slope']:.4f} | {m['alignpro/rewrite_chars']:.0f} |"
        for m in metrics
        if "reward" in m
    )
    section = "\n".join(
        [
            "## Experiment: length-controlled RL reward",
            "",
            "- command: `python benchmarks/length_control_experiment.py`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- machine: {machine()}",
            "- what changed: the benchmark's kl-optimum RL stage with `kl_length_control=1.0` (same SFT prompter, "
            "prompts, K, λ, rounds); every other configuration is the benchmark's own",
            f"- time: RL {rl_s:.0f} s (0 if reused), evaluation {time.time() - t:.0f} s",
            "",
            "RL rounds (training prompts; reward = raw training reward, mean of all samples / of the deployed "
            "rewrite; answer words and the within-prompt slope of reward per answer word)",
            "",
            "| round | reward (samples) | reward (deployed) | answer words | length slope | rewrite chars |",
            "|---|---|---|---|---|---|",
            rounds,
            "",
            report.to_markdown(),
        ]
    )
    publish(section, out / "eval-lc" / "section.md", "length-control-experiment")


if __name__ == "__main__":
    main()
