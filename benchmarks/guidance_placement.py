"""Guidance placement: does the searched text help more before x, or as the frozen target's system prompt?

Every guidance measured so far was appended to x (the augment mode's rewrite). The best text wins about 66%
against the bare prompt held out, and widens the reward distribution. Where an instruction sits in the target's
context is a lever a user would try before training anything, and one no earlier run measured:

- ``searched``: the text after x (what align-pro learned, the reference);
- ``searched-prefix``: the text before x, x verbatim after it;
- ``searched-system``: x verbatim, the text as the target's system prompt (replacing SmolLM2's default one);
- ``expert-system``: x verbatim, a persona-style system prompt built from the library's expert text.

The variants are compared on the 64 held-out AlpacaEval validation prompts under the training reward; those that
gain within 0.05 of the appended text there, or gain with a lower variance than frozen (issue 5's other target),
are then evaluated once on the benchmark's 100 held-out prompts under both judges. The evaluation prompts choose
nothing.

    python benchmarks/guidance_placement.py [--out runs/bench]   # trains the two reward models if missing
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignpro_plugins.evaluation import (  # noqa: E402
    Configuration,
    Evaluator,
    FixedTemplate,
    FrozenAlone,
    TargetInput,
)
from alignpro_plugins.stats import variance_ratio  # noqa: E402
from alignpro_plugins.targets import CachedTarget, TransformersTarget  # noqa: E402
from benchmarks.demonstration_experiment import SEARCHED  # noqa: E402
from benchmarks.run_benchmark import (  # noqa: E402
    BUDGETS,
    against_frozen_table,
    command_line,
    eval_prompts,
    head_to_head_table,
    judges,
    machine,
    mean_words,
    publish,
    rewards_by_config,
    side_evaluation,
    train_reward_models,
    validation_prompts,
    win_cell,
)

EXPERT = (
    "You are an expert assistant. Give accurate, comprehensive and well-structured answers with concrete "
    "examples. Write complete, detailed answers of several paragraphs."
)


@dataclass
class Prefixed(Configuration):
    """The guidance before x; x kept verbatim after it."""

    guidance: str = SEARCHED
    name: str = "searched-prefix"
    description: str = "the searched guidance text before x"

    def inputs(self, prompts):
        return [[TargetInput(f"{self.guidance}\n\n{x.lstrip()}", self.guidance)] for x in prompts]

    def fingerprint(self) -> str:
        return super().fingerprint() + self.guidance


def with_system_prompt(shared: CachedTarget, system_prompt: str, cache: Path) -> CachedTarget:
    """The shared in-process target's weights with another system prompt, answers cached in `cache`.

    The system prompt is part of the target's settings, so its answers never collide with the shared ones.
    """
    inner = shared.target
    if not isinstance(inner, TransformersTarget):
        raise TypeError("the system-prompt variants need the in-process transformers target, not a server")
    target = TransformersTarget(
        inner.model,
        inner.tokenizer,
        max_new_tokens=inner.max_new_tokens,
        batch_size=inner.batch_size,
        system_prompt=system_prompt,
        name=inner._name,
    )
    return CachedTarget(target, cache)


def system_variant(shared: CachedTarget, system_prompt: str, name: str, cache: Path) -> Configuration:
    config = FrozenAlone(name=name, description=f"x verbatim, system prompt: {system_prompt}")
    # Configuration.target is a plain class attribute, not a dataclass field, so it is set after construction.
    config.target = with_system_prompt(shared, system_prompt, cache)
    return config


def placements(shared: CachedTarget, system_cache: Path) -> list[Configuration]:
    """The four placements, the system-prompt ones answering through `shared`'s weights."""
    return [
        FixedTemplate(template=SEARCHED, name="searched", description="the searched guidance text appended"),
        Prefixed(),
        system_variant(shared, SEARCHED, "searched-system", system_cache),
        system_variant(shared, EXPERT, "expert-system", system_cache),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the benchmark's output folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    budget = BUDGETS["standard"]
    times = train_reward_models(out, budget)

    val = validation_prompts(budget)
    val_dir, val_target = side_evaluation(out, budget, "eval-placement-validation")
    variants = placements(val_target, val_dir / "system_cache.jsonl")
    # Selection on the validation prompts, training reward only (the independent judge never picks anything).
    t = time.time()
    report_val = Evaluator(val, val_target, {"reward": judges(out)["reward"]}, out_dir=val_dir).run(
        [FrozenAlone(), *variants]
    )
    times["validation"] = time.time() - t
    vby = rewards_by_config(report_val.records)
    gain = {v.name: fmean(vby[v.name, "reward"]) - fmean(vby["frozen", "reward"]) for v in variants}
    ratio = {
        v.name: variance_ratio(vby[v.name, "reward"], vby["frozen", "reward"])["ratio"] for v in variants
    }
    chosen_names = {
        v.name
        for v in variants
        if v.name == "searched"
        or gain[v.name] > gain["searched"] - 0.05
        or (gain[v.name] > 0 and ratio[v.name] < 1)
    }

    prompts = eval_prompts(budget)
    ev_dir, target = side_evaluation(out, budget, "eval-placement")
    chosen = [v for v in placements(target, ev_dir / "system_cache.jsonl") if v.name in chosen_names]
    t = time.time()
    report = Evaluator(prompts, target, judges(out), out_dir=ev_dir).run(
        [FrozenAlone(), FixedTemplate(), *chosen]
    )
    times["evaluation"] = time.time() - t
    new_answers = target.stats.calls + sum(v.target.stats.calls for v in chosen if v.target is not None)
    by = rewards_by_config(report.records)
    val_rows = [
        f"| {v.name} | {win_cell(vby[v.name, 'reward'], vby['frozen', 'reward'])} | {gain[v.name]:+.3f} | "
        f"{ratio[v.name]:.2f} | {mean_words(report_val.records, v.name):.0f} | "
        f"{'yes' if v.name in chosen_names else 'no'} |"
        for v in variants
    ]
    md = [
        "## Experiment: where the guidance goes (after x, before x, or the target's system prompt)",
        "",
        f"- command: `{command_line()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f'- texts: the searched text ("{SEARCHED}"); for `expert-system`: "{EXPERT}"',
        f"- selection: {len(val)} held-out AlpacaEval validation prompts, training reward; a variant is evaluated "
        "held out when its gain is within 0.05 of the appended text's, or when it gains with a lower variance than "
        "frozen",
        f"- evaluation: the benchmark's {len(prompts)} held-out prompts, answers capped at {budget['eval_tokens']} "
        f"tokens, both judges; {new_answers} new answers",
        "- times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        "",
        "On the validation prompts (training reward), against frozen:",
        "",
        "| variant | win rate | mean gain | variance / frozen | answer words | evaluated held out |",
        "|---|---|---|---|---|---|",
        *val_rows,
        "",
        f"On the {len(prompts)} held-out prompts, against frozen:",
        "",
        *against_frozen_table(by, report.records, ["template", *(v.name for v in chosen)]),
        "",
        *(
            head_to_head_table(by, [v.name for v in chosen], "searched")
            or ["No other placement was evaluated held out."]
        ),
    ]
    publish("\n".join(md), ev_dir / "section.md", "guidance-placement-experiment")


if __name__ == "__main__":
    main()
