"""The whole Align-Pro comparison on ../shared/data, with the packaged models.

reward model (training reward) and an independent judge on disjoint prompt shards of AlpacaEval + HH-RLHF
preferences -> SFT of the SmolLM2 prompter by best-of-K bootstrap on BPO instructions (sampled guidance, the
guidance library, 'no change') -> RL (kl-optimum; optionally GRPO) with KL to the SFT prompter on AlpacaEval
prompts -> RLHF oracle: the same RL on the target itself -> evaluation on dolly_eval + self_instruct_eval (never trained on) of
frozen / template / zero-shot / SFT / Align-Pro / Align-Pro behind the retry gate (its rewrite only where the
training reward scores the frozen answer poorly) / rerank, rerank-3 and rerank-template / best-of-K / best-of-n
sampling of the frozen model (the equal-compute baseline of the modes that ask more than once) / RLHF oracle,
under both judges. Stages whose artifacts exist are reused, so an interrupted run resumes.

    python -m benchmarks.run_benchmark            # standard budget, resumable (--skip-oracle: about 1 h 45 min on 2 CPU cores)
    python -m benchmarks.run_benchmark --quick    # every stage at smoke size, 8-16 minutes
    bash scripts/serve_vllm.sh &                  # optional: the frozen target's answers from a vLLM server
    python -m benchmarks.run_benchmark --quick --target-base-url http://127.0.0.1:8080/v1 --out runs/bench-quick-vllm

The standard run's section goes to docs/benchmarks.md; a --quick run (a pipeline check, not a result) to
docs/benchmarks-history.md. Both are also saved beside the artifacts (<out>/eval/benchmark_section.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignpro_plugins.eval_report import format_win

ROOT = Path(__file__).resolve().parents[1]
# Results for a newcomer (the standard run, the speed benchmarks) and the lab notebook (confirmations, quick runs).
RESULTS_PAGE = ROOT / "docs" / "benchmarks.md"
HISTORY_PAGE = ROOT / "docs" / "benchmarks-history.md"
# The standard run's summary, machine-readable: the numbers the README and the guide quote.
SUMMARY_FILE = ROOT / "docs" / "benchmark-summary.json"
DATA = Path(os.environ.get("ALIGNPRO_SHARED_DATA", ROOT.parent / "shared" / "data"))
# Held out everywhere: no reward pair, bootstrap or RL prompt is ever one of these.
EVAL_SETS = ("dolly_eval.json", "self_instruct_eval.json")


def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, no GPU"
        if not torch.cuda.is_available()
        else "GPU"
    )


def targets_table(summary: dict) -> str:
    """The project's targets, each with the measured value and whether it is met (independent judge first)."""
    c, h = summary["configs"], summary["head_to_head"]
    rows = []

    def add(
        name: str,
        value: float,
        ok: bool,
        fmt: str = "{:.1%}",
        why_nan: str = "",
        equal_length: dict | None = None,
    ) -> None:
        if value != value:  # nan: the statistic has no meaning for this run
            rows.append(f"| {name} | undefined | NOT met: {why_nan} |")
            return
        # A win rate is shown with the same win at equal answer length: judges favour longer answers.
        lc = f"; at equal length {format_win(equal_length)}" if equal_length else ""
        rows.append(f"| {name} | {fmt.format(value)}{lc} | {'met' if ok else 'NOT met'} |")

    def variance_below_frozen(name: str, judge: str, prefix: str = "") -> None:
        v, v_f = c[name][judge]["variance"], c["frozen"][judge]["variance"]
        vr = c[name][judge].get("variance_ratio_vs_reference")
        add(
            f"{prefix}reward variance below frozen ({judge}): {name} / frozen"
            + (f" [paired 95% CI {vr['ci_low']:.2f}–{vr['ci_high']:.2f}]" if vr else ""),
            v / v_f if v_f else float("nan"),
            v < v_f,
            "{:.2f}",
        )

    for judge in ("independent", "reward"):
        wr = c["align-pro"][judge]["vs_reference"]
        lc = c["align-pro"][judge].get("vs_reference_length_controlled")
        add(
            f"align-pro vs frozen win rate ≥ 75% and CI low > 50% ({judge})",
            wr["win_rate"],
            wr["win_rate"] >= 0.75 and wr["ci_low"] > 0.5,
            equal_length=lc,
        )
        for other, goal in (("template", 0.60), ("zero-shot", 0.75)):
            if other in h:
                w = h[other][judge]
                add(
                    f"align-pro vs {other} ≥ {goal:.0%} and CI low > 50% ({judge})",
                    w["win_rate"],
                    w["win_rate"] >= goal and w["ci_low"] > 0.5,
                    equal_length=w.get("length_controlled"),
                )
        add(
            f"align-pro vs frozen ≥ 65% (paper-level, {judge})",
            wr["win_rate"],
            wr["win_rate"] >= 0.65,
            equal_length=lc,
        )
        if "template-picked" in h:  # context: the best fixed text picked on the training prompts
            w = h["template-picked"][judge]
            eq = f"; at equal length {format_win(w['length_controlled'])}" if "length_controlled" in w else ""
            rows.append(
                f"| (context) align-pro vs template-picked, the best fixed text on the training prompts "
                f"({judge}) | {format_win(w)}{eq} | — |"
            )
        for other in ("frozen", "sft"):  # the RL stage must raise the mean above both
            d = h.get(other, {}).get(judge, {})
            if "mean_diff" in d:
                lo, hi = d["mean_diff_ci"]
                rows.append(
                    f"| align-pro mean reward above {other} ({judge}): paired difference [95% CI] | "
                    f"{d['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                    f"{'met' if d['mean_diff'] > 0 else 'NOT met'}{' (CI includes 0)' if lo <= 0 < d['mean_diff'] else ''} |"
                )
        variance_below_frozen("align-pro", judge)
        # The same prompter deployed behind the retry gate, against the paper-level targets.
        if "align-pro-gated" in c:
            gw = c["align-pro-gated"][judge]["vs_reference"]
            calls = c["align-pro-gated"].get("target_calls_per_prompt", float("nan"))
            add(
                f"(deployment mode, {calls:.2f} target calls per prompt) align-pro-gated vs frozen ≥ 65% "
                f"and CI low > 50% ({judge})",
                gw["win_rate"],
                gw["win_rate"] >= 0.65 and gw["ci_low"] > 0.5,
                equal_length=c["align-pro-gated"][judge].get("vs_reference_length_controlled"),
            )
            variance_below_frozen("align-pro-gated", judge, "(deployment mode) ")
        if judge in summary.get("gap_closed", {}):
            g = summary["gap_closed"][judge]
            add(
                f"share of frozen → RLHF-oracle gap closed ≥ 70% ({judge})",
                g,
                g >= 0.7,
                why_nan="the RLHF oracle did not beat the frozen model",
            )
    gain = {j: c["align-pro"][j]["mean"] - c["frozen"][j]["mean"] for j in ("independent", "reward")}
    ratio = gain["independent"] / gain["reward"] if gain["reward"] > 0 else float("nan")
    add(
        "independent-judge gain ≥ half the training-reward gain",
        ratio,
        ratio >= 0.5,
        "{:.2f}",
        why_nan=f"no mean-reward gain under the training reward ({gain['reward']:+.3f})",
    )
    return "| target | measured | |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def align_pro_description(rl_algorithm: str) -> str:
    """The benchmark's align-pro configuration's description: part of its records' fingerprint, so side
    evaluations of the same prompter use it too and their records pool with the benchmark's."""
    return f"(ii) Align-Pro prompter (RL: {rl_algorithm})"


