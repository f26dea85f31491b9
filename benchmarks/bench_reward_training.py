"""Reward-stage training: today's settings against the fast stage, a full pass, MiniLM against SmolLM2 with a LoRA,
an ensemble against its members, and length control.

All preference pairs of ../shared/data (AlpacaEval and HH-RLHF), the evaluation prompt files excluded from training
as benchmarks/run_benchmark.py's reward_config excludes them, 10% of the prompts held out (one split for every run):

(a) today's stage (freeze_layers 2, random batches: the standard benchmark's reward settings) against the fast
    stage (freeze_layers --fast-freeze, group_by_prompt: batches of one prompt's pairs, sorted by length, each
    distinct sequence run once) at equal steps: seconds per step, pairs per second, held-out accuracy;
(b) the fast stage's full pass over every training pair (one epoch): wall time and accuracy;
(c) MiniLM against SmolLM2-135M-Instruct with a LoRA and a scalar head: accuracy on the same held-out sample and
    scoring cost (answers per second);
(d) an ensemble of 3 (disjoint prompt shards, one full pass in all) against its members, under each combine rule;
(e) length control: the full-pass model's raw scores against its length-penalised scores.

Each run's folder under --out is reused when complete, so an interrupted benchmark resumes.

    python -m benchmarks.bench_reward_training          # full size (every pair): an estimated 1-2 hours on 2 cores
    python -m benchmarks.bench_reward_training --pairs 200 --steps 2 --decoder-steps 1 --decoder-eval-pairs 20 --no-docs
                                                        # smoke run: about 5 minutes on a loaded 2-core machine
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from alignpro_plugins.data import PreferencePair
from alignpro_plugins.reward_ensemble import COMBINE_RULES, RewardEnsemble
from alignpro_plugins.rewards import CallableReward, load_reward
from benchmarks.run_benchmark import DATA, EVAL_SETS, ROOT, publish, run_lines
from trainers.reward_config import AlignProRewardConfig
from trainers.reward_metrics import pairwise_metrics, score_pairs
from trainers.reward_trainer import AlignProRewardTrainer

SOURCES = ("alpaca_eval_prefs.jsonl.gz", "hh_rlhf_harmless.jsonl.gz")
TRAINER_PAGE = ROOT / "docs" / "trainers" / "reward.md"
BUDGET_MINUTES = 20  # the target: a full pass over the preference data in at most 20 minutes on 2 cores
BATCH = 16  # pairs per step, as the standard benchmark's reward stage


def stage_config(args: argparse.Namespace, name: str, **overrides: Any) -> AlignProRewardConfig:
    settings: dict[str, Any] = dict(
        output_dir=str(Path(args.out) / name),
        preference_data=[str(DATA / s) for s in SOURCES],
        max_pairs_per_source=args.pairs // 2 if args.pairs else None,
        exclude_prompt_files=[str(DATA / name) for name in EVAL_SETS],
        max_length=args.max_length,
        per_device_train_batch_size=BATCH,
        logging_steps=10,
        save_steps=200,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
    )
    return AlignProRewardConfig(**(settings | overrides))


def today(args: argparse.Namespace, name: str, **kw: Any) -> AlignProRewardConfig:
    return stage_config(args, name, freeze_layers=2, **kw)


def fast(args: argparse.Namespace, name: str, **kw: Any) -> AlignProRewardConfig:
    return stage_config(args, name, **({"freeze_layers": args.fast_freeze, "group_by_prompt": True} | kw))


def run(cfg: AlignProRewardConfig) -> dict[str, Any]:
    """Train (unless the folder holds a finished run) and return the manifest plus the stage's wall seconds."""
    out = Path(str(cfg.output_dir))
    timing = out / "bench_timing.json"
    if timing.exists() and (out / "alignpro_reward.json").exists():
        print(f"reusing {out}", flush=True)
    else:
        print(f"training {out}", flush=True)
        started = time.time()
        AlignProRewardTrainer(cfg).train()
        timing.write_text(json.dumps({"wall_seconds": time.time() - started}))
    meta = json.loads((out / "alignpro_reward.json").read_text())
    meta["wall_seconds"] = json.loads(timing.read_text())["wall_seconds"]
    meta["tokens_per_pair"] = tokens_per_pair(out, cfg.per_device_train_batch_size)
    return meta


