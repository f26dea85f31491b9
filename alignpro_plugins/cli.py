"""`alignpro` command line: models, rewrite, reward, guidance, sft, rl, train (stages from a recipe), eval."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignpro_plugins.guidance import DEFAULT_TEMPLATE

STAGES = {
    "reward": ("trainers.reward_config:AlignProRewardConfig", "trainers.reward_trainer:train_reward"),
    "guidance": (
        "trainers.guidance_search_config:GuidanceSearchConfig",
        "trainers.guidance_search_trainer:search_guidance",
    ),
    "sft": ("trainers.sft_config:AlignProSFTConfig", "trainers.sft_trainer:train_sft"),
    "rl": ("trainers.rl_config:AlignProRLConfig", "trainers.rl_trainer:train_rl"),
    "oracle": ("trainers.oracle_config:RLHFOracleConfig", "trainers.oracle_trainer:train_oracle"),
}
# A second algorithm of a stage has a config class of its own (as TRL pairs a config with each trainer):
# `--algorithm kl-optimum`, or `algorithm: kl-optimum` in YAML, picks it; the stage's train function runs the
# trainer paired with the config it is given.
ALGORITHM_CONFIGS = {
    ("rl", "kl-optimum"): "trainers.kl_optimum_config:KLOptimumConfig",
    ("oracle", "kl-optimum"): "trainers.oracle_config:KLOptimumOracleConfig",
}
DESCRIPTIONS = {
    "models": "list the packaged models and prompters and where they resolve",
    "rewrite": "rewrite prompts with a prompter (text arguments, or jsonl in -> jsonl out)",
    "reward": "train a reward model r(x, y) on preference pairs",
    "guidance": "search for the fixed guidance text that scores best across training prompts",
    "sft": "SFT the prompter on prompt pairs, or on best-of-K bootstrap targets",
    "rl": "Align-Pro RL of the prompter (GRPO, or --algorithm kl-optimum; KL to the SFT prompter)",
    "oracle": "RLHF oracle: fine-tune the target itself by GRPO or kl-optimum (LoRA) on the same reward, for "
    "comparison",
    "train": "run reward -> judge -> guidance -> sft -> rl -> eval from one YAML recipe (the sections it has)",
    "eval": "compare frozen / template / zero-shot / prompter / best-of-k / best-of-n / rerank / gate / oracle "
    "under several judges",
    "export": "merge a prompter into a standalone model folder (safetensors, and GGUF with --gguf) for any server",
    "serve": "an OpenAI-compatible proxy that rewrites each request's latest user message, then forwards it",
}
# Deployment commands: (module:add_arguments, module:command), imported only when used.
DEPLOY_COMMANDS = {
    "export": ("alignpro_plugins.export:add_export_arguments", "alignpro_plugins.export:cmd_export"),
    "serve": (
        "alignpro_plugins.serving.command:add_serve_arguments",
        "alignpro_plugins.serving.command:cmd_serve",
    ),
}


EVAL_DESCRIPTION = """\
Answer held-out prompts with the frozen target in each configuration below and score every answer with every
judge. All statistics are paired by prompt: mean reward, variance, win rate against frozen with a 95% bootstrap
interval and the same win at equal answer length, target calls per prompt, head-to-head rows, each prompter
configuration's distinct outputs, and for the configurations that choose between answers, how often the
selection judge (--judge) agrees with the other judges. Records are written as they finish: rerunning with the
same --out resumes."""
EVAL_CONFIGURATIONS = """\
configurations (target calls per prompt in brackets):
  frozen       the frozen model on the prompt x itself: the reference of every win rate; always run [1]
  template     x with a fixed instruction appended (--template); always run [1]
  zero-shot    the untrained base prompter's rewrite of x, same mode and instructions as --prompter [1]
  align-pro    the trained prompter's rewrite of x (--prompter); --extra-prompter NAME=DIR adds others [1]
  best-of-k    K rewrites sampled from the trained prompter, each answered; the selection judge keeps the
               best answer (--best-of-k K): how much reward RL could still find, not a deployment [K]
  best-of-n    N answers sampled from the frozen model on x itself at --best-of-n-temperature; the selection
               judge keeps the best (--best-of-n N ...): the plain way to spend N calls, the baseline that
               rerank and the gate must beat at equal calls [N]
  rerank       x and the trained prompter's rewrite both answered; the selection judge keeps the better
               (--rerank) [2]
  gated-retry  x first; the rewrite too where the selection judge scores x's answer below a threshold set on
               --gate-prompts (--gated-retry-share SHARE) [1 to 2]
  rlhf-oracle  the target itself fine-tuned by RL (--oracle ADAPTER): the share of the frozen -> oracle gap
               the prompter closes [1]