def run_lines(started: float) -> list[str]:
    """A speed section's first lines: how it was invoked, when, on what machine and how long it took."""
    return [
        f"- command: `{command_line()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; "
        f"{time.time() - started:.0f} s",
    ]


def command_line(argv: list[str] | None = None) -> str:
    """How this benchmark was invoked (``python -m benchmarks.<name> ...``, from the checkout's root), quoted so
    that the line can be pasted back into a shell."""
    args = sys.argv[1:] if argv is None else argv
    # Paths inside this checkout are written relative to its root, so the line holds no machine's folders.
    args = [_relative_to_root(a) for a in args]
    return shlex.join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *args])


def _relative_to_root(arg: str) -> str:
    path = Path(arg)
    if path.is_absolute() and path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return arg


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the marked section of a benchmark page, keeping every other section."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# Two budgets. "standard" is the run whose numbers docs/benchmarks.md reports (without the oracle about 1 h 45 min
# of stages on a 2-core CPU, resumable stage by stage); "quick" runs every stage end to end at smoke size: a
# pipeline check, not a result (8 to 16 minutes on 2-core CPUs).
BUDGETS: dict[str, dict[str, Any]] = {
    "standard": dict(
        # The reward model and the judge: one full pass over their shard's pairs (rm_steps -1) with the fast stage
        # (batches of one prompt's pairs, each distinct answer encoded once; the lower 4 of MiniLM's 6 layers
        # frozen): 0.798 held-out accuracy in the standard run (8.6 min), 0.68-0.78 for the 80 steps it replaced.
        rm_steps=-1,
        rm_max_length=256,
        rm_freeze_layers=4,
        rm_group_by_prompt=True,
        rm_pairs_per_source=None,
        boot_prompts=128,
        # Smoothed SFT targets (the fixed text that does best over a prompt's most similar bootstrap prompts, the
        # neighbourhood size chosen by leave-one-out) come from the fixed candidates only, so sample none.
        k=0,
        templates=None,  # the whole guidance library
        boot_neighbours=-1,
        # Guidance search (library + recombined sentences, successive halving from 16 prompts) before SFT; its
        # validated text joins the bootstrap's fixed candidates. 0 skips the stage.
        guidance_min_prompts=16,
        # Measured (docs/benchmarks-history.md, "Re-check"): with every target the searched two-sentence text, 3 epochs left the prompter
        # reproducing it on 24/100 held-out prompts (58.5% vs frozen), 6 epochs on 96/100 (65.0%).
        sft_epochs=6,
        kl_prompts=96,  # per round: every round samples fresh prompts (half BPO, half AlpacaEval)
        kl_k=4,
        kl_anchors=False,  # measured: anchors weighted as ρ_sft samples took 70% of draws and collapsed RL
        kl_rounds=3,
        kl_val_prompts=64,  # held-out training prompts that pick the deployed round (SFT when none beats it)
        grpo_steps=12,
        eval_per_set=50,
        best_of_k=4,
        target_tokens=96,
        eval_tokens=128,
    ),
    "quick": dict(
        rm_steps=12,
        rm_max_length=256,
        rm_freeze_layers=4,
        rm_group_by_prompt=True,
        rm_pairs_per_source=6000,
        boot_prompts=16,
        k=0,
        templates=3,
        boot_neighbours=-1,
        guidance_min_prompts=0,  # not run at quick size yet: the standard run is the one that measured it
        sft_epochs=2,
        kl_prompts=8,  # RL and oracle sampling, scoring and distillation scale with it
        kl_k=3,
        kl_anchors=False,
        kl_rounds=1,
        kl_val_prompts=8,
        grpo_steps=4,
        eval_per_set=5,
        best_of_k=2,
        target_tokens=64,
        eval_tokens=64,
    ),
}


