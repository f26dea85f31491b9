"""Experiment: the whole prompter pipeline trained against a stronger training reward model.

The benchmark's training reward model trains 80 steps (under a fifth of its 3,634 preference pairs) and reaches
0.62 held-out pairwise accuracy; the independent judge, same recipe on the other prompt shard, 0.72. Both the
SFT bootstrap (best-of-K picked by the reward) and the RL stage only see what that reward sees, so this retrains
the reward on the same shard, split and seed for longer, then the SFT and RL stages against it with every other
setting the benchmark's own, and evaluates under the benchmark's (unchanged) independent judge, with answers
shared through the benchmark's target cache. Writes reward-long/, sft-rm2/, rl-kl-rm2/ and eval-rm2/ beside the
benchmark's artifacts and a section of docs/benchmarks.md.

    python benchmarks/reward_strength_experiment.py    # after run_benchmark.py; about 90 min here
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
    bootstrap_prompts,
    eval_prompts,
    eval_target,
    first_tries,
    judges,
    kl_rl_config,
    machine,
    oracle_config,
    oracle_target,
    publish,
    reward_config,
    rl_prompt_pools,
    rounds_done,
    sft_config,
    sft_library,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out", default="runs/bench", help="run_benchmark.py's artifact folder (standard budget)"
    )
    ap.add_argument("--rm-steps", type=int, default=240, help="training steps of the stronger reward model")
    ap.add_argument(
        "--with-oracle",
        action="store_true",
        help="also train the RLHF oracle against the stronger reward (about 35 min more) and evaluate it",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    budget = BUDGETS["standard"]
    out = Path(args.out)
    if (
        not (out / "judge" / "alignpro_reward.json").exists()
        or not (out / "rl-kl" / "alignpro.json").exists()
    ):
        raise SystemExit(
            f"{out} has no finished benchmark (judge/, rl-kl/): run benchmarks/run_benchmark.py first"
        )
    reward, sft, rl, oracle = out / "reward-long", out / "sft-rm2", out / "rl-kl-rm2", out / "oracle-rm2"
    times: dict[str, float] = {}

    t = time.time()
    if not (reward / "alignpro_reward.json").exists():
        from trainers.reward_trainer import train_reward

        train_reward(reward_config(reward, budget, shard=0, max_steps=args.rm_steps, save_steps=80))
        times["reward"] = time.time() - t

    t = time.time()
    if not (sft / "alignpro.json").exists():
        from trainers.sft_trainer import train_sft

        train_sft(sft_config(sft, reward, budget), prompts=bootstrap_prompts(budget))
        times["sft"] = time.time() - t

    t = time.time()
    _, mixed = rl_prompt_pools(budget)
    if rounds_done(rl, "alignpro.json") < budget["kl_rounds"]:
        from trainers.rl_trainer import train_rl

        cfg = kl_rl_config(
            out, rl, budget, sft_library(budget), sft_prompter=str(sft), reward_model=str(reward)
        )
        train_rl(cfg, prompts=mixed[: budget["kl_prompts"] * budget["kl_rounds"]])
        times["rl"] = time.time() - t

    t = time.time()
    if args.with_oracle and rounds_done(oracle, "alignpro_oracle.json") < budget["kl_rounds"]:
        from trainers.oracle_trainer import train_oracle

        train_oracle(
            oracle_config(oracle, reward, budget), prompts=mixed[: budget["kl_prompts"] * budget["kl_rounds"]]
        )
        times["oracle"] = time.time() - t

    from alignpro_plugins.evaluation import Evaluator, Oracle, WithPrompter
    from alignpro_plugins.prompter import Prompter

    t = time.time()
    target = eval_target(out, budget)
    # "reward" is this run's training reward; the independent judge is the benchmark's, unchanged.
    scorers = judges(out, reward)
    trained = Prompter.from_pretrained(rl)
    configs = [
        *first_tries(trained.manifest.mode),
        WithPrompter(prompter=Prompter.from_pretrained(out / "sft"), name="sft", description="benchmark SFT"),
        WithPrompter(
            prompter=Prompter.from_pretrained(out / "rl-kl"),
            name="align-pro-rm80",
            description="benchmark RL",
        ),
        WithPrompter(
            prompter=Prompter.from_pretrained(sft), name="sft-rm2", description="SFT, stronger reward"
        ),
        WithPrompter(prompter=trained, name="align-pro-rm2", description="RL, stronger reward"),
    ]
    if args.with_oracle:
        cache = out / "eval-rm2" / "oracle_cache.jsonl"
        configs.append(Oracle(target=oracle_target(oracle, cache, budget["eval_tokens"])))
    ev = Evaluator(eval_prompts(budget), target, scorers, out_dir=out / "eval-rm2", focus="align-pro-rm2")
    report = ev.run(configs)
    times["evaluation"] = time.time() - t

    meta = {p.name: json.loads((p / "alignpro_reward.json").read_text()) for p in (out / "reward", reward)}
    metrics = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    rounds = "\n".join(
        f"| {m['step']} | {m['reward']:.3f} | {m['reward_greedy']:.3f} | {m['answer_words']:.0f} |"
        for m in metrics
        if "reward" in m
    )
    section = "\n".join(
        [
            "## Experiment: a stronger training reward model",
            "",
            f"- command: `python benchmarks/reward_strength_experiment.py --rm-steps {args.rm_steps}"
            f"{' --with-oracle' if args.with_oracle else ''}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- machine: {machine()}",
            f"- what changed: the training reward model trains {args.rm_steps} steps instead of "
            f"{budget['rm_steps']} (same shard, split, seed, data and recipe); the SFT and RL stages are the "
            "benchmark's, retrained against it (and, with --with-oracle, the RLHF oracle). The independent judge is the benchmark's, unchanged; in the "
            'tables below "reward" is the stronger reward',
            "- held-out pairwise accuracy of the training reward: "
            + ", ".join(
                f"{name} ({m['steps']} steps) {m['heldout_pairwise_accuracy']:.3f} on {m['n_eval_pairs']} pairs"
                for name, m in meta.items()
            ),
            "- stage times (s, only stages run by this invocation): "
            + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
            "",
            "RL rounds (training prompts; stronger reward, mean of all samples / of the deployed rewrite)",
            "",
            "| round | reward (samples) | reward (deployed) | answer words |",
            "|---|---|---|---|",
            rounds,
            "",
            report.to_markdown(),
        ]
    )
    publish(section, out / "eval-rm2" / "section.md", "reward-strength-experiment")


if __name__ == "__main__":
    main()
