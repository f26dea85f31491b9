"""Reward-model scoring with length-sorted batches against batches in input order.

``RewardModel.score`` pads each batch to its longest (prompt, answer) pair. In input order one long answer pads
a whole batch; sorted by length, each batch pads only to its own longest. Every stage scores with it: the
reward stage's held-out accuracy, the SFT bootstrap, the RL rounds and every evaluation judge. This script
scores the same preference pairs both ways in one run, in alternating order, and checks that the scores agree.

    python -m benchmarks.bench_reward_scoring              # 256 pairs (512 answers), about 1.5 minutes here
    python -m benchmarks.bench_reward_scoring --pairs 64 --no-docs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from alignpro_plugins.data import load_preferences
from alignpro_plugins.rewards import RewardModel, encode_pairs
from benchmarks.run_benchmark import DATA, ROOT, publish, run_lines


@torch.inference_mode()
def input_order_scores(rm: RewardModel, prompts: list[str], answers: list[str]) -> list[float]:
    """The scorer's loop before length sorting: consecutive batches, each padded to its longest."""
    ids = encode_pairs(
        rm.tokenizer, prompts, answers, max_length=rm.max_length, max_prompt_length=rm.max_prompt_length
    )
    pad = rm.tokenizer.pad_token_id or 0
    scores: list[float] = []
    for start in range(0, len(ids), rm.batch_size):
        chunk = ids[start : start + rm.batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
        scores += rm.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=256, help="preference pairs, half from each source")
    ap.add_argument(
        "--reward", default=None, help="reward model folder (default runs/bench/reward, else MiniLM)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true", help="print the section, do not write benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    trained = ROOT / "runs" / "bench" / "reward"
    path = args.reward or (
        str(trained) if (trained / "alignpro_reward.json").exists() else "all-minilm-l6-v2"
    )
    rm = RewardModel(path)
    pairs = [
        p
        for name in ("alpaca_eval_prefs.jsonl.gz", "hh_rlhf_harmless.jsonl.gz")
        for p in load_preferences(str(DATA / name), limit=args.pairs // 2)
    ]
    prompts = [p.prompt for p in pairs for _ in range(2)]
    answers = [a for p in pairs for a in (p.chosen, p.rejected)]
    lengths = sorted(
        len(x)
        for x in encode_pairs(
            rm.tokenizer, prompts, answers, max_length=rm.max_length, max_prompt_length=rm.max_prompt_length
        )
    )
    times: dict[str, list[float]] = {"input order": [], "length-sorted": []}
    out: dict[str, list[float]] = {}
    ways = {
        "input order": lambda: input_order_scores(rm, prompts, answers),
        "length-sorted": lambda: rm(prompts, answers),
    }
    for r in range(args.repeats):
        for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            out[name] = ways[name]()
            times[name].append(time.perf_counter() - t)
    base, new = min(times["input order"]), min(times["length-sorted"])
    diff = max(abs(a - b) for a, b in zip(out["input order"], out["length-sorted"], strict=True))
    section = "\n".join(
        [
            "## Reward-model scoring in length-sorted batches",
            "",
            *run_lines(started),
            f"- reward model: `{Path(path).name if Path(path).exists() else path}` (batch size {rm.batch_size}, "
            f"max length {rm.max_length}); {len(pairs)} preference pairs, the first {args.pairs // 2} of "
            f"alpaca_eval_prefs and of hh_rlhf_harmless, chosen and rejected scored: {len(answers)} answers, "
            f"{lengths[0]}–{lengths[-1]} tokens (median {lengths[len(lengths) // 2]})",
            f"- {args.repeats} timing(s) each, alternating which goes first, the fastest kept",
            "",
            "| batches | seconds | speed-up | largest score difference |",
            "|---|---|---|---|",
            f"| input order (before) | {base:.1f} | 1.00x | — |",
            f"| length-sorted (`RewardModel.score` now) | {new:.1f} | {base / new:.2f}x | {diff:.1e} |",
            "",
            "The scores differ only where padding changes floating-point sums; the order they come back in is the "
            "input order either way.",
        ]
    )
    copy = ROOT / "runs" / "bench-reward-scoring" / "section.md"
    publish(section, copy, "reward-scoring-benchmark", docs=not args.no_docs)


if __name__ == "__main__":
    main()
