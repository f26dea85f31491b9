"""The deployment modes on held-out prompts: the retry gate and rerank beside the prompter alone.

A trained prompter (default: the standard benchmark's, ``runs/bench/rl-kl``) is evaluated on held-out prompts
under both judges, beside frozen, the default instruction and the untrained prompter, together with the ways to
deploy it that ask the frozen target more than once and let the training reward keep the better answer:

- ``gated-retry``: x first; where the training reward scores that answer below a threshold, the rewrite too. The
  threshold is a cost budget, ``--retry-share`` (default 0.5) of the frozen answers to the 64 held-out AlpacaEval
  validation prompts scored lowest; no evaluation prompt sets it. Shares 0.25 and 0.75 are reported as a sweep.
- ``rerank``: x and the rewrite both answered (2 target calls); ``rerank-3`` also x with the default instruction
  (3 calls); ``rerank-template``: x and x with the default instruction, no prompter (2 calls).
- ``best-of-2`` and ``best-of-3``: the frozen model sampled 2 or 3 times on x itself, the training reward keeps the
  best: the plain way to spend as many target calls, which every mode above is compared with at equal calls.

The independent judge never picks anything; for each mode that chooses, the table says how often the training
reward agrees with it on the answers it chose between. Every table gives target calls per prompt, every win rate
its win at equal answer length, and the answer length. ``--offset N`` evaluates a slice of prompts the standard benchmark never saw (a
confirmation), and ``--pool-with`` joins earlier confirmation folders into one paired table.

    python -m benchmarks.gated_retry --prompter runs/bench/rl-kl                        # the benchmark's 100 prompts
    python -m benchmarks.gated_retry --prompter runs/bench/rl-kl --offset 50 --per-set 100 --label 'my run'

Its section goes to docs/benchmarks-history.md (under a key from --label) and <out>/<eval-dir>/section.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from statistics import fmean

import torch

from alignpro_plugins.data import load_prompts
from alignpro_plugins.eval_report import (
    ANSWER_WORDS,
    answer_words,
    equal_calls_lines,
    outputs_lines,
    scores_by_config,
    selection_lines,
    win_cells,
)
from alignpro_plugins.evaluation import Evaluator, WithPrompter, WithRetryGate, retry_threshold
from alignpro_plugins.stats import variance_ratio
from benchmarks.run_benchmark import (
    BUDGETS,
    DATA,
    EVAL_SETS,
    HISTORY_PAGE,
    align_pro_description,
    command_line,
    eval_prompts,
    first_tries,
    frozen_validation_scores,
    judges,
    machine,
    publish,
    reranks,
    sampling_baselines,
    side_evaluation,
    train_reward_models,
    training_prompts,
    validation_prompts,
)

SWEEP = (0.25, 0.5, 0.75)


def seeded(out: Path, name: str, seeds: list[str]) -> Path:
    """An evaluation folder whose target cache starts as the given folders' caches (same target settings)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "target_cache.jsonl"
    if not cache.exists():
        with cache.open("w") as dst:
            for seed in seeds:
                src = out / seed / "target_cache.jsonl"
                if not src.exists():
                    logging.warning(
                        "--seed-caches %s: %s does not exist, so none of its answers are reused", seed, src
                    )
                    continue
                with src.open() as f:
                    shutil.copyfileobj(f, dst)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder (reward/, judge/)")
    ap.add_argument(
        "--prompter", default="runs/bench/rl-kl", help="the trained prompter whose rewrite is the retry"
    )
    ap.add_argument("--retry-share", type=float, default=0.5, help="share of validation answers to retry")
    ap.add_argument(
        "--seed-caches",
        nargs="*",
        default=["eval", "eval-gate-validation"],
        help="evaluation folders under --out whose target answers to reuse (default: the benchmark's)",
    )
    ap.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many prompts of each evaluation set: --offset 50 evaluates prompts the default run never saw",
    )
    ap.add_argument(
        "--per-set", type=int, default=None, help="prompts from each evaluation set (default: 50)"
    )
    ap.add_argument(
        "--no-zero-shot", action="store_true", help="leave out the untrained prompter (the slowest)"
    )
    ap.add_argument(
        "--label",
        default="",
        help="names this run's section (key suffix and title), so a rerun on other artifacts keeps the earlier one",
    )
    ap.add_argument(
        "--eval-dir",
        default="",
        help="evaluation folder under --out (default eval-gated-confirm with --offset, else eval-gated-retry): a "
        "second confirmation on another slice gets its own, so each folder's records cover one slice",
    )
    ap.add_argument(
        "--pool-with",
        nargs="*",
        default=[],
        help="with --offset: earlier confirmation folders under --out (e.g. eval-gated-confirm) whose prompts join "
        "the pooled table after the benchmark's own; a folder is used only if it holds frozen, template, zero-shot "
        "and align-pro with this setup on every prompt it adds",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    budget = BUDGETS["standard"]
    confirm = args.offset > 0  # a fresh slice of prompts: a confirmation with nothing re-chosen
    tag = args.eval_dir or ("eval-gated-confirm" if confirm else "eval-gated-retry")
    per_set = args.per_set or budget["eval_per_set"]
    prompts = held_out_slice(budget, args.offset, per_set)
    check_slice(out, tag, confirm, prompts, args.pool_with, slice_text(args.offset, per_set))
    times = train_reward_models(out, budget)

    from alignpro_plugins.prompter import Prompter

    trained = Prompter.from_pretrained(args.prompter)
    # The benchmark's own (kl-optimum) prompter is the benchmark's configuration, so its records there pool with these.
    own = Path(args.prompter).resolve() == (out / "rl-kl").resolve()
    align_pro = WithPrompter(
        prompter=trained,
        name="align-pro",
        description=align_pro_description("kl-optimum") if own else f"the trained prompter ({args.prompter})",
    )
    shares = sorted({*SWEEP, args.retry_share})
    tries = first_tries(trained.manifest.mode)  # frozen, the default instruction, the untrained prompter
    if args.no_zero_shot:
        tries = [c for c in tries if c.name != "zero-shot"]

    # Thresholds from the validation prompts, training reward only.
    val = validation_prompts(budget)
    seeded(out, "eval-gated-validation", args.seed_caches)
    t = time.time()
    gate = judges(out)["reward"]
    val_scores = frozen_validation_scores(out, budget, "eval-gated-validation", gate)
    thresholds = {s: retry_threshold(val_scores, s) for s in shares}
    val_dir, val_target = side_evaluation(out, budget, "eval-gated-validation")

    def gated(share: float) -> WithRetryGate:
        main_share = share == args.retry_share
        return WithRetryGate(
            retry=[align_pro],
            threshold=thresholds[share],
            name="gated-retry" if main_share else f"gated-retry-{share:g}",
            description=f"x; below the training reward's {share:.0%} validation quantile, the prompter's rewrite too",
        )

    report_val = Evaluator(val, val_target, {"reward": gate}, out_dir=val_dir).run(
        [tries[0], align_pro, *(gated(s) for s in shares)]
    )
    times["validation"] = time.time() - t
    vby = scores_by_config(report_val.records)

    seeded(out, tag, args.seed_caches)
    ev_dir, target = side_evaluation(out, budget, tag)
    configs = [
        *tries,
        align_pro,
        *(gated(s) for s in shares),
        *reranks(tries, align_pro),
        *sampling_baselines([2, 3]),
    ]
    t = time.time()
    report = Evaluator(prompts, target, judges(out), out_dir=ev_dir, focus="gated-retry").run(configs)
    times["evaluation"] = time.time() - t
    by = scores_by_config(report.records)
    calls = report.summary["configs"]

    def val_row(name: str) -> str:
        a, f = vby[name, "reward"], vby["frozen", "reward"]
        return (
            f"| {name} | {win_cells(vby, name, 'frozen', 'reward')} | {fmean(a) - fmean(f):+.3f} | "
            f"{variance_ratio(a, f)['ratio']:.2f} | "
            f"{report_val.summary['configs'][name]['target_calls_per_prompt']:.2f} |"
        )

    def h2h_row(a: str, b: str, label: str = "") -> str:
        return f"| {label or f'{a} vs {b}'} | {win_cells(by, a, b, 'independent')} | {win_cells(by, a, b, 'reward')} |"

    held = [
        f"| {c.name} | "
        + " | ".join(against_frozen_cells(by, c.name, judge) for judge in ("independent", "reward"))
        + f" | {mean_words(report.records, c.name):.0f} | {calls[c.name]['target_calls_per_prompt']:.2f} |"
        for c in configs
        if c.name != "frozen"
    ]
    h2h = (
        [h2h_row("gated-retry", c.name) for c in configs if c.name != "gated-retry"]
        # the prompter alone against what a user tries first
        + [h2h_row("align-pro", c.name) for c in tries if c.name != "frozen"]
        # what answering more than one input buys over the prompter alone and the default instruction
        + [
            h2h_row(r, c)
            for r, c in (
                ("rerank", "align-pro"),
                ("rerank", "rerank-template"),
                ("rerank-3", "align-pro"),
                ("rerank-3", "template"),
            )
        ]
    )
    title, key = labelled(
        f"## Confirmation: gated retry on {len(prompts)} held-out prompts it never saw"
        if confirm
        else "## Experiment: gated retry — the prompter's rewrite only where the frozen answer scores poorly",
        "gated-retry-confirmation" if confirm else "gated-retry-experiment",
        args.label,
    )
    where = (
        f"prompts {slice_text(args.offset, per_set)} ({len(prompts)} "
        "prompts; none trained on, none in the records that suggested the gate, budget and thresholds fixed before)"
        if confirm
        else f"the benchmark's {len(prompts)} held-out prompts"
    )
    md = [
        title,
        "",
        f"- command: `{command_line()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f"- prompter: `{args.prompter}` (mode {trained.manifest.mode}); gate: the training reward; thresholds: the "
        f"training reward's {', '.join(f'{s:.0%}' for s in shares)} quantiles of the frozen model's answers on "
        f"{len(val)} held-out AlpacaEval validation prompts ("
        + ", ".join(f"{s:.0%}: {thresholds[s]:+.3f}" for s in shares)
        + f"); the main configuration `gated-retry` spends {args.retry_share:.0%}",
        f"- evaluation: {where}, answers capped at {budget['eval_tokens']} "
        f"tokens, both judges; {target.stats.calls} new target answers in this invocation (the rest from its cache)",
        "- times of this invocation (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        "",
        f"On the {len(val)} validation prompts (training reward; the thresholds are set here), against frozen:",
        "",
        "| configuration | win rate | at equal length | mean gain | variance / frozen | target calls / prompt |",
        "|---|---|---|---|---|---|",
        *(val_row(n) for n in ["align-pro", *(gated(s).name for s in shares)]),
        "",
        f"On the {len(prompts)} held-out prompts, against frozen (its answers average "
        f"{mean_words(report.records, 'frozen'):.0f} words):",
        "",
        "| configuration | win (independent) | at equal length (independent) | mean gain (independent) | "
        "variance / frozen (independent) | win (reward) | at equal length (reward) | mean gain (reward) | "
        "variance / frozen (reward) | answer words | target calls / prompt |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *held,
        "",
        "| head to head | win (independent) | at equal length (independent) | win (training reward) | "
        "at equal length (training reward) |",
        "|---|---|---|---|---|",
        *h2h,
        *equal_calls_lines(report.summary),
        *selection_lines(report.summary),
        *outputs_lines(report.summary),
    ]
    names = [c.name for c in tries] + ["align-pro"]
    fingerprints = {r["config"]: r["fingerprint"] for r in report.records if r["config"] in names}
    folders = ["eval", *args.pool_with] if confirm else []  # the benchmark's own run pools with nothing
    pooled, used, left_out = pool(out, folders, eval_prompts(budget), by, fingerprints)
    for folder, why in left_out:
        logging.warning("%s is left out of the pooled table: %s", out / folder, why)
    if used:
        n = len(pooled["frozen", "independent"])
        gone = "".join(f"; {f} left out: {why}" for f, why in left_out)
        md += [
            "",
            f"On {n} held-out prompts: {pooled_text(used)} and these {len(prompts)}, paired within each set (the "
            f"earlier ones from their folders' records, same artifacts){gone}:",
            "",
            "| configuration | win vs frozen (independent) | at equal length (independent) | mean gain (independent) | "
            "variance / frozen (independent) | win vs frozen (reward) | at equal length (reward) | mean gain (reward) | "
            "variance / frozen (reward) |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {name} | "
                + " | ".join(against_frozen_cells(pooled, name, judge) for judge in ("independent", "reward"))
                + " |"
                for name in names
                if name != "frozen"
            ),
            "",
            "| head to head | win (independent) | at equal length (independent) | win (training reward) | "
            "at equal length (training reward) |",
            "|---|---|---|---|---|",
            *(
                f"| align-pro vs {name} | {win_cells(pooled, 'align-pro', name, 'independent')} | "
                f"{win_cells(pooled, 'align-pro', name, 'reward')} |"
                for name in names
                if name != "align-pro"
            ),
        ]
    publish("\n".join(md), ev_dir / "section.md", key, HISTORY_PAGE)