The selection judge is --judge (the training reward). Each configuration that asks more than once is also
compared with the best-of-n that has as many calls, when that n is evaluated (e.g. --rerank --best-of-n 2).
"""
TRAIN_SECTIONS = """\
Sections run in this order, each writing to <output_dir>/<section>: reward (the training reward), judge (an
independent judge: the reward: section's keys, overridden by its own; give it another prompt_shard), guidance
(the guidance search), sft, rl, and eval (its keys are `alignpro eval`'s flags, e.g. prompts: [FILE],
best_of_n: [2], rerank: true). Unless a section sets it, each stage gets the outputs it needs: the reward model,
the searched guidance, the SFT prompter, and for eval the judges, the trained prompter (and the SFT one beside
it), the training target and the RL log."""
# Where a prompt file's rows keep the prompt when --field is not given: `prompt` (the files alignpro writes, and
# `alignpro rewrite`'s output) or `instruction` (Dolly, Self-Instruct, BPO). One rule for every subcommand.
AUTO_FIELD = "auto"
PROMPT_FIELDS = ("prompt", "instruction")


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, unless the text says it already or there is none (unset, off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "%(default)" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class UsageError(ValueError):
    """Bad command-line or recipe input; ``main`` prints ``alignpro <command>: error: <message>`` and exits 2."""


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _load(ref: str) -> Any:
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def parse_stage_config(stage: str, argv: Sequence[str], yaml_defaults: dict[str, Any] | None = None):
    """TRL-style: dataclass fields become flags; ``--config file.yaml`` supplies defaults the flags override."""
    from transformers import HfArgumentParser

    cls = _stage_config_class(stage, argv, yaml_defaults)
    parser = HfArgumentParser(cls, prog=f"alignpro {stage}", description=DESCRIPTIONS[stage])
    parser.add_argument("--config", default=None, help="YAML file whose keys are this command's flags")
    ns, extra = parser.parse_known_args(argv)
    if extra:
        # Checked before the config is built, so a mistyped flag is reported as itself.
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        hints = "".join(_did_you_mean(a.split("=")[0], flags) for a in extra if a.startswith("--"))
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}{hints}; see `alignpro {stage} --help`")
    defaults = dict(yaml_defaults or {})
    if ns.config:
        defaults.update(_read_yaml(ns.config))
    fields = list(cls.__dataclass_fields__)
    unknown = sorted(set(defaults) - set(fields) - {"config"})
    if unknown:
        hints = "".join(_did_you_mean(k, fields) for k in unknown)
        raise UsageError(f"unknown config keys {unknown}{hints}; see `alignpro {stage} --help`")
    parser.set_defaults(**defaults)
    # output_dir may come from YAML: relax "required" flags that have YAML defaults.
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    args = [a for a in argv]
    return parser.parse_args_into_dataclasses(args=args)[0]


def _stage_config_class(stage: str, argv: Sequence[str], yaml_defaults: dict[str, Any] | None) -> Any:
    """The config class of the algorithm named by ``--algorithm``, else by ``--config``'s YAML, else the recipe."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--algorithm")
    early.add_argument("--config")
    ns, _ = early.parse_known_args(argv)
    algorithm = ns.algorithm
    if algorithm is None and ns.config:
        algorithm = _read_yaml(ns.config).get("algorithm")
    if algorithm is None:
        algorithm = (yaml_defaults or {}).get("algorithm")
    return _load(ALGORITHM_CONFIGS.get((stage, algorithm), STAGES[stage][0]))


def _add_prompter_base(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompter-base",
        help="base model folder or name for --prompter, when the folder its alignpro.json records has moved "
        "(the recorded weights hash is still checked)",
    )
    p.add_argument(
        "--allow-unverified-base",
        action="store_true",
        help="load a --prompter whose base model cannot be verified (no base_model_hash, or no local weights "
        "to hash), with a warning; refused otherwise",
    )


def _add_field(p: argparse.ArgumentParser, rows: str) -> None:
    p.add_argument(
        "--field",
        default=AUTO_FIELD,
        help=f"the prompt column of {rows} (%(default)s: {' or '.join(PROMPT_FIELDS)}, whichever the rows have, in "
        "that order)",
    )


def _prompt_field(source: str, rows: Sequence[Any], field: str) -> str:
    """``field``, or for ``auto`` the first of PROMPT_FIELDS that the first row has."""
    if field != AUTO_FIELD:
        return field
    first = next((r for r in rows if isinstance(r, dict)), {})
    found = next((name for name in PROMPT_FIELDS if name in first), None)
    if found is None:
        raise UsageError(
            f"{source}: the rows have no {' or '.join(repr(f) for f in PROMPT_FIELDS)} field (fields: "
            f"{sorted(first)[:10]}); name the prompt column with --field"
        )
    return found


def _load_prompt_files(sources: Sequence[str], field: str, context_field: str | None) -> list[str]:
    from alignpro_plugins.data import load_prompts, read_located

    prompts: list[str] = []
    for source in sources:
        name = (
            field
            if field != AUTO_FIELD
            else _prompt_field(source, [at.row for at in read_located(source)[:1]], field)
        )
        prompts += load_prompts(source, field=name, context_field=context_field)
    return prompts


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    if not Path(path).is_file():
        raise UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option names to values")
    return data


def cmd_models(args: argparse.Namespace) -> int:
    from alignpro_plugins.models import describe_models
    from alignpro_plugins.prompters import describe_prompters

    for row in describe_models():
        print(f"{row['name']:<24} {row['status'] if row['status'] != 'ok' else row['path']}")
        print(f"{'':<24} {row['description']} (package {row['package']})")
    for row in describe_prompters():  # trained prompters shipped in this package: --prompter NAME
        print(f"{row['name']:<24} {row['status'] if row['status'] != 'ok' else row['path']}")
        print(f"{'':<24} {row['description']} (prompter, needs {row['base_model']})")
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    from alignpro_plugins.data import DataError, read_located
    from alignpro_plugins.prompter import Prompter

    if not args.input and not args.text:
        raise UsageError("give prompt text arguments or --input FILE.jsonl")
    rows: list[Any] = []
    if args.input:
        if not Path(args.input).is_file():
            raise UsageError(f"--input {args.input}: file not found")
        located = read_located(args.input)  # bad bytes or JSON: DataError with the line number
        if not located:
            raise DataError(args.input, None, None, "no rows (an empty file or list)")
        field = _prompt_field(args.input, [at.row for at in located], args.field)
        for at in located:
            if not isinstance(at.row, dict) or not isinstance(at.row.get(field), str):
                raise at.error(args.input, None, f"expected an object with a text field {field!r}")
        rows = [at.row for at in located]
    # Input is checked before the prompter loads.
    prompter = (
        Prompter.from_pretrained(
            args.prompter, base_model=args.prompter_base, allow_unverified_base=args.allow_unverified_base
        )
        if args.prompter
        else Prompter.from_base(args.base)
    )
    if args.input:
        results = prompter.rewrite_results([r[field] for r in rows], mode=args.mode)
        out = open(args.output, "w") if args.output else sys.stdout
        for row, res in zip(rows, results, strict=True):
            out.write(
                json.dumps(
                    {
                        **row,
                        "rewritten": res.text,
                        "generated": res.generated,
                        "fallback_reason": res.fallback_reason,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
        if args.output:
            out.close()
        return 0
    for res in prompter.rewrite_results(args.text, mode=args.mode):
        print(res.text if not args.json else json.dumps(res.to_dict(), ensure_ascii=False))
        if res.fallback_reason and not args.json:
            print(f"[passed through: {res.fallback_reason}]", file=sys.stderr)
    return 0


def run_stage(stage: str, argv: Sequence[str], yaml_defaults: dict[str, Any] | None = None):
    cfg = parse_stage_config(stage, argv, yaml_defaults)
    return _load(STAGES[stage][1])(cfg)


# The sections of an `alignpro train` recipe, in the order they run. judge (a second reward model, on other
# prompts) and eval (`alignpro eval` of the result against the baselines) make it the pipeline the standard
# benchmark measures.
RECIPE_SECTIONS = ("reward", "judge", "guidance", "sft", "rl", "eval")
# The file each section's output folder holds once it is done (--skip-done).
DONE_MARKER = {
    "reward": "alignpro_reward.json",
    "judge": "alignpro_reward.json",
    "guidance": "guidance_search.json",
    "sft": "alignpro.json",
    "rl": "alignpro.json",
    "eval": "results.json",
}


def cmd_train(args: argparse.Namespace) -> int:
    """reward -> judge -> guidance -> sft -> rl -> eval; each stage's output feeds the next unless the recipe
    says otherwise. Every section is parsed and checked before the first stage runs."""
    plan = _recipe_plan(args.config, resume=args.resume)
    for stage, (cfg, wired) in plan.stages.items():
        where = cfg.out if stage == "eval" else cfg.output_dir
        done = (Path(str(where)) / DONE_MARKER[stage]).exists()
        if args.dry_run:
            wiring = "".join(f"\n      {key}: {value}" for key, value in wired.items())
            print(f"{stage:<9} -> {where}{' (done: --skip-done skips it)' if done else ''}{wiring}")
            continue
        if args.skip_done and done:
            print(f"skipping {stage}: {where} already holds its artifact")
            continue
        if stage == "eval":
            cmd_eval(cfg)
        else:
            _load(STAGES["reward" if stage == "judge" else stage][1])(cfg)
    print(f"{'nothing run (--dry-run); ' if args.dry_run else ''}artifacts under {plan.root}")
    return 0


@dataclass
class RecipePlan:
    """A recipe's checked configs: ``stages[name] = (config, {key: value wired in from another stage})``."""

    root: Path
    stages: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)


def _recipe_plan(path: str, resume: bool = False) -> RecipePlan:
    recipe = _read_yaml(path)
    plan = RecipePlan(Path(recipe.pop("output_dir", "runs/recipe")))
    unknown = set(recipe) - set(RECIPE_SECTIONS)
    if unknown:
        raise UsageError(f"{path}: unknown sections {sorted(unknown)}; use {', '.join(RECIPE_SECTIONS)}")
    sections: dict[str, dict[str, Any]] = {}
    for stage in RECIPE_SECTIONS:
        if stage in recipe:
            if not isinstance(recipe[stage] or {}, dict):
                raise UsageError(f"{path}, section {stage}: expected a mapping of option names to values")
            sections[stage] = dict(recipe[stage] or {})
    if "judge" in sections:
        if "reward" not in sections:
            raise UsageError(
                f"{path}, section judge: it takes the reward: section's keys; add a reward: section"
            )
        inherited = {k: v for k, v in sections["reward"].items() if k != "output_dir"}
        sections["judge"] = {**inherited, **sections["judge"]}
    out = {stage: str(plan.root / stage) for stage in sections}
    for stage, section in sections.items():
        if stage != "eval":
            section.setdefault("output_dir", out[stage])
            if resume and stage not in ("guidance",):  # the search resumes from its answer cache
                section["resume"] = True
    wired: dict[str, dict[str, Any]] = {stage: {} for stage in sections}

    def wire(stage: str, key: str, value: Any) -> None:
        if key not in sections[stage]:
            sections[stage][key] = wired[stage][key] = value

    reward_dir = sections.get("reward", {}).get("output_dir")
    sft_dir = sections.get("sft", {}).get("output_dir")
    if reward_dir:
        for stage in ("guidance", "rl"):
            if stage in sections:
                wire(stage, "reward_model", reward_dir)
    if "sft" in sections and not sections["sft"].get("pairs_data"):
        if reward_dir:
            wire("sft", "reward_model", reward_dir)
        if "guidance" in sections:  # the bootstrap scores the searched text first
            wire("sft", "templates_from", sections["guidance"]["output_dir"])
    if "rl" in sections and sft_dir:
        wire("rl", "sft_prompter", sft_dir)
    # Parse and check every section before training anything: a typo under rl: must not cost a reward + SFT run.
    for stage, section in sections.items():
        if stage == "eval":
            continue
        try:
            cfg = parse_stage_config("reward" if stage == "judge" else stage, [], section)
        except ValueError as exc:
            raise UsageError(f"{path}, section {stage}: {exc}") from exc
        needs_reward = stage in ("guidance", "rl") or (stage == "sft" and not cfg.pairs_data)
        if needs_reward and not cfg.reward_model:
            raise UsageError(
                f"{path}, section {stage}: no reward model; add a reward: section (its output is wired in) "
                f"or set `reward_model` under {stage}: to a folder written by `alignpro reward`"
            )
        plan.stages[stage] = (cfg, wired[stage])
    if "judge" in plan.stages:
        _check_judge_is_independent(path, plan.stages["reward"][0], plan.stages["judge"][0])
    if "eval" in sections:
        plan.stages["eval"] = (_eval_section(path, sections["eval"], plan, wired["eval"]), wired["eval"])
    return plan


def _check_judge_is_independent(path: str, reward: Any, judge: Any) -> None:
    """A judge trained on the training reward's prompts is not independent: it would share its mistakes."""
    if list(reward.preference_data) != list(judge.preference_data):
        return
    # Shards are disjoint only within one split: shard 0 of 2 and shard 1 of 3 share prompts.
    disjoint = (
        reward.prompt_shard is not None
        and judge.prompt_shard is not None
        and reward.num_prompt_shards == judge.num_prompt_shards
        and reward.prompt_shard != judge.prompt_shard
    )
    if not disjoint:
        raise UsageError(
            f"{path}, section judge: the judge would train on the reward model's prompts (same preference_data; "
            f"reward prompt_shard {reward.prompt_shard} of {reward.num_prompt_shards}, judge prompt_shard "
            f"{judge.prompt_shard} of {judge.num_prompt_shards}); set prompt_shard: 0 under reward: and "
            "prompt_shard: 1 under judge: with the same num_prompt_shards (disjoint prompt shards), or give the "
            "judge other preference_data"
        )


def _eval_section(path: str, section: dict[str, Any], plan: RecipePlan, wired: dict[str, Any]) -> Any:
    """The eval: section as `alignpro eval` arguments: its keys are eval's flags (`best_of_n: [2]`,
    `rerank: true`); the judges, prompter, target and output folder come from the other sections."""
    stages = plan.stages

    def wire(key: str, value: Any) -> None:
        if key.replace("-", "_") not in {k.replace("-", "_") for k in section}:
            section[key] = wired[key] = value

    if "reward" in stages:
        wire("judge", stages["reward"][0].output_dir)
    if "judge" in stages:
        wire("independent_judge", stages["judge"][0].output_dir)
    trained = next((s for s in ("rl", "sft") if s in stages), None)
    if trained:
        wire("prompter", stages[trained][0].output_dir)
    if trained == "rl" and "sft" in stages:
        wire("extra_prompter", [f"sft={stages['sft'][0].output_dir}"])
    if "rl" in stages:
        wire("training_log", str(Path(stages["rl"][0].output_dir) / "metrics.jsonl"))
    # The prompter is evaluated against the target it was trained against.
    source = next((stages[s][0] for s in ("rl", "sft", "guidance") if s in stages), None)
    if source is not None:
        if source.target_base_url:
            wire("target_base_url", source.target_base_url)
            wire("target", source.target_model_name)
            if source.target_api_key_env:
                wire("target_api_key_env", source.target_api_key_env)
            wire("target_concurrency", source.target_concurrency)
        else:
            wire("target", source.target)
            wire("target_dtype", source.target_dtype)
    wire("out", str(plan.root / "eval"))
    argv = ["eval"]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["eval"]
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    for key, value in section.items():
        dest = str(key).replace("-", "_")
        if dest not in flags or dest == "help":
            hints = _did_you_mean(dest, sorted(d for d in flags if d != "help"))
            raise UsageError(
                f"{path}, section eval: unknown key {key!r}{hints}; the keys are `alignpro eval`'s flags "
                "(see `alignpro eval --help`)"
            )
        flag = flags[dest].option_strings[-1]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            if flags[dest].nargs in ("+", "*"):
                argv += [flag, *map(str, value)]
            else:  # a repeatable flag (--extra-prompter)
                for item in value:
                    argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    try:
        args = _parse_quietly(argv)
        _check_eval_args(args)
    except ValueError as exc:  # UsageError, or a value a configuration refuses
        raise UsageError(f"{path}, section eval: {exc}") from exc
    return args


def _parse_quietly(argv: list[str]) -> argparse.Namespace:
    """``alignpro eval`` arguments parsed without argparse's exit: a bad value is a UsageError."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "invalid arguments"
        raise UsageError(message.split("error: ", 1)[-1]) from None


def cmd_eval(args: argparse.Namespace) -> int:
    from alignpro_plugins.evaluation import (
        BestOfK,
        Evaluator,
        FixedTemplate,
        FrozenAlone,
        Oracle,
        PairwiseLLMJudge,
        WithPrompter,
        WithRetryGate,
    )
    from alignpro_plugins.manifest import weights_hash
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.rewards import RewardFunction, load_reward
    from alignpro_plugins.targets import CachedTarget, OpenAICompatibleTarget, TransformersTarget

    extras, sampling = _check_eval_args(args)
    share = args.gated_retry_share
    prompts = _load_prompt_files(args.prompts, args.field, args.context_field)
    if args.limit:
        prompts = prompts[: args.limit]
    out = Path(args.out)
    if args.target_base_url:
        inner: Any = OpenAICompatibleTarget(
            args.target_base_url,
            args.target,
            max_tokens=args.max_new_tokens,
            concurrency=args.target_concurrency,
            api_key_env=args.target_api_key_env,
        )
    else:
        inner = TransformersTarget(
            args.target,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            dtype=args.target_dtype,
        )
    target = CachedTarget(inner, out / "target_cache.jsonl")
    judges: dict[str, RewardFunction] = {"reward": load_reward(args.judge)}
    if args.independent_judge:
        judges["independent"] = load_reward(args.independent_judge)
    configs: list[Any] = [FrozenAlone(), FixedTemplate(template=args.template)]
    trained = (
        Prompter.from_pretrained(
            args.prompter, base_model=args.prompter_base, allow_unverified_base=args.allow_unverified_base
        )
        if args.prompter
        else None
    )
    if trained is not None:
        zero = Prompter.from_base(
            args.prompter_base or trained.manifest.base_model, mode=trained.manifest.mode
        )
        zero.manifest.instructions = dict(trained.manifest.instructions)
        configs.append(WithPrompter(prompter=zero, name="zero-shot", description="untrained base prompter"))
        for name, path in extras:
            configs.append(
                WithPrompter(
                    prompter=Prompter.from_pretrained(
                        path, base_model=args.prompter_base, allow_unverified_base=args.allow_unverified_base
                    ),
                    name=name,
                    description=path,
                )
            )
        align_pro = WithPrompter(prompter=trained)
        configs.append(align_pro)
        if args.best_of_k:
            configs.append(BestOfK(prompter=trained, k=args.best_of_k))
        if share is not None:
            configs.append(_gated_retry(args, share, align_pro, prompts, target, judges["reward"]))
        if args.rerank:
            configs.append(WithRetryGate.rerank([align_pro]))
    configs += sampling
    if args.oracle:
        # The oracle answers in the frozen target's dtype: only the adapter differs.
        base = TransformersTarget(
            args.target,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            dtype=args.target_dtype,
        )
        from alignpro_plugins.lora import apply_lora  # the oracle's LoRA, applied without peft

        base.model = apply_lora(base.model, args.oracle)
        # The adapter's weights hash is part of the identity: a retrained oracle must not reuse cached answers.
        base._name = f"{args.target}+{args.oracle}@{weights_hash(args.oracle)[7:19]}"
        configs.append(Oracle(target=CachedTarget(base, out / "oracle_cache.jsonl")))
    pairwise = (
        PairwiseLLMJudge(TransformersTarget(args.llm_judge, max_new_tokens=4)) if args.llm_judge else None
    )
    report = Evaluator(prompts, target, judges, out_dir=out, pairwise_judge=pairwise).run(configs)
    print(report.to_markdown())
    if args.training_log:
        from alignpro_plugins.evaluation import plot_training_curve

        plot_training_curve(args.training_log, out / "rl_reward_curve.png")
    print(f"records, table and plots in {out}")
    return 0


def _check_eval_args(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[Any]]:
    """`alignpro eval`'s arguments checked before anything loads: (--extra-prompter NAME=DIR pairs, the
    best-of-n configurations)."""
    from alignpro_plugins.evaluation import BestOfN

    extras: list[tuple[str, str]] = []
    for extra in args.extra_prompter or []:
        name, sep, path = extra.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise UsageError(f"--extra-prompter {extra!r}: expected NAME=DIR, e.g. sft=runs/sft")
        extras.append((name.strip(), path.strip()))
    if extras and not args.prompter:
        raise UsageError("--extra-prompter is compared beside the trained prompter: give --prompter DIR too")
    share = args.gated_retry_share
    if share is not None:
        if not 0.0 < share <= 1.0:
            raise UsageError(f"--gated-retry-share {share}: give the share of answers to retry, in (0, 1]")
        if not args.prompter:
            raise UsageError(
                "--gated-retry-share retries with the trained prompter's rewrite: give --prompter DIR"
            )
        if not args.gate_prompts:
            raise UsageError(
                "--gated-retry-share needs --gate-prompts SRC ...: prompts (not the evaluation prompts) on which "
                "the training reward's scores of the frozen answers set the retry threshold"
            )
    elif args.gate_prompts:
        raise UsageError("--gate-prompts sets the threshold of --gated-retry-share: give that too")
    if args.rerank and not args.prompter:
        raise UsageError("--rerank answers x and the trained prompter's rewrite: give --prompter DIR")
    if args.best_of_k and not args.prompter:
        raise UsageError("--best-of-k samples rewrites from the trained prompter: give --prompter DIR")
    sampling = [
        BestOfN(n=n, temperature=args.best_of_n_temperature, seed=args.best_of_n_seed)
        for n in dict.fromkeys(args.best_of_n or [])
    ]  # checked (n >= 1, temperature > 0) before anything loads
    return extras, sampling


def _gated_retry(
    args: argparse.Namespace, share: float, retry: Any, prompts: list[str], target: Any, reward: Any
):
    """WithRetryGate whose threshold spends `share` on the frozen answers to --gate-prompts (training reward)."""
    from alignpro_plugins.evaluation import WithRetryGate
    from alignpro_plugins.gate import RetryGate

    gate_prompts = _load_prompt_files(args.gate_prompts, args.field, args.context_field)
    shared = set(gate_prompts) & set(prompts)
    if shared:
        raise UsageError(
            f"--gate-prompts shares {len(shared)} prompts with --prompts (e.g. {next(iter(shared))[:60]!r}): the "
            "threshold must be set on prompts the evaluation does not use"
        )
    threshold = RetryGate.for_budget(reward, gate_prompts, target.generate(gate_prompts), share).threshold
    print(
        f"gated-retry: threshold {threshold:+.4f} (the training reward's {share:.0%} quantile on "
        f"{len(gate_prompts)} gate prompts)"
    )
    return WithRetryGate(
        retry=[retry],
        threshold=threshold,
        description=f"x; the prompter's rewrite too where the training reward scores the answer below {threshold:+.3f}",
    )


def build_parser() -> argparse.ArgumentParser:
    from alignpro_plugins.manifest import DTYPES

    parser = argparse.ArgumentParser(
        prog="alignpro", description="Align a frozen LLM by learning to rewrite its prompts."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="INFO logging, and a traceback with every error (before COMMAND)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("models", help=DESCRIPTIONS["models"], formatter_class=HelpWithDefaults)
    p = sub.add_parser(
        "rewrite",
        help=DESCRIPTIONS["rewrite"],
        description=DESCRIPTIONS["rewrite"],
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("text", nargs="*", help="prompts to rewrite, one per argument (or give --input)")
    p.add_argument(
        "--prompter",
        help="prompter artifact folder or packaged prompter name (alignpro models); unset: the untrained base "
        "prompter, --base",
    )
    p.add_argument(
        "--base",
        default="smollm2-135m-instruct",
        help="base model of the untrained (zero-shot) prompter used without --prompter: a packaged name or a folder",
    )
    _add_prompter_base(p)
    p.add_argument(
        "--mode",
        choices=["augment", "rewrite"],
        default=None,
        help="augment: keep the prompt as it is and append guidance; rewrite: the prompter's text replaces it "
        "(unset: the mode the prompter was trained in, augment for the base prompter)",
    )
    p.add_argument("--input", help="jsonl file of prompts, one object per line (instead of text arguments)")
    p.add_argument(
        "--output",
        help="jsonl output: each input row with rewritten, generated, fallback_reason (unset: stdout)",
    )
    _add_field(p, "--input's rows")
    p.add_argument("--json", action="store_true", help="print result objects as JSON")
    for stage in STAGES:
        sub.add_parser(stage, help=DESCRIPTIONS[stage], add_help=False)
    p = sub.add_parser(
        "train",
        help=DESCRIPTIONS["train"],
        description=DESCRIPTIONS["train"] + ".\n\n" + TRAIN_SECTIONS,
        formatter_class=HelpWithDefaults,
    )
    p.add_argument(
        "--config",
        required=True,
        help="recipe YAML: output_dir: and any of the sections reward:, judge:, guidance:, sft:, rl:, eval:",
    )
    p.add_argument("--resume", action="store_true", help="resume each stage from its latest checkpoint")
    p.add_argument("--skip-done", action="store_true", help="skip stages whose artifact already exists")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="parse and check every section, print each stage's output folder and what is wired into it, "
        "train nothing",
    )
    p = sub.add_parser(
        "eval",
        help=DESCRIPTIONS["eval"],
        description=EVAL_DESCRIPTION,
        epilog=EVAL_CONFIGURATIONS,
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("--prompts", nargs="+", required=True, help="files or hub ids of evaluation prompts")
    _add_field(p, "the prompt files' rows")
    p.add_argument(
        "--context-field",
        default="context",
        help="column appended to the prompt after a blank line where a row has it (Dolly's and BPO's context)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N prompts (unset: all)")
    p.add_argument(
        "--target",
        default="smollm2-135m-instruct",
        help="frozen target (name/path, or model name with --target-base-url)",
    )
    p.add_argument(
        "--target-base-url", help="OpenAI-compatible endpoint serving --target (unset: load it locally)"
    )
    p.add_argument(
        "--target-dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="a local target's dtype (auto: bf16 on a GPU that supports it, else fp32); bfloat16 is faster on CPUs "
        "with native bf16 but gives other answers",
    )
    p.add_argument("--target-concurrency", type=int, default=8, help="concurrent requests to the endpoint")
    p.add_argument(
        "--target-api-key-env",
        default=None,
        help="environment variable holding the API key (unset: $OPENAI_API_KEY, sent only to api.openai.com)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="cap on the tokens of each target answer")
    p.add_argument("--batch-size", type=int, default=16, help="prompts a local target answers per batch")
    _add_prompter_base(p)
    p.add_argument(
        "--judge",
        required=True,
        help="training reward model artifact: a judge, and the selection judge of best-of-k, best-of-n, rerank "
        "and the gate",
    )
    p.add_argument(
        "--independent-judge", help="a reward model trained on disjoint prompts: a judge that never selects"
    )
    p.add_argument("--llm-judge", help="pairwise LLM judge model, asked in both orders (unset: none)")
    p.add_argument("--prompter", help="trained prompter artifact: adds zero-shot and align-pro")
    p.add_argument(
        "--extra-prompter", action="append", help="NAME=DIR: another prompter to compare (e.g. sft=runs/sft)"
    )
    p.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help="the template configuration's fixed instruction"
    )
    p.add_argument(
        "--best-of-k",
        type=int,
        default=0,
        metavar="K",
        help="adds best-of-k: K rewrites sampled from --prompter, the selection judge keeps the best (0: off)",
    )
    p.add_argument(
        "--best-of-n",
        type=int,
        nargs="+",
        metavar="N",
        help="adds best-of-N for each N: N answers of the frozen model sampled on x, the selection judge keeps "
        "the best (unset: off)",
    )
    p.add_argument(
        "--best-of-n-temperature",
        type=float,
        default=0.7,
        help="the sampling temperature of best-of-n's answers (> 0)",
    )
    p.add_argument(
        "--best-of-n-seed",
        type=int,
        default=0,
        help="seeds best-of-n's draws, so a rerun draws the same answers",
    )
    p.add_argument(
        "--gated-retry-share",
        type=float,
        help="adds gated-retry: the prompter's rewrite is also answered where the training reward scores the "
        "frozen answer below the quantile SHARE of its scores on --gate-prompts (unset: off)",
    )
    p.add_argument(
        "--gate-prompts", nargs="+", help="prompts (never the evaluation's) that set that threshold"
    )
    p.add_argument(
        "--rerank",
        action="store_true",
        help="adds rerank: x and the prompter's rewrite are both answered and the training reward keeps the "
        "better answer (2 target calls per prompt; RetryGate.rerank at run time)",
    )
    p.add_argument("--oracle", help="LoRA adapter of the RLHF-tuned target: adds rlhf-oracle")
    p.add_argument("--training-log", help="metrics.jsonl of the RL run, for the reward-curve plot")
    p.add_argument(
        "--out",
        required=True,
        help="folder for records.jsonl, results.md/json, plots and the target's answer cache (a rerun resumes)",
    )
    for name, (add_arguments, _) in DEPLOY_COMMANDS.items():
        _load(add_arguments)(sub.add_parser(name, help=DESCRIPTIONS[name], formatter_class=HelpWithDefaults))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    verbose = any(a in ("-v", "--verbose") for a in argv[: len(argv) if first is None else first])
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from alignpro_plugins.extras import MissingExtraError
    from alignpro_plugins.models import ModelNotAvailableError
    from alignpro_plugins.targets import TargetError

    command = argv[first] if first is not None else None
    try:
        # Training stages take their (many) flags from their config dataclass: hand them the rest of the line.
        if first is not None and argv[first] in STAGES:
            result = run_stage(argv[first], argv[first + 1 :])
            if argv[first] == "guidance":
                print(json.dumps({"best": result.best, "chosen_on": result.chosen_on}, ensure_ascii=False))
            return 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command in DEPLOY_COMMANDS:
            return _load(DEPLOY_COMMANDS[args.command][1])(args)
        run = {"models": cmd_models, "rewrite": cmd_rewrite, "train": cmd_train, "eval": cmd_eval}[
            args.command
        ]
        return run(args)
    # Bad input (config values, data rows, paths, models), a missing extra, or a target that gave no answer after
    # its retries: one line naming the problem, as argparse does; -v adds the traceback. Other exception types are bugs and
    # keep theirs.
    except (ValueError, OSError, ModelNotAvailableError, TargetError, MissingExtraError) as exc:
        if verbose:
            traceback.print_exc()
        prog = f"alignpro {command}" if command else "alignpro"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Leave a multi-process run's process group before exit: left to interpreter shutdown, the backend's
    threads can abort the process ("terminate called without an active exception") after the work is saved."""
    global _left_process_group
    distributed = sys.modules.get("torch.distributed")  # only a run that imported torch can have one
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
        _left_process_group = True


_left_process_group = False


def _exit(code: int) -> None:
    """Exit with ``code``. After a multi-process run (everything saved, the group left), skip the C++ static
    destructors: a backend thread still alive there aborts a finished run now and then (signal 6)."""
    if _left_process_group:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    _exit(main())
