"""Compile a DSPy program with AlignProOptimizer: learn to rewrite its questions for a frozen local LM.

The program is ``dspy.Predict("question -> answer")`` answered by SmolLM2-135M-Instruct (a local, frozen LM).
Training questions are BPO prompt-pair instructions; a few Dolly evaluation instructions are the valset (they
are evaluation prompts: never trained on). The metric is a reward model's score of (question, answer), squashed
to [0, 1], or, without ``--reward-model``, a simple topical-coverage metric.

    python examples/dspy_compile.py --smoke                      # seconds: tiny random models, one step
    python examples/dspy_compile.py --reward-model runs/reward --prompter runs/sft --max-steps 20

Prints the valset metric before and after; the trained prompter and the program state go to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

# The public data sets sit beside the checkout (../shared/data); ALIGNPRO_SHARED_DATA overrides (CI layouts).
DEFAULT_DATA = Path(os.environ.get("ALIGNPRO_SHARED_DATA") or ROOT.parent / "shared" / "data")


def load_questions(path: Path, n: int, seed: int) -> list[str]:
    """Instructions without a context field (the program has a single question input)."""
    rows = json.loads(path.read_text())
    questions = list(
        dict.fromkeys(r["instruction"].strip() for r in rows if not (r.get("context") or "").strip())
    )
    random.Random(seed).shuffle(questions)
    return questions[:n]


WORD = re.compile(r"[a-z]{4,}")


def coverage_metric(example, pred, trace=None) -> float:
    """Share of the question's content words (4+ letters) that the answer mentions: a crude relevance proxy."""
    words = set(WORD.findall(example.question.lower()))
    answer = set(WORD.findall(str(pred.answer).lower()))
    return len(words & answer) / len(words) if words else float(bool(answer))


def reward_model_metric(path: str):
    """metric(example, pred) = sigmoid(r(question, answer)) with a reward model (e.g. `alignpro reward` output)."""
    from alignpro_plugins.rewards import RewardModel

    model = RewardModel(path)

    def metric(example, pred, trace=None) -> float:
        (score,) = model.score([example.question], [str(pred.answer)])
        return 1.0 / (1.0 + math.exp(-score))

    return metric


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny random models, 4 train / 2 val questions, one step"
    )
    p.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA, help="folder with bpo_prompt_pairs.json etc."
    )
    p.add_argument(
        "--prompter", default="smollm2-135m-instruct", help="prompter base name or artifact folder"
    )
    p.add_argument("--target-lm", default="smollm2-135m-instruct", help="the program's (frozen) LM")
    p.add_argument(
        "--reward-model", default=None, help="reward model for the metric (default: coverage metric)"
    )
    p.add_argument("--mode", choices=("augment", "rewrite"), default=None)
    p.add_argument("--train-size", type=int, default=32)
    p.add_argument("--val-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="rewrites per RL step")
    p.add_argument("--num-generations", type=int, default=2, help="rewrites per question (the GRPO group)")
    p.add_argument("--max-completion-length", type=int, default=48, help="rewrite length cap during RL")
    p.add_argument("--answer-tokens", type=int, default=96, help="answer length cap of the program's LM")
    p.add_argument(
        "--output-dir", type=Path, default=None, help="default: runs/dspy-compile (smoke: a temp dir)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.train_size, args.val_size, args.max_steps = min(args.train_size, 4), min(args.val_size, 2), 1
        args.batch_size, args.num_generations, args.max_completion_length, args.answer_tokens = 2, 2, 6, 8
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "dspy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)  # the machine is shared: one thread per process is usually fastest
    import dspy

    from alignpro_plugins.dspy import (
        AlignProModule,
        AlignProOptimizer,
        LocalTransformersLM,
        SimpleFieldAdapter,
    )

    output_dir = args.output_dir or (
        Path(tempfile.mkdtemp(prefix="dspy-compile-")) if args.smoke else ROOT / "runs" / "dspy-compile"
    )
    prompter, target = args.prompter, args.target_lm
    if args.smoke:
        from alignpro_plugins.testing import build_tiny_causal_lm

        # One tiny random model plays both roles; only the wiring is exercised.
        prompter = target = build_tiny_causal_lm(output_dir / "tiny-llama")

    train_q = load_questions(args.data_dir / "bpo_prompt_pairs.json", args.train_size, args.seed)
    val_q = load_questions(args.data_dir / "dolly_eval.json", args.val_size, args.seed)
    trainset = [dspy.Example(question=q).with_inputs("question") for q in train_q]
    valset = [dspy.Example(question=q).with_inputs("question") for q in val_q]
    metric = reward_model_metric(args.reward_model) if args.reward_model else coverage_metric

    lm = LocalTransformersLM(target, max_tokens=args.answer_tokens)
    dspy.configure(lm=lm, adapter=SimpleFieldAdapter())
    student = dspy.Predict("question -> answer")
    optimizer = AlignProOptimizer(
        metric,
        prompter=prompter,
        mode=args.mode,
        output_dir=str(output_dir / "prompter"),
        rl_config={
            "max_steps": args.max_steps,
            "per_device_train_batch_size": args.batch_size,
            "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length,
            "save_steps": max(args.max_steps, 1),
            "seed": args.seed,
        },
    )
    start = time.perf_counter()
    compiled = optimizer.compile(student, trainset=trainset, valset=valset)
    state = compiled.save(output_dir / "program.json")
    # Loading checks the prompter artifact's hash: the saved program is usable as is.
    AlignProModule(
        dspy.Predict("question -> answer"), compiled.prompter, prompter_path=compiled.prompter_path
    ).load(state)

    print(f"train questions: {len(trainset)}  valset questions: {len(valset)}")
    print(f"valset metric before: {optimizer.valset_score_before:.4f}")
    print(f"valset metric after:  {optimizer.valset_score_after:.4f}")
    print(f"prompter artifact: {compiled.prompter_path}")
    print(f"program state: {state}")
    print(f"compile time: {time.perf_counter() - start:.1f}s")
    return optimizer.results


if __name__ == "__main__":
    main()