def target_args(budget: dict) -> dict:
    """The frozen target as every training stage sees it (the packaged SmolLM2, short answers, big batches), or
    the OpenAI-compatible server the run was given (``--target-base-url``)."""
    if budget.get("target_base_url"):
        return dict(
            target_base_url=budget["target_base_url"],
            target_model_name=budget["target_model_name"],
            target_max_new_tokens=budget["target_tokens"],
            target_concurrency=SERVED_CONCURRENCY,
        )
    return dict(
        target="smollm2-135m-instruct", target_max_new_tokens=budget["target_tokens"], target_batch_size=32
    )


# Requests in flight to a served target: vLLM batches them (bench_target_backends.py measured 32 here).
SERVED_CONCURRENCY = 32


def frozen_target(budget: dict, max_new_tokens: int):
    """The frozen target with this answer cap: the packaged SmolLM2 in process, or the run's server."""
    from alignpro_plugins.targets import OpenAICompatibleTarget, TransformersTarget

    if budget.get("target_base_url"):
        return OpenAICompatibleTarget(
            budget["target_base_url"],
            budget["target_model_name"],
            max_tokens=max_new_tokens,
            concurrency=SERVED_CONCURRENCY,
            timeout=600,
        )
    return TransformersTarget("smollm2-135m-instruct", max_new_tokens=max_new_tokens, batch_size=32)


def sft_library(budget: dict) -> list[str]:
    from trainers.sft_config import AlignProSFTConfig

    library = AlignProSFTConfig().templates
    return library[: budget["templates"]] if budget["templates"] else library


def bootstrap_prompts(budget: dict) -> list[str]:
    """The BPO instructions the SFT stage's best-of-K bootstrap trains on (no evaluation prompt among them)."""
    from alignpro_plugins.data import load_prompts

    bpo = load_prompts(str(DATA / "bpo_prompt_pairs.json"), field="instruction", context_field="context")
    return bpo[: budget["boot_prompts"]]


def held_out_prompts() -> set[str]:
    """Every evaluation prompt, not only the ones a budget evaluates on: kept out of all training data."""
    from alignpro_plugins.data import load_prompts

    return {
        x
        for name in EVAL_SETS
        for x in load_prompts(str(DATA / name), field="instruction", context_field="context")
    }


def rl_prompt_pools(budget: dict) -> tuple[list[str], list[str]]:
    """(AlpacaEval instructions, kl-optimum's RL prompts), both disjoint from every evaluation prompt.

    kl-optimum takes the BPO prompts the bootstrap did not use interleaved with AlpacaEval instructions: BPO's
    task instructions with context are closer to what users send than AlpacaEval's open questions alone.
    """
    from alignpro_plugins.data import load_prompts

    held_out = held_out_prompts()
    alpaca = [
        x
        for x in dict.fromkeys(load_prompts(str(DATA / "alpaca_eval_prefs.jsonl.gz"), field="prompt"))
        if x not in held_out
    ]
    bpo = [
        x
        for x in load_prompts(
            str(DATA / "bpo_prompt_pairs.json"), field="instruction", context_field="context"
        )
        if x not in held_out
    ]
    mixed = [x for pair in zip(bpo[budget["boot_prompts"] :], alpaca[400:], strict=False) for x in pair]
    # Some instructions are in both sets ("Hello there Obi One Kenobi"); each RL prompt counts once.
    return alpaca, list(dict.fromkeys(mixed))


def reward_config(output_dir: Path, budget: dict, shard: int):
    """A reward stage on one prompt shard of the preference data (0: training reward, 1: independent judge)."""
    from trainers.reward_config import AlignProRewardConfig

    return AlignProRewardConfig(
        output_dir=str(output_dir),
        preference_data=[str(DATA / "alpaca_eval_prefs.jsonl.gz"), str(DATA / "hh_rlhf_harmless.jsonl.gz")],
        max_pairs_per_source=budget["rm_pairs_per_source"],
        exclude_prompt_files=[str(DATA / name) for name in EVAL_SETS],
        prompt_shard=shard,
        split_seed=shard,
        seed=shard,
        max_steps=budget["rm_steps"],  # -1: one epoch over the shard
        num_train_epochs=1,
        max_length=budget["rm_max_length"],
        freeze_layers=budget["rm_freeze_layers"],
        group_by_prompt=budget["rm_group_by_prompt"],
        logging_steps=10,
        save_steps=200,
        save_total_limit=1,
    )


def train_reward_models(out: Path, budget: dict) -> dict[str, float]:
    """The training reward (out/reward, shard 0) and the independent judge (out/judge, shard 1), each trained
    unless its artifact is there; returns the seconds each stage that ran took, by stage name."""
    from trainers.reward_trainer import train_reward

    times = {}
    for name, shard in (("reward", 0), ("judge", 1)):
        if not (out / name / "alignpro_reward.json").exists():
            t = time.time()
            train_reward(reward_config(out / name, budget, shard))
            times[f"reward stage ({name})"] = time.time() - t
    return times


def validation_prompts(budget: dict) -> list[str]:
    """Held-out training prompts (AlpacaEval) that the RL stage picks its round on and the guidance search its text."""
    return rl_prompts(budget)[-budget["kl_val_prompts"] :]


def guidance_config(out: Path, budget: dict):
    """The guidance search: the library and its recombinations on the bootstrap's prompts, training reward."""
    from trainers.guidance_search_config import GuidanceSearchConfig

    return GuidanceSearchConfig(
        output_dir=str(out / "guidance"),
        reward_model=str(out / "reward"),
        seed_texts=sft_library(budget),
        min_prompts=budget["guidance_min_prompts"] or 16,
        validation_prompts=budget["kl_val_prompts"],
        **target_args(budget),
    )


