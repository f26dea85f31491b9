"""The benchmark's trained prompter and the baselines a user would try first, on more held-out prompts.

The standard benchmark evaluates on 100 prompts (the first 50 of dolly_eval and of self_instruct_eval), where a
win-rate interval is about ±9 points. This evaluates frozen / template / zero-shot / SFT / align-pro from the same
artifacts, target and judges on the first ``--per-set`` prompts of each set (none of them trained on), reusing
the benchmark's cached target answers, and writes eval-wide/ and a section of docs/benchmarks.md.

    python benchmarks/wider_eval.py --per-set 150    # after run_benchmark.py; about 35 min here
"""

from __future__ import annotations

import argparse
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
    first_tries,
    judges,
    machine,
    publish,
    training_prompts,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out", default="runs/bench", help="run_benchmark.py's artifact folder (standard budget)"
    )
    ap.add_argument("--per-set", type=int, default=150, help="prompts from each evaluation set")
    args = ap.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if not (out / "rl-kl" / "alignpro.json").exists():
        raise SystemExit(f"{out} has no finished benchmark (rl-kl/): run benchmarks/run_benchmark.py first")

    from alignpro_plugins.evaluation import Evaluator, WithPrompter
    from alignpro_plugins.prompter import Prompter

    budget = dict(BUDGETS["standard"], eval_per_set=args.per_set)
    # The RL pools exclude every evaluation prompt since 2026-11-24; this keeps the check (0 left out).
    seen = set(training_prompts(budget))
    every = eval_prompts(budget)
    prompts = [x for x in every if x not in seen]
    t = time.time()
    target = eval_target(out, budget)
    scorers = judges(out)
    trained = Prompter.from_pretrained(out / "rl-kl")
    configs = [
        *first_tries(trained.manifest.mode),
        # The RL stage's starting point: whether RL added anything shows head to head on these prompts.
        WithPrompter(prompter=Prompter.from_pretrained(out / "sft"), name="sft", description="SFT prompter"),
        WithPrompter(prompter=trained, description="(ii) Align-Pro prompter (RL: kl-optimum)"),
    ]
    report = Evaluator(prompts, target, scorers, out_dir=out / "eval-wide").run(configs)
    section = "\n".join(
        [
            f"## Wider evaluation: {len(prompts)} held-out prompts",
            "",
            f"- command: `python benchmarks/wider_eval.py --per-set {args.per_set}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- machine: {machine()}",
            f"- what: the standard benchmark's prompter, reward and judge (runs/bench) on the first {args.per_set} "
            "prompts of dolly_eval and of self_instruct_eval (the benchmark's 100 are the first 50 of each); "
            f"left out because the SFT or RL stage trained on them: {len(every) - len(prompts)}; "
            f"target calls {target.stats.calls}, cache hits {target.stats.cache_hits}; {time.time() - t:.0f} s",
            "",
            report.to_markdown(),
        ]
    )
    publish(section, out / "eval-wide" / "section.md", "wider-evaluation")


if __name__ == "__main__":
    main()
