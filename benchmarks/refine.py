"""Sequential Align-Pro: a refinement prompter that reads the frozen model's first answer, trained and
evaluated beside the standard benchmark's prompt-only prompter, at equal target calls.

Stages (each reused when its artifact exists, so an interrupted run resumes):

1. refine SFT (``<out>/sft``): for each BPO bootstrap prompt x, y₀ = π_F(x); candidates are ``--k`` refinements
   sampled from (x, y₀), the guidance library (and the guidance search's text), the benchmark's prompt-only
   prompter's guidance and "no change"; each x'' is answered and scored r(x, π_F(x'')) by the training reward; the
   prompter (SmolLM2 + LoRA) learns (x, y₀) → the best.
2. refine RL (``<out>/rl``): kl-optimum rounds anchored on the refine SFT prompter, the round kept by the training
   reward of its deployed refinements on held-out AlpacaEval training prompts (the SFT prompter if none beats it).
3. evaluation (``<bench>/eval-refine``) on the benchmark's held-out prompts, under both judges, beside frozen, the
   prompt-only prompter alone / gated / reranked, and best-of-2/3 sampling (their records are the benchmark's):
   ``refine`` (always refine, keep the better by the training reward: 2 calls where it writes guidance),
   ``refine-gated`` (refine only below the benchmark gate's threshold) and ``refine-sft`` (the SFT round).

    python -m benchmarks.refine                       # after python -m benchmarks.run_benchmark (runs/bench)
    python -m benchmarks.refine --smoke --out /tmp/refine-smoke   # tiny random models: a pipeline check

The section (the refinement targets with intervals, at equal length; the refinement kinds and examples) is written to
``<eval folder>/section.md``, and with ``--publish`` to docs/benchmarks-history.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignpro_plugins.eval_report import format_win
from benchmarks.run_benchmark import (
    BUDGETS,
    GATED_RETRY_SHARE,
    HISTORY_PAGE,
    align_pro_description,
    bootstrap_prompts,
    command_line,
    first_eval_prompts,
    frozen_validation_scores,
    judges,
    machine,
    publish,
    rl_prompt_pools,
    sampling_baselines,
    sft_library,
    validation_prompts,
)

PACKAGED = "smollm2-135m-instruct"


@dataclass
class World:
    """Where the run reads from and writes to, and its sizes: the standard benchmark's, or a tiny smoke world."""

    bench: Path  # reward/, judge/, rl-kl/ (the prompt-only prompter), guidance/, eval/
    out: Path  # this run's sft/ and rl/
    base_model: str  # the refinement prompter's base
    target: str  # the frozen target
    train_tokens: int  # the target's answer cap in training (the benchmark's target_tokens)
    eval_tokens: int
    boot: list[str]  # bootstrap prompts
    rl_rounds: list[str]  # kl-optimum's round prompts, fresh each round
    rl_val: list[str]  # held-out training prompts that pick the kept round
    eval: list[str]  # held-out evaluation prompts
    templates: list[str]
    zero_shot: bool  # evaluate the untrained base prompter too (the benchmark's zero-shot records)
    budget: dict[str, Any]  # the benchmark budget the prompts come from


def target_kwargs(world: World) -> dict[str, Any]:
    return dict(target=world.target, target_max_new_tokens=world.train_tokens, target_batch_size=32)


def eval_target(world: World, folder: Path):
    """The frozen target as the benchmark's evaluation asks it (same identity, so its records and answers pool)."""
    from alignpro_plugins.targets import CachedTarget, TransformersTarget

    return CachedTarget(
        TransformersTarget(world.target, max_new_tokens=world.eval_tokens, batch_size=32),
        folder / "target_cache.jsonl",
    )


def seed_cache(src: Path, dst: Path) -> None:
    """Start a stage's answer cache from another stage's (same target and cap): answers to x and x + a library
    text are not asked again."""
    if src.exists() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