def run_guidance_search(out: Path, budget: dict):
    """The guidance search on the bootstrap's prompts, its finalists compared on the RL stage's held-out
    AlpacaEval prompts."""
    from trainers.guidance_search_trainer import search_guidance

    return search_guidance(
        guidance_config(out, budget),
        prompts=bootstrap_prompts(budget),
        validation_prompts=validation_prompts(budget),
    )


def sft_config(output_dir: Path, reward_model: Path, budget: dict):
    """The benchmark's SFT stage: best-of-K bootstrap over sampled rewrites and the guidance library, then LoRA SFT.

    With a guidance search in the budget, the search's validated text is scored first among the fixed candidates.
    """
    from trainers.sft_config import AlignProSFTConfig

    searched: dict[str, Any] = (
        dict(templates_from=str(Path(output_dir).parent / "guidance"), templates_from_top=1)
        if budget["guidance_min_prompts"]
        else {}
    )
    return AlignProSFTConfig(
        output_dir=str(output_dir),
        reward_model=str(reward_model),
        num_candidates=budget["k"],
        templates=sft_library(budget),
        **searched,
        max_pairs=budget["boot_prompts"],
        bootstrap_neighbours=budget["boot_neighbours"],
        num_train_epochs=budget["sft_epochs"],
        save_steps=1000,
        **target_args(budget),
    )


def kl_budget(budget: dict) -> dict:
    """kl-optimum settings shared by the prompter's RL stage and the RLHF oracle: same rounds, prompts, samples."""
    return dict(
        rounds=budget["kl_rounds"],
        prompts_per_round=budget["kl_prompts"],
        resume=True,  # a longer budget continues after the rounds already done
        beta=0.5,
        learning_rate=1e-4,
        num_generations=budget["kl_k"],
        per_device_train_batch_size=8,
    )


def kl_rl_config(out: Path, output_dir: Path, budget: dict, templates: list[str]):
    """The benchmark's kl-optimum RL stage."""
    from trainers.kl_optimum_config import KLOptimumConfig

    return KLOptimumConfig(
        output_dir=str(output_dir),
        sft_prompter=str(out / "sft"),
        reward_model=str(out / "reward"),
        **kl_budget(budget),
        # The SFT bootstrap's fixed candidates (its guidance library and "no change") join every group.
        anchors=[*templates, ""] if budget["kl_anchors"] else [],
        # The last kl_val_prompts prompts it is given are held out to pick the deployed round (see rl_prompts).
        validation_prompts=budget["kl_val_prompts"],
        keep_best=budget["kl_val_prompts"] > 0,
        max_completion_length=48,
        **target_args(budget),
    )


def oracle_config(output_dir: Path, reward_model: Path, budget: dict):
    """The RLHF oracle: the same reward, prompts, algorithm and sample budget as the prompter's RL stage."""
    from trainers.oracle_config import KLOptimumOracleConfig

    return KLOptimumOracleConfig(
        output_dir=str(output_dir),
        target="smollm2-135m-instruct",
        reward_model=str(reward_model),
        **kl_budget(budget),
        max_completion_length=budget["target_tokens"],
    )


def oracle_target(adapter: Path, cache: Path, max_new_tokens: int):
    """The oracle's LoRA on the target, for evaluation, with its own answer cache."""
    from peft import PeftModel

    from alignpro_plugins.manifest import weights_hash
    from alignpro_plugins.targets import CachedTarget, TransformersTarget

    # The adapter's hash in the name keeps a retrained oracle from reusing cached answers and records.
    oracle = TransformersTarget(
        "smollm2-135m-instruct",
        max_new_tokens=max_new_tokens,
        batch_size=32,
        name=f"smollm2+rlhf-oracle@{weights_hash(adapter)[7:19]}",
    )
    oracle.model = PeftModel.from_pretrained(oracle.model, str(adapter)).eval()
    return CachedTarget(oracle, cache)


def eval_target(out: Path, budget: dict, cache: Path | None = None):
    """The frozen target as evaluation sees it; scripts share the answers cached under out/eval/ by default."""
    from alignpro_plugins.targets import CachedTarget

    return CachedTarget(
        frozen_target(budget, budget["eval_tokens"]), cache or out / "eval" / "target_cache.jsonl"
    )


PICKED = (
    "the fixed text (library, or the guidance search's) with the best mean training reward on the SFT bootstrap's "
    "prompts, appended"
)


def picked_template(out: Path) -> str | None:
    """The guidance text a user would append without a prompter: the fixed text (library, or the guidance
    search's) with the best mean training reward on the SFT bootstrap's prompts (None without a bootstrap)."""
    log = out / "sft" / "bootstrap.jsonl"
    if not log.exists():
        return None
    rewards: dict[str, list[float]] = defaultdict(list)
    for row in map(json.loads, log.read_text().splitlines()):
        if not any(c["fallback"] == "no_change" for c in row["candidates"]):
            continue
        for c in row["candidates"]:
            rewards[c["text"]].append(c["reward"])
    n = max((len(a) for a in rewards.values()), default=0)
    # Only texts scored on every prompt are fixed texts (sampled rewrites differ per prompt).
    means = {text: sum(a) / len(a) for text, a in rewards.items() if text and len(a) == n}
    return max(means, key=lambda t: means[t]) if means else None


def side_evaluation(out: Path, budget: dict, name: str):
    """A side evaluation's folder and target, seeded with copies of the benchmark's records and answers.

    Configurations the benchmark already evaluated are reused from the copies; new answers go to the copy, so the
    benchmark's own records stay as the benchmark wrote them.
    """
    ev_dir = out / name
    ev_dir.mkdir(parents=True, exist_ok=True)
    for file in ("records.jsonl", "target_cache.jsonl"):
        if (out / "eval" / file).exists() and not (ev_dir / file).exists():
            shutil.copy(out / "eval" / file, ev_dir / file)
    return ev_dir, eval_target(out, budget, ev_dir / "target_cache.jsonl")