def pool(
    out: Path,
    folders: list[str],
    bench_prompts: list[str],
    by_new: dict[tuple[str, str], list[float]],
    fingerprints: dict[str, str],
) -> tuple[dict[tuple[str, str], list[float]], list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """The new prompts' rewards with those of earlier evaluation folders in front, per (configuration, judge).

    "eval" stands for the benchmark's own prompt list; another folder gives the prompts its frozen records hold with
    this setup, in written order. Each folder adds only prompts no folder before it added (a confirmation folder
    also holds copies of the benchmark's records). A folder that cannot be paired on every prompt it adds is left
    out, and its prompts stay free for the folders after it. Returns the pool, the (folder, prompts) used in table
    order, and the (folder, reason) left out; every list in the pool follows the same prompt order.
    """
    taken: set[str] = set()
    used: list[tuple[str, list[str]]] = []
    parts: list[dict[tuple[str, str], list[float]]] = []  # each used folder's rewards, in table order
    left_out: list[tuple[str, str]] = []
    for folder in folders:
        path = out / folder / "records.jsonl"
        held = bench_prompts if folder == "eval" else recorded_prompts(path, fingerprints["frozen"])
        adds = [x for x in held if x not in taken]
        part = pooled_with_folder(path, adds, {k: [] for k in by_new}, fingerprints) if adds else None
        if not adds:
            left_out.append(
                (folder, "no records of this setup's frozen configuration on prompts not pooled already")
            )
        elif part is None:
            left_out.append(
                (
                    folder,
                    "its records do not hold every configuration with this setup on every prompt, e.g. an "
                    "older record format or another prompter, target or judge",
                )
            )
        else:
            used.append((folder, adds))
            parts.append(part)
            taken.update(adds)
    if not parts:
        return by_new, used, left_out
    pooled = {
        k: [v for part in parts for v in part[k]] + values for k, values in by_new.items() if k in parts[0]
    }
    return pooled, used, left_out


def check_slice(
    out: Path, tag: str, confirm: bool, prompts: list[str], pool_with: list[str], where: str
) -> None:
    """Refuse, before any work, a slice the benchmark or a pooled folder already holds, and a pool that cannot be."""
    if pool_with and not confirm:
        raise SystemExit(
            "--pool-with pools confirmation slices: give --offset N too (prompts past the benchmark's)"
        )
    if confirm and (already := recorded_prompt_set(out / "eval" / "records.jsonl") & set(prompts)):
        raise SystemExit(
            f"{len(already)} of prompts {where} were already evaluated by the benchmark in {out / 'eval'} (run "
            "with --eval-per-set?), so they are not new to it: raise --offset"
        )
    for folder in pool_with:
        path = out / folder / "records.jsonl"
        if folder in (tag, "eval"):
            raise SystemExit(
                f"--pool-with {folder}: this run writes its records there (or it is the benchmark's own, always "
                "pooled): give --eval-dir another folder, e.g. eval-gated-confirm-2, or leave it out of --pool-with"
            )
        if not path.exists():
            raise SystemExit(
                f"--pool-with {folder}: {path} does not exist; give a folder under --out that an earlier "
                "confirmation wrote, e.g. eval-gated-confirm"
            )
        if overlap := recorded_prompt_set(path) & set(prompts):
            raise SystemExit(
                f"{len(overlap)} of these prompts are also in {out / folder}: a pooled table pairs each prompt "
                "once, so raise --offset past that folder's slice or leave it out of --pool-with"
            )


def pooled_text(slices: list[tuple[str, list[str]]]) -> str:
    """E.g. "the benchmark's 100 (eval), 200 from eval-gated-confirm": where the pooled table's prompts come from."""
    named = [f"the benchmark's {len(p)} (eval)" if f == "eval" else f"{len(p)} from {f}" for f, p in slices]
    return ", ".join(named)


def recorded_prompts(path: Path, fingerprint: str) -> list[str]:
    """The prompts an evaluation folder's records hold for this frozen configuration, in first-written order."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return list(
        dict.fromkeys(
            r["prompt"] for r in rows if r["config"] == "frozen" and r.get("fingerprint") == fingerprint
        )
    )


def recorded_prompt_set(path: Path) -> set[str]:
    """Every prompt an evaluation folder's records hold, whatever the configuration or setup (none: no file)."""
    if not path.exists():
        return set()
    with path.open() as f:
        return {json.loads(line)["prompt"] for line in f if line.strip()}


def pooled_with_folder(
    path: Path,
    folder_prompts: list[str],
    by_rest: dict[tuple[str, str], list[float]],
    fingerprints: dict[str, str],
) -> dict[tuple[str, str], list[float]] | None:
    """A folder's rewards on ``folder_prompts`` followed by ``by_rest``'s, per (configuration, judge).

    Only records with the configuration's fingerprint (same prompter, target and judges) count, so another
    prompter's records in the same folder never join the pool. Pairs stay within each set: the folder's rewards
    follow ``folder_prompts`` (records are matched by prompt text, as the evaluator resumes them), the rest keep
    their order. None unless the records hold every configuration of ``fingerprints`` on every one of those
    prompts: a partial pool would not be paired.
    """
    if not path.exists():
        return None
    wanted = set(folder_prompts)
    latest: dict[tuple[str, str], dict] = {}  # a resumed evaluation may have written a record twice
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            if rec["prompt"] in wanted and rec.get("fingerprint") == fingerprints.get(rec["config"]):
                latest[rec["config"], rec["prompt"]] = rec
    pooled: dict[tuple[str, str], list[float]] = {}
    for (name, judge), values in by_rest.items():
        if name not in fingerprints:
            continue
        if any(
            (name, x) not in latest or judge not in {*latest[name, x]["rewards"], ANSWER_WORDS}
            for x in folder_prompts
        ):
            return None
        recs = [latest[name, x] for x in folder_prompts]
        mine = [answer_words(r["answer"]) if judge == ANSWER_WORDS else r["rewards"][judge] for r in recs]
        pooled[name, judge] = mine + values
    return pooled


def slice_text(offset: int, per_set: int) -> str:
    """Which prompts of each evaluation set a slice holds, e.g. "151–200 of dolly_eval and 151–252 of ..."."""
    ends = {
        Path(name).stem: min(offset + per_set, len(load_prompts(str(DATA / name), field="instruction")))
        for name in EVAL_SETS
    }
    ends = {
        name: end for name, end in ends.items() if end > offset
    }  # a set that ended before the slice adds none
    if len(set(ends.values())) == 1:
        return f"{offset + 1}–{next(iter(ends.values()))} of " + " and of ".join(ends)
    return " and ".join(f"{offset + 1}–{end} of {name}" for name, end in ends.items())


def held_out_slice(budget: dict, offset: int, per_set: int) -> list[str]:
    """Prompts offset+1 .. offset+per_set of each evaluation set; none may be a training prompt."""
    if offset == 0 and per_set == budget["eval_per_set"]:
        return eval_prompts(budget)
    prompts = [
        x
        for name in EVAL_SETS
        for x in load_prompts(
            str(DATA / name), field="instruction", context_field="context", limit=offset + per_set
        )[offset:]
    ]
    seen = set(training_prompts(dict(budget, eval_per_set=offset + per_set)))
    if leaked := [x for x in prompts if x in seen]:
        raise SystemExit(f"{len(leaked)} evaluation prompts are training prompts, e.g. {leaked[0][:80]!r}")
    return prompts


def slug(label: str) -> str:
    """A section key from a free-text label: lowercase words joined by hyphens."""
    return "-".join("".join(c if c.isalnum() else " " for c in label.lower()).split())


def labelled(title: str, key: str, label: str) -> tuple[str, str]:
    """A section's title and key for a run named by --label; unchanged without one, so reruns keep their section."""
    return (f"{title} ({label})", f"{key}-{slug(label)}") if label else (title, key)


def against_frozen_cells(by: dict[tuple[str, str], list[float]], name: str, judge: str) -> str:
    """Table cells of a configuration against frozen under one judge: win rate, win at equal answer length, mean
    gain, variance ratio."""
    a, f = by[name, judge], by["frozen", judge]
    v = variance_ratio(a, f)
    return (
        f"{win_cells(by, name, 'frozen', judge)} | {fmean(a) - fmean(f):+.3f} | "
        f"{v['ratio']:.2f} [{v['ci_low']:.2f}–{v['ci_high']:.2f}]"
    )


def mean_words(records: list[dict], config: str) -> float:
    """The mean answer length in words of one configuration's records."""
    return fmean(answer_words(r["answer"]) for r in records if r["config"] == config)


if __name__ == "__main__":
    main()