def train_sft(world: World, args: argparse.Namespace) -> Path:
    from trainers.sft_config import AlignProSFTConfig
    from trainers.sft_trainer import train_sft as run

    out = world.out / "sft"
    if (out / "alignpro.json").exists():
        return out
    seed_cache(world.bench / "sft" / "target_cache.jsonl", out / "target_cache.jsonl")
    searched = world.bench / "guidance" / "guidance_search.json"  # its validated text joins the candidates
    from_search: dict[str, Any] = (
        dict(templates_from=str(searched.parent), templates_from_top=1) if searched.exists() else {}
    )
    cfg = AlignProSFTConfig(
        output_dir=str(out),
        base_model=world.base_model,
        mode="refine",
        reward_model=str(world.bench / "reward"),
        num_candidates=args.k,
        templates=world.templates,
        **from_search,
        prompt_only_prompter=str(world.bench / "rl-kl"),
        refine_answer_tokens=args.answer_tokens,
        # Each prompt's own best: a neighbourhood pick chooses among the fixed texts only, never from y0.
        bootstrap_neighbours=0,
        max_pairs=len(world.boot),
        num_train_epochs=args.sft_epochs,
        learning_rate=1e-3,
        save_steps=1000,
        **target_kwargs(world),
    )
    run(cfg, prompts=world.boot)
    return out


def train_rl(world: World, args: argparse.Namespace) -> Path:
    from trainers.kl_optimum_config import KLOptimumConfig
    from trainers.rl_trainer import train_rl as run

    out = world.out / "rl"
    if (out / "alignpro.json").exists():
        return out
    seed_cache(world.bench / "rl-kl" / "target_cache.jsonl", out / "target_cache.jsonl")
    cfg = KLOptimumConfig(
        output_dir=str(out),
        sft_prompter=str(world.out / "sft"),
        reward_model=str(world.bench / "reward"),
        rounds=args.rl_rounds,
        prompts_per_round=args.rl_prompts,
        beta=0.5,
        learning_rate=1e-4,
        num_generations=4,
        per_device_train_batch_size=8,
        validation_prompts=len(world.rl_val),
        keep_best=True,
        max_completion_length=48,
        resume=True,
        **target_kwargs(world),
    )
    run(cfg, prompts=[*world.rl_rounds, *world.rl_val])
    return out


def evaluate(world: World, args: argparse.Namespace, sft: Path, rl: Path) -> tuple[dict, list[dict], float]:
    """The refinement configurations beside the benchmark's, on held-out prompts; (summary, records, threshold)."""
    from alignpro_plugins.evaluation import (
        Evaluator,
        FixedTemplate,
        FrozenAlone,
        RefineAndKeepBetter,
        WithPrompter,
        WithRetryGate,
        retry_threshold,
    )
    from alignpro_plugins.prompter import Prompter

    folder = world.bench / args.eval_dir
    folder.mkdir(parents=True, exist_ok=True)
    for file in ("records.jsonl", "target_cache.jsonl"):  # the benchmark's configurations are not asked again
        seed_cache(world.bench / "eval" / file, folder / file)
    scorers = judges(world.bench)
    target = eval_target(world, folder)
    # The benchmark gate's threshold: the training reward's GATED_RETRY_SHARE quantile of the frozen answers to its
    # held-out training prompts (no evaluation prompt sets it), computed as the benchmark does, from its answers.
    threshold = retry_threshold(
        frozen_validation_scores(world.bench, world.budget, "eval-gate-validation", scorers["reward"])
        if not args.smoke
        else scorers["reward"](world.rl_val, target.generate(world.rl_val)),
        GATED_RETRY_SHARE,
    )
    tries: list[Any] = [FrozenAlone(), FixedTemplate()]
    if world.zero_shot:
        zero = Prompter.from_base(PACKAGED, mode="augment")
        tries.append(
            WithPrompter(
                prompter=zero, name="zero-shot", description="untrained base prompter, same template"
            )
        )
    align_pro = WithPrompter(
        prompter=Prompter.from_pretrained(world.bench / "rl-kl"),
        description=align_pro_description("kl-optimum"),
    )
    refiner = Prompter.from_pretrained(rl)
    configs = [
        *tries,
        align_pro,
        WithRetryGate(
            retry=[align_pro],
            threshold=threshold,
            name="align-pro-gated",
            description=f"x; the Align-Pro rewrite too where the training reward scores the answer below its "
            f"{GATED_RETRY_SHARE:.0%} validation quantile (the better answer kept)",
        ),
        WithRetryGate.rerank([align_pro]),
        *sampling_baselines([2, 3]),
        RefineAndKeepBetter(
            prompter=Prompter.from_pretrained(sft),
            name="refine-sft",
            description="the refine SFT prompter: x, then its refinement from (x, y0); the better answer kept",
        ),
        RefineAndKeepBetter(prompter=refiner),
        RefineAndKeepBetter(
            prompter=refiner,
            threshold=threshold,
            name="refine-gated",
            description=f"x; refined from (x, y0) only where the training reward scores y0 below its "
            f"{GATED_RETRY_SHARE:.0%} validation quantile; the better answer kept",
        ),
    ]
    report = Evaluator(world.eval, target, scorers, out_dir=folder, focus="refine").run(configs)
    return report.summary, report.records, threshold