def frozen_validation_scores(out: Path, budget: dict, name: str, gate) -> list[float]:
    """The gate's scores of the frozen model's answers to the validation prompts (held-out training prompts).

    A gated retry's threshold comes from these, never from an evaluation prompt. Answers are cached in out/name.
    """
    from alignpro_plugins.evaluation import Evaluator, FrozenAlone

    val_dir, val_target = side_evaluation(out, budget, name)
    report = Evaluator(validation_prompts(budget), val_target, {"reward": gate}, out_dir=val_dir).run(
        [FrozenAlone()]
    )
    return [r["rewards"]["reward"] for r in report.records]


# The gated deployment mode's budget: the share of the validation prompts' frozen answers it would retry. Fixed
# before any evaluation (gated_retry.py measured 25/50/75% on these prompts; 50% held on 200 unseen prompts).
GATED_RETRY_SHARE = 0.5


def publish(section: str, copy: Path, key: str, page: Path = RESULTS_PAGE, docs: bool = True) -> None:
    """A result section: printed, and unless ``docs`` is False (a script's --no-docs) saved beside its artifacts
    and written into a benchmark page under key."""
    print(section)
    if docs:
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(section)
        write_section(page, key, section)


def first_tries(mode: str) -> list:
    """frozen, template and zero-shot: the model alone and what a user tries before training anything."""
    from alignpro_plugins.evaluation import FixedTemplate, FrozenAlone, WithPrompter
    from alignpro_plugins.prompter import Prompter

    zero = Prompter.from_base("smollm2-135m-instruct", mode=mode)
    return [
        FrozenAlone(),
        FixedTemplate(),
        WithPrompter(prompter=zero, name="zero-shot", description="untrained base prompter, same template"),
    ]


def reranks(tries: list, align_pro) -> list:
    """Every answer asked, the training reward's best kept: the gate with no threshold (2 or 3 target calls).

    `rerank` answers x and the prompter's rewrite; `rerank-3` also the default instruction (the inputs of the
    selection-headroom analysis's "answer in hand" row). `rerank-template` is what a user with the reward model
    but no prompter would try: x and the default instruction. No parameter is chosen anywhere.
    """
    from alignpro_plugins.evaluation import WithRetryGate

    template = next(c for c in tries if c.name == "template")
    return [
        WithRetryGate.rerank(
            [template],
            name="rerank-template",
            description="x and x with the default instruction both answered; the training reward keeps the better",
        ),
        WithRetryGate.rerank([align_pro]),
        WithRetryGate.rerank(
            [template, align_pro],
            name="rerank-3",
            description="x, x with the default instruction and the prompter's rewrite; the training reward keeps the best",
        ),
    ]


# Best-of-n sampling of the frozen model: the plain way to spend n target calls, which rerank (2), rerank-3 (3),
# the gate (1-2) and best-of-K (K) are measured against at equal calls. Fixed before any evaluation.
BEST_OF_N_TEMPERATURE = 0.7


def sampling_baselines(ns: list[int]) -> list:
    """best-of-n for each n: n answers of the frozen model sampled on x, the training reward keeps the best."""
    from alignpro_plugins.evaluation import BestOfN

    return [BestOfN(n=n, temperature=BEST_OF_N_TEMPERATURE) for n in sorted(set(ns))]


def judges(out: Path, reward: Path | None = None) -> dict:
    """The training reward (out/reward unless given) and the independent judge, as every evaluation names them."""
    from alignpro_plugins.rewards import load_reward

    return {
        "reward": load_reward(str(reward or out / "reward")),
        "independent": load_reward(str(out / "judge")),
    }


def eval_prompts(budget: dict) -> list[str]:
    """The held-out evaluation prompts: the first n of dolly_eval and of self_instruct_eval (never trained on)."""
    return first_eval_prompts(budget["eval_per_set"])


def first_eval_prompts(n: int) -> list[str]:
    """The first n prompts (with context) of dolly_eval, then the first n of self_instruct_eval."""
    from alignpro_plugins.data import load_prompts

    return [
        x
        for name in EVAL_SETS
        for x in load_prompts(str(DATA / name), field="instruction", context_field="context", limit=n)
    ]


def rl_prompts(budget: dict) -> list[str]:
    """The kl-optimum stage's prompts: its rounds' fresh prompts, then the validation prompts it holds out.

    Validation prompts are AlpacaEval instructions the rounds never see (the head of the pool, which only the
    optional GRPO stage uses); the rounds take the interleaved BPO + AlpacaEval pool.
    """
    alpaca, mixed = rl_prompt_pools(budget)
    rounds = mixed[: budget["kl_prompts"] * budget["kl_rounds"]]
    seen = set(rounds)
    val = [x for x in alpaca if x not in seen][: budget["kl_val_prompts"]]
    return rounds + val


def training_prompts(budget: dict) -> list[str]:
    """Every prompt the benchmark's SFT bootstrap and kl-optimum RL stage use."""
    return list(dict.fromkeys(bootstrap_prompts(budget) + rl_prompts(budget)))


def rounds_done(stage_dir: Path, artifact: str) -> int:
    """kl-optimum rounds a finished stage ran (its metrics log), 0 when it has no artifact yet."""
    log = stage_dir / "metrics.jsonl"
    if not (stage_dir / artifact).exists() or not log.exists():
        return 0
    return max(
        (json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()), default=0
    )


def sft_bootstrap_stats(out: Path) -> dict:
    """The SFT stage's bootstrap statistics, as its manifest records them ({} without a bootstrap)."""
    stage = json.loads((out / "sft" / "alignpro.json").read_text())["provenance"]["stages"][-1]
    return stage.get("bootstrap") or {}