def tokens_per_pair(out: Path, batch: int) -> float:
    """Tokens the model ran per training pair (TRL's num_tokens: attention-mask tokens, each distinct sequence once
    with group_by_prompt's collator); nan for an ensemble folder."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    logged = [(r["step"], r["num_tokens"]) for r in rows if "num_tokens" in r]
    return logged[-1][1] / (logged[-1][0] * batch) if logged else float("nan")


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def acc_cell(meta: dict[str, Any], suffix: str = "") -> str:
    return (
        f"{fmt(meta[f'heldout_pairwise_accuracy{suffix}'])} | "
        f"{fmt(meta[f'heldout_pairwise_accuracy_length_matched{suffix}'])}"
    )


def per_step(meta: dict[str, Any]) -> float:
    return meta["train_seconds"] / max(meta["steps"], 1)


def part_a(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    runs = {
        f"today (freeze_layers 2, random batches, max_length {args.max_length})": run(
            today(args, f"today-steps{args.steps}", max_steps=args.steps)
        ),
        f"fast (freeze_layers {args.fast_freeze}, group_by_prompt)": run(
            fast(args, f"fast-steps{args.steps}", max_steps=args.steps)
        ),
    }
    (base_name, base), (_, new) = runs.items()
    lines = [
        f"### (a) Today's stage against the fast stage at equal steps ({args.steps} steps of {BATCH} pairs)",
        "",
        "| stage | s/step | pairs/s | tokens run per pair | speed-up | held-out accuracy | length-matched |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, meta in runs.items():
        lines.append(
            f"| {name} | {per_step(meta):.2f} | {BATCH / per_step(meta):.1f} | {fmt(meta['tokens_per_pair'], '.0f')} "
            f"| {per_step(base) / per_step(meta):.2f}x | {acc_cell(meta)} |"
        )
    lines += [
        "",
        f"{base['n_train_pairs']} training pairs, {base['n_eval_pairs']} held-out pairs on held-out prompts "
        f"({base['n_eval_pairs_length_matched']} length-matched: word counts within "
        f"{base['length_matched_tolerance']:.0%} of the longer answer). Seconds per step: the training loop "
        "(TRL's train_runtime) over the steps.",
        "",
    ]
    return lines, {"today": base, "fast": new, "today_name": base_name}


def part_b(args: argparse.Namespace, a: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    meta = run(fast(args, "fast-full", num_train_epochs=1, max_steps=-1, length_control="penalty"))
    minutes = meta["train_seconds"] / 60
    lines = [
        "### (b) The fast stage's full pass over every training pair",
        "",
        "| run | training pairs | steps | training loop | whole stage (load, tokenize, train, score) | "
        "held-out accuracy | length-matched |",
        "|---|---|---|---|---|---|---|",
        f"| fast, 1 epoch | {meta['n_train_pairs']} | {meta['steps']} | {minutes:.1f} min | "
        f"{meta['wall_seconds'] / 60:.1f} min | {acc_cell(meta, '_raw')} |",
    ]
    if a is not None:
        projected = meta["n_train_pairs"] / (BATCH / per_step(a["today"])) / 60
        lines += [
            "",
            f"Today's settings at the speed measured in (a) would take {projected:.0f} min for the same pass.",
        ]
    verdict = "met" if minutes <= BUDGET_MINUTES else "NOT met"
    lines += [
        "",
        f"Budget (a full pass in at most {BUDGET_MINUTES} minutes on 2 cores): {verdict} ({minutes:.1f} min of "
        f"training loop, {meta['wall_seconds'] / 60:.1f} min for the whole stage). Accuracies are the raw scores; "
        "(e) has the length-controlled ones.",
        "",
    ]
    return lines, meta


def timed_metrics(reward: Any, pairs: list[PreferencePair]) -> tuple[dict[str, Any], float]:
    """Pairwise metrics and answers scored per second (each distinct (prompt, answer) once)."""
    n_answers = len({(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)})
    started = time.perf_counter()
    scores = score_pairs(reward, pairs)
    return pairwise_metrics(pairs, *scores), n_answers / (time.perf_counter() - started)


def part_c(args: argparse.Namespace, full: dict[str, Any] | None) -> list[str]:
    cfg = fast(
        args,
        f"smollm2-lora-steps{args.decoder_steps}",
        base_model="smollm2-135m-instruct",
        use_lora=True,
        learning_rate=args.decoder_lr,
        freeze_layers=args.decoder_freeze,
        max_steps=args.decoder_steps,
        max_eval_pairs=args.decoder_eval_pairs,
    )
    run(cfg)
    sample = AlignProRewardTrainer(cfg).eval_pairs  # the decoder's held-out sample (seeded by split_seed)
    models = {
        f"MiniLM fast, {args.steps} steps": Path(args.out) / f"fast-steps{args.steps}",
        f"SmolLM2-135M + LoRA (r {cfg.lora_r}), {args.decoder_steps} steps": Path(str(cfg.output_dir)),
    }
    if full is not None:
        models[f"MiniLM fast, full pass ({full['steps']} steps)"] = Path(args.out) / "fast-full"
    lines = [
        f"### (c) MiniLM against SmolLM2-135M-Instruct with a LoRA ({len(sample)} held-out pairs, the same for each)",
        "",
        "| reward model | train s/step | held-out accuracy | length-matched | scoring (answers/s) |",
        "|---|---|---|---|---|",
    ]
    for name, folder in models.items():
        if not (folder / "alignpro_reward.json").exists():
            continue
        meta = json.loads((folder / "alignpro_reward.json").read_text())
        metrics, speed = timed_metrics(load_reward(str(folder), length_control=False), sample)
        lines.append(
            f"| {name} | {per_step(meta):.2f} | {fmt(metrics['pairwise_accuracy'])} | "
            f"{fmt(metrics['pairwise_accuracy_length_matched'])} (n={metrics['n_pairs_length_matched']}) | "
            f"{speed:.1f} |"
        )
    lines += [
        "",
        f"SmolLM2: LoRA on {cfg.lora_target_modules} (layers from {args.decoder_freeze} up), learning rate "
        f"{args.decoder_lr}, the same batches as the fast stage; saved merged (loads without peft). Raw scores; "
        "scoring: RewardModel, batch 32, length-sorted.",
        "",
    ]
    return lines


def part_d(args: argparse.Namespace) -> list[str]:
    cfg = fast(args, "ensemble3-full", num_train_epochs=1, max_steps=-1, ensemble_size=3)
    meta = run(cfg)
    folder = Path(str(cfg.output_dir))
    pairs = AlignProRewardTrainer(cfg).eval_pairs
    members = [load_reward(str(folder / name)) for name in meta["members"]]
    items = list(dict.fromkeys((p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)))
    # Each member scores the held-out answers once; every rule combines those scores through RewardEnsemble.
    cached = [dict(zip(items, m([x for x, _ in items], [y for _, y in items]), strict=True)) for m in members]
    frozen = [
        CallableReward(lambda ps, ys, c=c: [c[x, y] for x, y in zip(ps, ys, strict=True)], name=f"member-{j}")
        for j, c in enumerate(cached)
    ]
    lines = [
        f"### (d) An ensemble of 3 against its members ({meta['ensemble_split']}: "
        f"{', '.join(str(m['n_train_pairs']) for m in meta['member_metrics'])} training pairs; one full pass in all)",
        "",
        "| reward | held-out accuracy | length-matched |",
        "|---|---|---|",
    ]
    for m in meta["member_metrics"]:
        lines.append(f"| {m['member']} (seed {m['seed']}) | {acc_cell(m)} |")
    for rule in COMBINE_RULES:
        ensemble = RewardEnsemble(frozen, rule, meta["combine_k"], member_scale=meta["member_scale"])
        metrics = pairwise_metrics(pairs, *score_pairs(ensemble, pairs))
        rule_name = f"mean − {meta['combine_k']:g}·std" if rule == "mean-minus-std" else rule
        lines.append(
            f"| ensemble, {rule_name} | {fmt(metrics['pairwise_accuracy'])} | "
            f"{fmt(metrics['pairwise_accuracy_length_matched'])} |"
        )
    lines += [
        "",
        f"Training the three members took {meta['train_seconds'] / 60:.1f} min of training loop "
        f"({meta['wall_seconds'] / 60:.1f} min in all). Members' scores standardised by member_scale (fitted on "
        "held-out answers, no labels) before each rule.",
        "",
    ]
    return lines


def part_e(full: dict[str, Any]) -> list[str]:
    return [
        "### (e) Length control: raw scores against the fitted length penalty (the full-pass model)",
        "",
        "| scores | held-out accuracy | length-matched | prefers the longer answer |",
        "|---|---|---|---|",
        f"| raw | {acc_cell(full, '_raw')} | {fmt(full['heldout_longer_preferred_rate_raw'], '.1%')} |",
        f"| raw − β·tokens, β = {full['length_penalty_per_token']:.2e} per answer token | {acc_cell(full)} | "
        f"{fmt(full['heldout_longer_preferred_rate'], '.1%')} |",
        f"| (the human / GPT-4 labels) | — | — | {fmt(full['heldout_labels_longer_preferred_rate'], '.1%')} |",
        "",
        f"β: least squares of the raw score on the answer's token count over {full['length_penalty_fit_answers']} "
        "training answers (no labels). 'Prefers the longer answer': held-out pairs whose answers differ in word "
        "count.",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=0, help="the first N/2 pairs of each source (0: every pair)")
    ap.add_argument(
        "--steps", type=int, default=80, help="steps of (a), as the standard benchmark's reward stage"
    )
    ap.add_argument("--decoder-steps", type=int, default=40, help="steps of the SmolLM2 LoRA run in (c)")
    ap.add_argument("--decoder-eval-pairs", type=int, default=400, help="held-out pairs (c) scores")
    ap.add_argument("--decoder-lr", type=float, default=2e-4, help="learning rate of the SmolLM2 LoRA")
    ap.add_argument("--decoder-freeze", type=int, default=0, help="SmolLM2 layers below the LoRA")
    ap.add_argument(
        "--fast-freeze", type=int, default=4, help="freeze_layers of the fast stage (MiniLM has 6)"
    )
    ap.add_argument("--max-length", type=int, default=256, help="prompt + answer tokens")
    ap.add_argument("--parts", default="abcde", help="which parts to run, e.g. ab")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-reward-training"))
    ap.add_argument(
        "--no-docs", action="store_true", help="print the section, do not write docs/trainers/reward.md"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    body: list[str] = []
    a = full = None
    if "a" in args.parts:
        lines, a = part_a(args)
        body += lines
    if "b" in args.parts or "e" in args.parts:
        lines, full = part_b(args, a)
        body += lines if "b" in args.parts else []
    if "c" in args.parts:
        body += part_c(args, full)
    if "d" in args.parts:
        body += part_d(args)
    if "e" in args.parts and full is not None:
        body += part_e(full)
    size = f"the first {args.pairs // 2} pairs of each source" if args.pairs else "every pair"
    section = "\n".join(
        [
            "## Reward-stage training: speed, accuracy, backbones, ensembles, length",
            "",
            *run_lines(started),
            f"- data: {' + '.join(SOURCES)}, {size}; evaluation prompts ({', '.join(EVAL_SETS)}) excluded; 10% of "
            f"the prompts held out (split seed 0, the same for every run); max_length {args.max_length}, "
            f"{BATCH} pairs per step, all-MiniLM-L6-v2 unless named; {args.threads} torch threads",
            "",
            *body,
        ]
    )
    # The reward trainer's page carries the whole section; docs/benchmarks.md quotes its headline numbers.
    publish(
        section,
        Path(args.out) / "section.md",
        "reward-training-benchmark",
        TRAINER_PAGE,
        docs=not args.no_docs,
    )


if __name__ == "__main__":
    main()
