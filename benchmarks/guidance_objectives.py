"""Guidance search under each objective (mean, win rate, risk-averse), the chosen texts on held-out prompts.

Issue 5 asks for lower reward variance than the frozen model alone, and every configuration measured so far that
gains raises it. `alignpro guidance --objective` ranks texts by their mean reward (the default), by their win rate
against "no change", or by mean minus `risk_aversion` x standard deviation across prompts. This script runs the
search once per objective on the SFT bootstrap's 128 training prompts (training reward; finalists compared on the
64 held-out AlpacaEval validation prompts; the searches share one answer cache), then appends each chosen text to
the benchmark's 100 held-out evaluation prompts, beside frozen and the default fixed instruction, under both judges.
`--validation-from bpo` compares the finalists on BPO instructions the search never saw instead.
It also reports the search's own frontier: how many texts gained over "no change" with a lower variance.

    python benchmarks/guidance_objectives.py [--out runs/bench]   # trains the two reward models if missing
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    against_frozen_cells,
    bpo_validation_prompts,
    command_line,
    eval_prompts,
    judges,
    machine,
    publish,
    rewards_by_config,
    run_guidance_search,
    side_evaluation,
    train_reward_models,
)

OBJECTIVES = ("mean", "win_rate", "mean_minus_std")


def frontier(result, min_prompts: int) -> tuple[int, int, int]:
    """(texts scored on at least min_prompts search prompts, of them with a gain, with a gain and lower variance)."""
    rows = [c for c in result.candidates if c["text"] and c["prompts_scored"] >= min_prompts]
    gain = [c for c in rows if c["gain_over_no_change"] > 0]
    calm = [c for c in gain if (c["variance_ratio_over_no_change"] or 9) < 1]
    return len(rows), len(gain), len(calm)


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def validation_win_rates(results: dict) -> dict[str, float]:
    """Text -> its win rate against "no change" on the validation prompts (the same prompts in every search):
    recorded by searches since `validation_win_rate_over_no_change`, and as the win_rate objective's score."""
    out: dict[str, float] = {}
    for r in results.values():
        for c in r.candidates:
            w = c.get("validation_win_rate_over_no_change")
            if w is None and r.provenance.get("objective") == "win_rate":
                w = c.get("validation_score")
            if w is not None:
                out[c["text"]] = w
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument("--risk-aversion", type=float, default=1.0)
    ap.add_argument(
        "--validation-prompts",
        type=int,
        default=None,
        help="finalists' validation prompts (default: the standard budget's 64 AlpacaEval prompts; 0: pick on "
        "the search prompts, where every answer is already cached)",
    )
    ap.add_argument(
        "--validation-from",
        choices=("alpaca", "bpo"),
        default="alpaca",
        help="where the finalists' validation prompts come from: the RL stage's held-out AlpacaEval prompts, or "
        "BPO instructions the search never saw (the users' kind of prompt, like the search's own)",
    )
    ap.add_argument(
        "--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES), help="the searches to run"
    )
    ap.add_argument(
        "--seed-texts",
        default=None,
        help="a text file, one guidance text per line, searched instead of the SFT guidance library",
    )
    ap.add_argument(
        "--no-recombine",
        action="store_true",
        help="search the seed texts only, not their sentence recombinations",
    )
    ap.add_argument("--tag", default="", help="appended to the folder names and the docs section key")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    budget = BUDGETS["standard"]
    times = train_reward_models(out, budget)

    results = {}
    shared_cache = out / "guidance-objectives-cache.jsonl"
    n_val = budget["kl_val_prompts"] if args.validation_prompts is None else args.validation_prompts
    suffix = "" if n_val == budget["kl_val_prompts"] else f"-val{n_val}"
    validation = bpo_validation_prompts(n_val) if args.validation_from == "bpo" else None
    if args.validation_from == "bpo" and n_val:
        suffix += "-bpo"
    source = "BPO" if validation is not None else "AlpacaEval"
    suffix += f"-{args.tag}" if args.tag else ""
    search_kw: dict = {"recombine": not args.no_recombine}
    if args.seed_texts:
        lines = Path(args.seed_texts).read_text(encoding="utf-8").splitlines()
        search_kw["seed_texts"] = [t.strip() for t in lines if t.strip() and not t.startswith("#")]
    for objective in args.objectives:
        folder = out / f"guidance-{objective}{suffix}"
        folder.mkdir(parents=True, exist_ok=True)
        # Same target, prompts and answer settings: each search reuses the answers the others generated.
        if shared_cache.exists():
            shutil.copy(shared_cache, folder / "target_cache.jsonl")
        t = time.time()
        results[objective] = run_guidance_search(
            out,
            budget,
            output_dir=str(folder),
            objective=objective,
            risk_aversion=args.risk_aversion,
            validation_prompts=n_val,
            validation=validation,
            **search_kw,
        )
        times[f"search ({objective})"] = time.time() - t
        shutil.copy(folder / "target_cache.jsonl", shared_cache)

    from alignpro_plugins.evaluation import Evaluator, FixedTemplate, FrozenAlone

    prompts = eval_prompts(budget)
    ev_dir, target = side_evaluation(out, budget, "eval-objectives")  # shared by the variants: answers reused
    configs = [FrozenAlone(), FixedTemplate()]
    by_text: dict[str, list[str]] = {}
    for objective, result in results.items():
        if result.best:
            by_text.setdefault(result.best, []).append(objective)
    named: dict[str, list[str]] = {}  # configuration name -> the objectives that chose its text
    for text, objectives in by_text.items():
        name = "searched-" + objectives[0].replace("_", "-") + suffix
        named[name] = objectives
        configs.append(
            FixedTemplate(template=text, name=name, description="objective " + ", ".join(objectives))
        )
    t = time.time()
    report = Evaluator(prompts, target, judges(out), out_dir=ev_dir).run(configs)
    times["evaluation"] = time.time() - t
    by = rewards_by_config(report.records)

    def row(name: str, chosen_by: str) -> str:
        cells = [against_frozen_cells(by, name, judge) for judge in ("independent", "reward")]
        return f"| {name} | {chosen_by} | " + " | ".join(cells) + " |"

    frontier_lines: list[str] = []
    held = [row("template", "the default fixed instruction")] + [
        row(n, "objective " + ", ".join(o)) for n, o in named.items()
    ]
    search_rows = []
    val_wins = validation_win_rates(results) if n_val else {}
    for objective, r in results.items():
        ref = next(x for x in r.candidates if not x["text"])
        full = max(c["prompts_scored"] for c in r.candidates if c["text"])
        finalists = [c for c in r.candidates if c["text"] and c["prompts_scored"] == full]
        validated = [c for c in finalists if c["validation_score"] is not None]
        if n_val:  # texts that reached the last rung but not validation (halved after it) are not listed
            finalists = validated
        finalists.sort(key=lambda c: -(c["validation_score"] if n_val else c["score"]))
        for c in [*finalists, ref]:
            val = (
                f"{c['validation_mean'] - ref['validation_mean']:+.3f} | "
                f"{pct(val_wins.get(c['text']))} | {c['validation_variance_ratio']:.2f}"
                if n_val
                else "— | — | —"
            )
            search_rows.append(
                f"| {objective} | {c['text'] or '(no change)'} | {c['gain_over_no_change']:+.3f} | "
                f"{c['win_rate_over_no_change']:.1%} | {c['variance_ratio_over_no_change'] or 1:.2f} | {val} | "
                f"{'**chosen**' if c['text'] == r.best else ''} |"
            )
        n, g, calm = frontier(r, 64)
        frontier_lines.append(
            f'- {objective}: of the {n} texts scored on at least 64 search prompts, {g} gained over "no change" '
            f"and {calm} of those with a lower variance"
        )
    md = [
        "## Experiment: guidance search objectives (mean, win rate, risk-averse)"
        + (
            ""
            if not suffix
            else f", finalists picked on {f'{n_val} {source} validation prompts' if n_val else 'the search prompts'}"
        )
        + (f" ({args.tag})" if args.tag else ""),
        "",
        f"- command: `{command_line()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        "- search: "
        + (
            f"the {len(search_kw['seed_texts'])} texts of {args.seed_texts}"
            if args.seed_texts
            else "the guidance library"
        )
        + (" and their recombinations" if not args.no_recombine else " (no recombinations)")
        + " on the SFT bootstrap's 128 training prompts, "
        f"training reward, successive halving from {budget['guidance_min_prompts']} prompts, "
        + (
            f"finalists compared on {n_val} held-out {source} validation prompts"
            if n_val
            else "the winner picked on the search prompts (no validation prompts)"
        )
        + f"; `mean_minus_std` with risk_aversion "
        f"{args.risk_aversion}",
        f"- evaluation: the benchmark's {len(prompts)} held-out prompts (50 dolly + 50 self-instruct), answers "
        f"capped at {budget['eval_tokens']} tokens, both judges; {target.stats.calls} new answers",
        "- times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        "",
        "Finalists of each search (training reward; search = the 128 bootstrap prompts"
        + (f", validation = the held-out {source} prompts" if n_val else "")
        + '), each against "no change" on the same prompts:',
        "",
        "| objective | text | gain (search) | win rate (search) | variance ratio (search) | gain (validation) | "
        "win rate (validation) | variance ratio (validation) | |",
        "|---|---|---|---|---|---|---|---|---|",
        *search_rows,
        "",
        *frontier_lines,
        "",
        "On the 100 held-out prompts, against frozen:",
        "",
        "| configuration | chosen by | win (independent) | mean gain (independent) | variance / frozen "
        "(independent) | win (reward) | mean gain (reward) | variance / frozen (reward) |",
        "|---|---|---|---|---|---|---|---|",
        *held,
    ]
    publish("\n".join(md), ev_dir / f"section{suffix}.md", f"guidance-objectives-experiment{suffix}")


if __name__ == "__main__":
    main()