def sft_targets_line(out: Path) -> str:
    """How the SFT stage chose its targets (from its manifest), for the benchmark's header."""
    boot = sft_bootstrap_stats(out)
    if "neighbours" not in boot:
        return f"each bootstrap prompt's own best candidate (winners {boot.get('winners')})"
    loo = ", ".join(f"{k}: {v:.3f}" for k, v in boot["leave_one_out_reward"].items())
    return (
        f"the fixed text with the best mean training reward over each prompt and its {boot['neighbours']} most "
        f"similar bootstrap prompts (chosen by {boot['neighbours_chosen_by']}; mean reward of held-out picks by "
        f"neighbourhood size {loo}); targets {boot.get('winners')}"
    )


def guidance_line(out: Path) -> str:
    """What the guidance search chose, for the benchmark's header."""
    if not (out / "guidance" / "guidance_search.json").exists():
        return "not run"
    from trainers.guidance_search_trainer import GuidanceSearchResult

    r = GuidanceSearchResult.load(out / "guidance")
    val = {c["text"]: c["validation_mean"] for c in r.candidates}
    return (
        f"{len(r.candidates) - 1} texts on {r.search_prompts} bootstrap prompts by successive halving, finalists on "
        f'{r.validation_prompts} validation prompts; chose "{r.best or "(no change)"}" (validation reward '
        f"{val[r.best]:.3f}, no change {val['']:.3f})"
    )