def targets_lines(summary: dict) -> list[str]:
    """The refinement targets under both judges (the independent judge decides), each with its interval."""
    h, c = summary["head_to_head"], summary["configs"]
    rows = ["| target | judge | measured | |", "|---|---|---|---|"]
    for judge in ("independent", "reward"):
        for other in ("rerank", "best-of-2"):
            w = h[other][judge]
            ok = w["ci_low"] > 0.5
            rows.append(
                f"| refine beats {other} head to head (95% CI above 50%) | {judge} | {format_win(w)}; at equal "
                f"length {format_win(w['length_controlled'])} | {'met' if ok else 'NOT met'} |"
            )
        lc = c["refine"][judge]["vs_reference_length_controlled"]
        rows.append(
            f"| refine vs frozen at equal answer length ≥ 60% | {judge} | {format_win(lc)} | "
            f"{'met' if lc['win_rate'] >= 0.6 else 'NOT met'} |"
        )
    return rows


def refinement_lines(summary: dict, records: list[dict], n_examples: int) -> list[str]:
    """How many distinct kinds of guidance the refinement prompter wrote, and examples beside the first answer."""
    kinds = summary["configs"]["refine"]["refinements"]
    lines = [
        f"The refinement prompter refined {kinds['refined']} of {kinds['prompts']} prompts and kept x on "
        f"{kinds['kept_x']}; it wrote {kinds['distinct']} distinct kinds of guidance (grouped by their words). "
        "Most common:",
        "",
        *(
            [f"- {n}×: {text}" for text, n in kinds["most_common"]]
            or ["- (none: the prompter kept x every time)"]
        ),
        "",
        "Examples (the first answer y₀ cut to 300 characters, the guidance written from it, which answer was kept):",
        "",
    ]
    shown = 0
    cache = {r["prompt"]: r for r in records if r["config"] == "frozen"}
    for r in records:
        if r["config"] != "refine" or not (r.get("refinement") or {}).get("guidance") or shown >= n_examples:
            continue
        if r["refinement"]["fallback_reason"]:
            continue
        first = cache.get(r["prompt"], {}).get("answer", "")
        lines += [
            f"- x: {r['prompt'][:200]!r}",
            f"  - y₀: {first[:300]!r}",
            f"  - guidance: {r['refinement']['guidance']!r}; kept: {'y₁' if r.get('kept') else 'y₀'}",
        ]
        shown += 1
    return lines if shown else [*lines, "- (none)"]


def smoke_world(out: Path) -> World:
    """Tiny random stand-ins for the benchmark's artifacts: every stage runs end to end in minutes."""
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.testing import build_tiny_causal_lm, build_tiny_encoder

    bench = out / "bench"
    base = out / "tiny-base"
    if not (bench / "rl-kl" / "alignpro.json").exists():
        build_tiny_causal_lm(base, varied=True)
        build_tiny_encoder(bench / "reward", seed=0)
        build_tiny_encoder(bench / "judge", seed=1)
        Prompter.from_base(str(base), mode="augment", similarity=None).save_pretrained(bench / "rl-kl")
    budget = BUDGETS["quick"]
    _, mixed = rl_prompt_pools(budget)
    return World(
        bench=bench,
        out=out,
        base_model=str(base),
        target=str(base),
        train_tokens=8,
        eval_tokens=8,
        boot=bootstrap_prompts(budget)[:4],
        rl_rounds=mixed[:4],
        rl_val=validation_prompts(budget)[:2],
        eval=first_eval_prompts(2),
        templates=sft_library(budget),
        zero_shot=False,
        budget=budget,
    )


