"""Length-planned generate calls against the fewest calls, for the frozen target and the prompter.

Batched generation pads every row of a call to the call's longest prompt. Evaluation and training prompts mix
one-line requests with long contexts (dolly_eval's run to 850 tokens), so one long prompt can multiply a call's
prefill. ``plan_batches`` sorts by length and splits where padding costs more than another decode loop. This
script times both on the same prompts in one run, in alternating order, and checks that greedy outputs agree:

- the baseline is the fewest calls (at most ``batch_size`` rows each, shortest first), which is what the target
  did before (and the prompter made one call for all its queries);
- the planned calls are what ``TransformersTarget`` and the prompter's ``GenerationEngine.generate`` do now.

    python -m benchmarks.bench_padding                   # 32 prompts (16 dolly + 16 self-instruct), ~30 min here
    python -m benchmarks.bench_padding --per-set 8 --no-docs
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from alignpro_plugins import batching
from benchmarks.run_benchmark import ROOT, first_eval_prompts, publish, run_lines

FEWEST_CALLS = 1e12  # a call cost so high that the plan is the fewest calls (the baseline)


def with_call_cost(cost: float, fn):
    """fn() with plan_batches' per-call cost set to ``cost``; its wall time and result."""
    saved = batching.DECODE_STEP_COST_TOKENS
    batching.DECODE_STEP_COST_TOKENS = cost
    try:
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out
    finally:
        batching.DECODE_STEP_COST_TOKENS = saved


def compare(
    name: str, fn, lengths: list[int], new_tokens: int, rows: int | None, per_item: int, repeats: int
):
    """Baseline and planned, alternating which goes first; fastest times, call counts, agreeing outputs."""
    planned_cost = batching.DECODE_STEP_COST_TOKENS
    runs: dict[float, list[tuple[float, list]]] = {FEWEST_CALLS: [], planned_cost: []}
    for r in range(repeats):
        for cost in (FEWEST_CALLS, planned_cost)[:: 1 if r % 2 == 0 else -1]:
            runs[cost].append(with_call_cost(cost, fn))

    def plan() -> list[list[int]]:
        return batching.plan_batches(lengths, new_tokens=new_tokens, max_rows=rows, rows_per_item=per_item)

    calls = {cost: len(with_call_cost(cost, plan)[1]) for cost in runs}
    seconds = {cost: min(t for t, _ in rs) for cost, rs in runs.items()}  # the least-disturbed run
    base, planned = runs[FEWEST_CALLS][0][1], runs[planned_cost][0][1]
    agree = sum(a == b for a, b in zip(base, planned, strict=True))
    b, p = seconds[FEWEST_CALLS], seconds[planned_cost]
    return (
        f"| {name} | {len(lengths)} | {calls[FEWEST_CALLS]} | {b:.1f} | {calls[planned_cost]} | {p:.1f} | "
        f"{b / p:.2f}x | {agree}/{len(base)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--per-set", type=int, default=16, help="prompts from each of dolly_eval and self_instruct_eval"
    )
    ap.add_argument(
        "--repeats", type=int, default=2, help="timings of each (alternating order); the fastest is kept"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.targets import TransformersTarget

    prompts = first_eval_prompts(args.per_set)
    t0 = time.time()
    target = TransformersTarget("smollm2-135m-instruct", max_new_tokens=128, batch_size=32)
    texts = [target.format(x) for x in prompts]
    t_len = [len(ids) for ids in target.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    prompter = Prompter.from_base("smollm2-135m-instruct")
    queries = [prompter.format_query(x, prompter.manifest.mode) for x in prompts]
    q_len = [len(ids) for ids in prompter.tokenizer(queries, add_special_tokens=False)["input_ids"]]
    greedy = prompter.manifest.generation
    sampled = replace(greedy, do_sample=True, max_new_tokens=48)

    def rollouts():  # the RL stage's shape: 4 sampled rewrites per prompt, short; seeded so both runs sample alike
        torch.manual_seed(0)
        return prompter.engine.generate(queries, sampled, 4)

    rows = [
        compare(
            "frozen target, greedy, 128 new tokens (evaluation)",
            lambda: target._generate_ended(prompts),
            t_len,
            128,
            32,
            1,
            args.repeats,
        ),
        compare(
            "prompter rewrites, greedy, 64 new tokens",
            lambda: prompter.engine.generate(queries, greedy),
            q_len,
            greedy.max_new_tokens,
            None,
            1,
            args.repeats,
        ),
        compare(
            "prompter rollouts, 4 sampled per prompt, 48 new tokens (RL)",
            rollouts,
            q_len,
            48,
            None,
            4,
            args.repeats,
        ),
    ]
    md = [
        "## Length-planned generate calls (padding)",
        "",
        *run_lines(t0),
        f"- prompts: the first {args.per_set} of dolly_eval and of self_instruct_eval (with context); target "
        f"prompt lengths {min(t_len)}–{max(t_len)} tokens (median {sorted(t_len)[len(t_len) // 2]})",
        f"- baseline: the fewest calls, shortest first (the target's old batching; the prompter made one call); "
        f"planned: `plan_batches` with DECODE_STEP_COST_TOKENS={batching.DECODE_STEP_COST_TOKENS:g}; "
        f"{args.repeats} timing(s) each, alternating which goes first, the fastest kept",
        "",
        "| generation | prompts | baseline calls | baseline s | planned calls | planned s | speed-up | same outputs |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Sampled rollouts draw different random numbers per call, so their outputs differ by construction; greedy "
        "ones may differ only where padding changes floating-point sums.",
    ]
    publish(
        "\n".join(md),
        ROOT / "runs" / "bench-padding" / "section.md",
        "padding-benchmark",
        docs=not args.no_docs,
    )


if __name__ == "__main__":
    main()