def kept_round_line(rl_dir: Path) -> str:
    """Which kl-optimum round the RL artifact is, and the validation rewards that chose it."""
    rows = [json.loads(ln) for ln in (rl_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    val = {r["step"]: r["val_reward"] for r in rows if "val_reward" in r}
    if not val:
        return "the last round (no validation prompts)"
    stage = json.loads((rl_dir / "alignpro.json").read_text())["provenance"]["stages"][-1]
    kept = stage.get("selected_round")
    return (
        f"kept round {kept} ({'the SFT prompter' if kept == 0 else 'after that many rounds'}) by training reward of "
        f"the deployed rewrites on held-out training prompts: "
        + ", ".join(f"round {k} {v:.3f}" for k, v in sorted(val.items()))
    )


# The stage folders whose frozen-target answers are cached (<stage>/target_cache.jsonl); "rl" is GRPO's.
ANSWER_CACHE_STAGES = ("guidance", "sft", "rl", "rl-kl", "eval", "eval-gate-validation")


def answer_cache_stages(with_grpo: bool) -> list[str]:
    """The stages of this run whose answer caches ``--answers-from`` seeds (``rl/`` only when GRPO runs)."""
    return [s for s in ANSWER_CACHE_STAGES if with_grpo or s != "rl"]


def _cache_rows(path: Path) -> dict[str, str]:
    """A cache file's rows by key, as JSON lines; a line cut off by an interrupted run is skipped."""
    from alignpro_plugins.jsonl import read_jsonl_rows

    return {row["key"]: json.dumps(row) for row in read_jsonl_rows(path, required=("key", "answer"))}


def seed_answer_caches(out: Path, source: Path, stages: Sequence[str] = ANSWER_CACHE_STAGES) -> int:
    """Start each of ``stages``' answer caches with every answer an earlier run cached. A key holds the target's
    identity, its settings and the request, so only identical requests hit: a run with another reward model then
    asks the target only for what is new. Returns the answers seeded (0 when the stages already have caches)."""
    from alignpro_plugins.jsonl import append_jsonl

    rows: dict[str, str] = {}
    for path in sorted(source.glob("*/target_cache.jsonl")):
        rows |= _cache_rows(path)
    if not rows:
        raise SystemExit(
            f"--answers-from {source}: no <stage>/target_cache.jsonl there; give an earlier run's --out"
        )
    seeded = 0
    for stage in stages:
        cache = out / stage / "target_cache.jsonl"
        if not cache.exists():
            append_jsonl(cache, list(rows.values()))
            seeded = len(rows)
    return seeded


def merge_answer_cache(source: Path, dest: Path) -> None:
    """Append the answers of one stage's cache that another's lacks (keys are content hashes: union is safe)."""
    from alignpro_plugins.jsonl import append_jsonl

    if not source.exists():
        return
    have = _cache_rows(dest) if dest.exists() else {}
    new = [line for key, line in _cache_rows(source).items() if key not in have]
    if new:
        append_jsonl(dest, new)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick",
        action="store_true",
        help="every stage at smoke size, a pipeline check (8 to 16 minutes on 2-core CPU machines)",
    )
    ap.add_argument("--out", default=None, help="artifact folder (default runs/bench or runs/bench-quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--target-base-url",
        default=None,
        help="answer as the frozen target from this OpenAI-compatible server (e.g. scripts/serve_vllm.sh's "
        "http://127.0.0.1:8080/v1) instead of in process; the RLHF oracle stays local, so serve fp32",
    )
    ap.add_argument("--target-model-name", default="smollm2", help="the model name the server serves")
    ap.add_argument(
        "--rl-algorithm",
        choices=["kl-optimum", "grpo"],
        default="kl-optimum",
        help="which RL stage's prompter is reported as align-pro",
    )
    ap.add_argument(
        "--with-grpo",
        action="store_true",
        help="with --rl-algorithm kl-optimum, also train and evaluate the GRPO prompter (align-pro-grpo)",
    )
    ap.add_argument(
        "--eval-per-set",
        type=int,
        default=None,
        help="held-out prompts from each evaluation set (standard 50, quick 5); 150 narrows a win rate's interval "
        "from about ±9 to about ±5 points. Every evaluation prompt is kept out of training whatever the number",
    )
    ap.add_argument(
        "--skip-oracle",
        action="store_true",
        help="train and evaluate everything but the RLHF oracle (its stage takes about 30 minutes); a later run "
        "without the flag adds its row, reusing every other stage and evaluation record",
    )
    ap.add_argument(
        "--answers-from",
        default=None,
        metavar="RUN",
        help="seed every stage's answer cache with an earlier run's (its --out): the frozen target is asked only "
        "for requests that run did not make, e.g. when only the reward model changed",
    )
    ap.add_argument(
        "--no-docs",
        action="store_true",
        help="leave docs/ alone (a reproduction run): the section and summary are saved under --out only",
    )
    args = ap.parse_args()
    if args.eval_per_set is not None and not 1 <= args.eval_per_set <= 200:
        ap.error(
            f"--eval-per-set must be between 1 and 200 (the smaller evaluation set's size), got {args.eval_per_set}"
        )
    started = time.time()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    q = args.quick
    budget = dict(BUDGETS["quick" if q else "standard"])
    if args.eval_per_set is not None:
        budget["eval_per_set"] = args.eval_per_set
    if args.target_base_url:  # in the budget, so every stage and the report's header see it
        budget |= dict(target_base_url=args.target_base_url, target_model_name=args.target_model_name)
    out = Path(args.out or ("runs/bench-quick" if q else "runs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    # Stage times survive an interrupted run, so the report of a resumed run still has all of them.
    times_path = out / "stage_times.json"
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.exists() else {}

    def timed(name: str, t: float, resumed: bool = False) -> None:
        # A resumed stage (kl rounds, evaluation cells) adds its new work to the time already spent.
        times[name] = (times.get(name, 0.0) if resumed else 0.0) + time.time() - t
        times_path.write_text(json.dumps(times, indent=1))

    with_grpo = args.rl_algorithm == "grpo" or args.with_grpo
    if args.answers_from:
        seeded = seed_answer_caches(out, Path(args.answers_from), answer_cache_stages(with_grpo))
        logging.info("seeded the answer caches with %d answers from %s", seeded, args.answers_from)
    for name, seconds in train_reward_models(out, budget).items():
        times[name] = seconds
        times_path.write_text(json.dumps(times, indent=1))

    from trainers.sft_trainer import train_sft

    target_kw = target_args(budget)
    sft_templates = sft_library(budget)
    if budget["guidance_min_prompts"] and not (out / "guidance" / "guidance_search.json").exists():
        t = time.time()
        run_guidance_search(out, budget)
        timed("guidance search", t)
    if not (out / "sft" / "alignpro.json").exists():
        # The search answered the library texts on the same prompts with the same target: reuse those answers.
        merge_answer_cache(out / "guidance" / "target_cache.jsonl", out / "sft" / "target_cache.jsonl")
        t = time.time()
        train_sft(sft_config(out / "sft", out / "reward", budget), prompts=bootstrap_prompts(budget))
        timed("sft stage (bootstrap + SFT)", t)

    from trainers.rl_config import AlignProRLConfig
    from trainers.rl_trainer import train_rl

    alpaca_prompts, mixed = rl_prompt_pools(budget)
    if with_grpo and not (out / "rl" / "alignpro.json").exists():
        t = time.time()
        train_rl(
            AlignProRLConfig(
                output_dir=str(out / "rl"),
                sft_prompter=str(out / "sft"),
                reward_model=str(out / "reward"),
                max_steps=budget["grpo_steps"],
                per_device_train_batch_size=8,
                num_generations=4,
                save_steps=5,
                max_completion_length=48,
                **target_kw,
            ),
            prompts=alpaca_prompts[:400],
        )
        timed("rl stage (grpo)", t)

    kl_prompts = mixed[: budget["kl_prompts"] * budget["kl_rounds"]]
    rl_done = rounds_done(out / "rl-kl", "alignpro.json")
    if rl_done < budget["kl_rounds"]:
        t = time.time()
        train_rl(kl_rl_config(out, out / "rl-kl", budget, sft_templates), prompts=rl_prompts(budget))
        timed("rl stage (kl-optimum)", t, resumed=rl_done > 0)

    from trainers.oracle_trainer import train_oracle

    oracle_done = rounds_done(out / "oracle", "alignpro_oracle.json")
    if oracle_done < budget["kl_rounds"] and not args.skip_oracle:
        t = time.time()
        # Same reward model, prompts, algorithm and sample budget as the prompter's RL stage.
        train_oracle(oracle_config(out / "oracle", out / "reward", budget), prompts=kl_prompts)
        timed("rlhf oracle (kl-optimum)", t, resumed=oracle_done > 0)

    from alignpro_plugins.evaluation import (
        BestOfK,
        Evaluator,
        FixedTemplate,
        Oracle,
        WithPrompter,
        WithRetryGate,
        retry_threshold,
    )
    from alignpro_plugins.prompter import Prompter

    n = budget["eval_per_set"]
    prompts = eval_prompts(budget)
    t = time.time()
    tokens = budget["eval_tokens"]
    target = eval_target(out, budget)
    scorers = judges(out)
    kl = Prompter.from_pretrained(out / "rl-kl")
    grpo = Prompter.from_pretrained(out / "rl") if with_grpo else None
    trained = kl if args.rl_algorithm == "kl-optimum" else grpo
    assert trained is not None
    picked = picked_template(out)
    gate_threshold = retry_threshold(
        frozen_validation_scores(out, budget, "eval-gate-validation", scorers["reward"]), GATED_RETRY_SHARE
    )
    tries = first_tries(trained.manifest.mode)
    configs = [
        *tries,
        # The stronger first try: the library text a user would pick with the same reward and training prompts.
        *([FixedTemplate(template=picked, name="template-picked", description=PICKED)] if picked else []),
        WithPrompter(prompter=Prompter.from_pretrained(out / "sft"), name="sft", description="SFT prompter"),
        align_pro := WithPrompter(prompter=trained, description=align_pro_description(args.rl_algorithm)),
        # How AlignedChatModel(retry_gate=...) deploys the same prompter: x first, the rewrite only where the
        # training reward scores the frozen answer in the lowest GATED_RETRY_SHARE of the validation prompts'.
        WithRetryGate(
            retry=[align_pro],
            threshold=gate_threshold,
            name="align-pro-gated",
            description=f"x; the Align-Pro rewrite too where the training reward scores the answer below its "
            f"{GATED_RETRY_SHARE:.0%} validation quantile (the better answer kept)",
        ),
        *reranks(tries, align_pro),
        BestOfK(prompter=trained, k=budget["best_of_k"]),
        # As many target calls as rerank (2), rerank-3 (3) and best-of-K: the equal-compute baselines.
        *sampling_baselines([2, 3, budget["best_of_k"]]),
    ]
    if args.rl_algorithm == "kl-optimum" and grpo is not None:
        at = next(i for i, c in enumerate(configs) if c.name == "align-pro")
        configs.insert(at, WithPrompter(prompter=grpo, name="align-pro-grpo", description="RL stage by GRPO"))
    if not args.skip_oracle:
        configs.append(
            Oracle(target=oracle_target(out / "oracle", out / "eval" / "oracle_cache.jsonl", tokens))
        )
    resumed = (out / "eval" / "records.jsonl").exists()  # then only new cells cost time: add it up
    report = Evaluator(prompts, target, scorers, out_dir=out / "eval").run(configs)
    timed("evaluation", t, resumed=resumed)
    from alignpro_plugins.evaluation import plot_training_curve

    try:
        if with_grpo:
            plot_training_curve(out / "rl" / "metrics.jsonl", out / "eval" / "rl_reward_curve.png")
        plot_training_curve(out / "rl-kl" / "metrics.jsonl", out / "eval" / "rl_kl_reward_curve.png")
    except Exception as exc:
        logging.warning("no RL curve: %s", exc)
    meta = {n: json.loads((out / n / "alignpro_reward.json").read_text()) for n in ("reward", "judge")}
    md = [
        f"## Align-Pro comparison ({'quick: smoke-sized, not a result' if q else 'standard budget'})",
        "",
        "- command: `" + command_line() + "`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine()}",
        f"- git: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()}",
        f"- budget: {budget}",
        f"- training reward model held-out pairwise accuracy: {meta['reward']['heldout_pairwise_accuracy']:.3f} "
        f"({meta['reward']['n_eval_pairs']} pairs); independent judge: {meta['judge']['heldout_pairwise_accuracy']:.3f}; "
        f"prompt digests shared by the two: {len(set(meta['reward']['train_prompt_digests']) & set(meta['judge']['train_prompt_digests']))}",
        f"- evaluation: {len(prompts)} prompts ({n} dolly + {n} self-instruct), frozen-model calls {target.stats.calls}, "
        f"cache hits {target.stats.cache_hits}",
        f"- align-pro-gated: retries with the rewrite below {gate_threshold:+.3f}, the training reward's "
        f"{GATED_RETRY_SHARE:.0%} quantile of the frozen answers to the {budget['kl_val_prompts']} validation prompts "
        f"(held-out AlpacaEval training prompts; the evaluation prompts set nothing)",
        f"- best-of-n: the frozen model's answers to x sampled at temperature {BEST_OF_N_TEMPERATURE} (seeded; "
        "best-of-2's draws are best-of-3's first two), the training reward keeps the best",
        f"- guidance search: {guidance_line(out)}",
        f"- SFT targets: {sft_targets_line(out)}",
        f"- RL: {kept_round_line(out / 'rl-kl')}",
        "- stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        f"- wall time of this invocation: {(time.time() - started) / 60:.1f} min "
        f"(stages reused from an earlier invocation are not in it; all stages: {sum(times.values()) / 60:.1f} min)",
        "",
        report.to_markdown(),
        "### Targets",
        "",
        targets_table(report.summary),
    ]
    section = "\n".join(md)
    # A quick run is a pipeline check: it goes to the lab notebook and never overwrites the result.
    key, page = ("align-pro-comparison-quick", HISTORY_PAGE) if q else ("align-pro-comparison", RESULTS_PAGE)
    publish(section, out / "eval" / "benchmark_section.md", key, page, docs=not args.no_docs)
    if not q:
        summary_file = write_summary(report.summary, budget, meta, out)
        if not args.no_docs:
            shutil.copy(summary_file, SUMMARY_FILE)


def write_summary(summary: dict, budget: dict, meta: dict, out: Path) -> Path:
    """<out>/eval/benchmark-summary.json, the standard run's numbers, machine-readable; published as
    docs/benchmark-summary.json, which the README and guide quote (benchmarks/docs_numbers.py renders them into
    the pages, and a test keeps the pages in sync). Returns the file."""
    from trainers.guidance_search_trainer import GuidanceSearchResult

    guidance = out / "guidance"
    data = {
        "meta": {
            "command": command_line(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": machine(),
            "git": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip(),
            "budget": budget,
            # What answered: the served model's name, or the packaged model in process.
            "target": target_args(budget).get("target_model_name") or target_args(budget)["target"],
            "reward_accuracy": meta["reward"]["heldout_pairwise_accuracy"],
            "judge_accuracy": meta["judge"]["heldout_pairwise_accuracy"],
            "guidance_text": GuidanceSearchResult.load(guidance).best
            if (guidance / "guidance_search.json").exists()
            else None,
        },
        "summary": summary,
    }
    path = out / "eval" / "benchmark-summary.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    main()