def benchmark_world(bench: Path, out: Path, args: argparse.Namespace) -> World:
    budget = BUDGETS["standard"]
    _, mixed = rl_prompt_pools(budget)
    # Round prompts: the benchmark's own RL pool (disjoint from the bootstrap's, the validation and the evaluation
    # prompts; the pool holds few more), new to the refinement prompter. Validation: the benchmark's held-out prompts.
    return World(
        bench=bench,
        out=out,
        base_model=PACKAGED,
        target=PACKAGED,
        train_tokens=budget["target_tokens"],
        eval_tokens=budget["eval_tokens"],
        boot=bootstrap_prompts(budget)[: args.boot_prompts],
        rl_rounds=mixed[: args.rl_prompts * args.rl_rounds],
        rl_val=validation_prompts(budget)[: args.val_prompts],
        eval=first_eval_prompts(args.per_set),
        templates=sft_library(budget),
        zero_shot=True,
        budget=budget,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="runs/bench", help="the standard benchmark's folder")
    ap.add_argument("--out", default=None, help="this run's folder (default <bench>/refine)")
    ap.add_argument("--boot-prompts", type=int, default=96, help="bootstrap prompts of the refine SFT")
    ap.add_argument("--k", type=int, default=2, help="refinements sampled from (x, y0) per bootstrap prompt")
    ap.add_argument("--sft-epochs", type=float, default=4.0)
    ap.add_argument("--answer-tokens", type=int, default=128, help="tokens of y0 the prompter reads")
    ap.add_argument("--rl-rounds", type=int, default=1)
    ap.add_argument("--rl-prompts", type=int, default=48, help="fresh prompts per kl-optimum round")
    ap.add_argument(
        "--val-prompts", type=int, default=32, help="held-out prompts: kept round, gate threshold"
    )
    ap.add_argument("--per-set", type=int, default=50, help="evaluation prompts from each held-out set")
    ap.add_argument("--eval-dir", default="eval-refine", help="evaluation folder under --bench")
    ap.add_argument("--examples", type=int, default=8, help="refinement examples in the section")
    ap.add_argument("--smoke", action="store_true", help="tiny random models: a pipeline check, not a result")
    ap.add_argument(
        "--publish", action="store_true", help="also write the section to docs/benchmarks-history.md"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    if args.smoke:
        out = Path(args.out or "runs/refine-smoke")
        world = smoke_world(out)
        args.k, args.sft_epochs, args.answer_tokens, args.rl_prompts = 1, 1.0, 16, 4
    else:
        bench = Path(args.bench)
        missing = [n for n in ("reward", "judge", "rl-kl", "eval") if not (bench / n).exists()]
        if missing:
            raise SystemExit(
                f"{bench} lacks {', '.join(missing)}: run python -m benchmarks.run_benchmark first (or pass --bench)"
            )
        world = benchmark_world(bench, Path(args.out or bench / "refine"), args)
    times = {}
    t = time.time()
    sft = train_sft(world, args)
    times["refine sft"] = time.time() - t
    t = time.time()
    rl = train_rl(world, args)
    times["refine rl"] = time.time() - t
    t = time.time()
    summary, records, threshold = evaluate(world, args, sft, rl)
    times["evaluation"] = time.time() - t
    from alignpro_plugins.eval_report import render_markdown

    kept = json.loads((rl / "alignpro.json").read_text())["provenance"]["stages"][-1].get("selected_round")
    md = [
        f"## Sequential Align-Pro: refine from the first answer{' (smoke: tiny random models, not a result)' if args.smoke else ''}",
        "",
        f"- command: `{command_line()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f"- refine SFT: {len(world.boot)} bootstrap prompts, {args.k} sampled refinements each beside the guidance "
        f"library, the prompt-only prompter's guidance and no change; {args.sft_epochs:g} epochs; y₀ shown up to "
        f"{args.answer_tokens} tokens",
        f"- refine RL: kl-optimum, {args.rl_rounds} round(s) of {args.rl_prompts} fresh prompts, λ 0.5, K 4; kept "
        f"round {kept} by the training reward on {len(world.rl_val)} held-out training prompts",
        f"- gate threshold (align-pro-gated, refine-gated): {threshold:+.3f}, the training reward's "
        f"{GATED_RETRY_SHARE:.0%} quantile of the frozen answers to those held-out prompts",
        f"- evaluation: {len(world.eval)} held-out prompts (no training saw them)",
        "- stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        f"- wall time: {(time.time() - started) / 60:.1f} min",
        "",
        "### Targets",
        "",
        *targets_lines(summary),
        "",
        "### What it writes",
        "",
        *refinement_lines(summary, records, args.examples),
        "",
        render_markdown(summary),
    ]
    section = "\n".join(md)
    key = "refine-smoke" if args.smoke else "refine"
    copy = world.bench / args.eval_dir / "section.md"
    copy.write_text(section)
    publish(section, copy, key, HISTORY_PAGE, docs=args.publish)


if __name__ == "__main__":
    main()
