"""Where best-of-K's headroom comes from: choosing an input per prompt, with or without its answer in hand.

Reads the benchmark's evaluation report (eval/results.json) (no new target calls, only sentence embeddings of the prompts) and, for a
set of fixed inputs (by default the bare prompt, the default instruction and the best fixed text), measures on the
held-out prompts under the independent judge:

- *answer in hand*: per prompt, the input whose answer the training reward scores highest (reranking at inference:
  one target call per input);
- *prompt only*: the same choice made before any answer exists, from the prompt alone: the input the training
  reward prefers over the prompt's N most similar *other* held-out prompts (leave-one-out). This is what a
  prompter that learns "which text suits which prompt" could reach with this much data; N = all is one text
  for every prompt;
- *judge's own pick*: the input the independent judge itself prefers (a ceiling no deployable method reaches).

The variance column is the reward variance across prompts relative to the frozen model's (issue 5 asks for < 1).

    python benchmarks/selection_headroom.py [--out runs/bench]    # after run_benchmark.py; under a minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    command_line,
    labelled,
    machine,
    publish,
    rewards_by_config,
    win_cell,
)

DEFAULT_INPUTS = ("frozen", "template", "template-picked")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument(
        "--inputs", nargs="+", default=list(DEFAULT_INPUTS), help="configurations to choose among"
    )
    ap.add_argument(
        "--eval-dirs",
        nargs="+",
        default=["eval"],
        help="evaluation folders under --out whose reports to join (e.g. eval eval-gated-confirm: the benchmark's "
        "prompts and a confirmation's); each must hold every input on its prompts",
    )
    ap.add_argument(
        "--label", default="", help="names this run's section, so another run keeps the default one"
    )
    args = ap.parse_args()

    import json

    import torch

    from alignpro_plugins.embeddings import Embedder
    from trainers.bootstrap_labels import NEIGHBOUR_GRID, leave_one_out_rewards, neighbour_order

    records: list[dict] = []
    for name in args.eval_dirs:
        # results.json holds the finished report's rows; records.jsonl is the append-only resume log.
        records_path = Path(args.out) / name / "results.json"
        if not records_path.exists():
            raise SystemExit(
                f"{records_path} does not exist: run run_benchmark.py (or the confirmation) first"
            )
        rows = json.loads(records_path.read_text())["records"]
        # Positions continue across reports, so each configuration's rewards stay in one shared prompt order.
        offset = max((r["idx"] for r in records), default=-1) + 1
        records += [r | {"idx": r["idx"] + offset} for r in rows if r["config"] in (*args.inputs, "frozen")]
    by = rewards_by_config(records)
    missing = [
        c for c in args.inputs if len(by.get((c, "independent"), [])) != len(by["frozen", "independent"])
    ]
    if missing:
        have = sorted({c for c, _ in by})
        raise SystemExit(
            f"{missing} are not on every prompt of {args.eval_dirs} under {args.out}; they have {have}"
        )
    prompts = [r["prompt"] for r in sorted(records, key=lambda r: r["idx"]) if r["config"] == "frozen"]
    train = torch.tensor([by[c, "reward"] for c in args.inputs]).T  # prompts × inputs
    judge = torch.tensor([by[c, "independent"] for c in args.inputs]).T
    frozen = by["frozen", "independent"]
    n = len(prompts)

    def row(label: str, picked: list[float], calls: str) -> str:
        var = statistics.pvariance(picked) / statistics.pvariance(frozen)
        return (
            f"| {label} | {win_cell(picked, frozen)} | {statistics.mean(picked):+.3f} | {var:.2f} | {calls} |"
        )

    in_hand = judge.gather(1, train.argmax(1, keepdim=True)).squeeze(1).tolist()
    ceiling = judge.max(1).values.tolist()
    order = neighbour_order(Embedder().embed(prompts))
    sizes = sorted({min(k, n - 1) for k in NEIGHBOUR_GRID})
    title, key = labelled(
        "## Analysis: where best-of-K's headroom comes from", "selection-headroom", args.label
    )
    lines = [
        title,
        "",
        f"- command: `{command_line()}` (reads the evaluation's report; no new target calls)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f"- {n} held-out prompts; inputs chosen among: {', '.join(args.inputs)}; scored by the independent judge",
        "",
        "| choice per prompt | vs frozen | mean | variance / frozen | target calls per prompt |",
        "|---|---|---|---|---|",
        *[row(f"always `{c}`", by[c, "independent"], "1") for c in args.inputs],
        row("answer in hand: the training reward's pick among the answers", in_hand, str(len(args.inputs))),
        *[
            row(
                f"prompt only: the training reward's pick over all {k} other prompts (in effect one input for all)"
                if k == n - 1
                else f"prompt only: the training reward's pick over the {k} most similar other prompts",
                leave_one_out_rewards(train, order, k, judge).tolist(),
                "1",
            )
            for k in sizes
        ],
        row("the independent judge's own pick (ceiling)", ceiling, str(len(args.inputs))),
    ]
    publish("\n".join(lines), Path(args.out) / args.eval_dirs[-1] / f"{key}.md", key)


if __name__ == "__main__":
    main()
