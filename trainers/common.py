"""Pieces the stages share at run time: seeding, the target and reward, metrics logging, checkpoints to resume."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def seed_stage(cfg: Any, round_index: int | None = None) -> None:
    """Seed python, numpy and torch from ``cfg.seed`` as TRL's Trainer does, but before a stage's own random work.

    A reward head or LoRA initialised, or rewrites sampled, before the Trainer exists would otherwise differ from
    run to run with the same config. ``round_index`` reseeds each RL round, so a resumed run samples what an
    uninterrupted one would have.
    """
    from transformers import enable_full_determinism, set_seed

    seed = cfg.seed if round_index is None else round_seed(cfg.seed, round_index)
    if getattr(cfg, "full_determinism", False):
        enable_full_determinism(seed)
    else:
        set_seed(seed)


def round_seed(seed: int, round_index: int) -> int:
    """A round's own seed: the same for a round however the run got there (uninterrupted or resumed)."""
    return (seed * 1_000_003 + round_index) % 2**32


def check_reward_source(stage: str, reward: Any, reward_model: str | None) -> None:
    """Fail before any model loads when the stage has nothing to score with."""
    if reward is None and not reward_model:
        raise ValueError(
            f"{stage} needs a reward: set `reward_model` (the folder written by `alignpro reward`) or pass "
            "reward= to the trainer"
        )


def target_cache_path(output_dir: str) -> str:
    """One answer cache per process: under `accelerate launch`, processes must not append to one file."""
    rank = os.environ.get("RANK")
    name = "target_cache.jsonl" if rank in (None, "0") else f"target_cache.rank{rank}.jsonl"
    return os.path.join(output_dir, name)


def build_target(cfg: Any, output_dir: str):
    from alignpro_plugins.targets import (
        CachedTarget,
        FrozenTarget,
        OpenAICompatibleTarget,
        TransformersTarget,
    )

    inner: FrozenTarget
    if cfg.target_base_url:
        inner = OpenAICompatibleTarget(
            cfg.target_base_url,
            cfg.target_model_name,  # set: TargetArguments.__post_init__ checks it
            api_key_env=cfg.target_api_key_env,
            max_tokens=cfg.target_max_new_tokens,
            concurrency=cfg.target_concurrency,
        )
    else:
        inner = TransformersTarget(
            cfg.target,
            max_new_tokens=cfg.target_max_new_tokens,
            batch_size=cfg.target_batch_size,
            dtype=cfg.target_dtype,
        )
    return CachedTarget(inner, cfg.target_cache or target_cache_path(output_dir))


def wrap_target(target: Any, cache_path: str | None):
    """Any target object (LangChain, DSPy, callable, ...) behind the answer cache."""
    from alignpro_plugins.targets import CachedTarget, as_target

    t = as_target(target)
    return t if isinstance(t, CachedTarget) else CachedTarget(t, cache_path)


class JsonlMetricsCallback(TrainerCallback):
    """Append every logged metrics dict to <output_dir>/metrics.jsonl (plots and resumable eval read it).

    With ``resume``, the rows of steps after the one training resumes from are dropped when it starts: the run
    logs them again, and each step keeps one row.
    """

    def __init__(self, path: str | os.PathLike[str], stage: str, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.stage = stage
        self.resume = resume

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume and state.is_world_process_zero:
            drop_rows_after(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {"stage": self.stage, "step": state.global_step, "time": time.time(), **logs}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")


def metrics_callback(cfg: Any, stage: str) -> JsonlMetricsCallback:
    """The stage's metrics log, ``<output_dir>/metrics.jsonl``, resumed along with the stage."""
    return JsonlMetricsCallback(Path(str(cfg.output_dir)) / "metrics.jsonl", stage, resume=cfg.resume)


def drop_rows_after(path: Path, step: int) -> None:
    """Remove the rows of ``path`` (a metrics.jsonl) logged after ``step``: what a resumed run will log again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (logged := _row_step(line)) is not None and logged <= step]
    if len(kept) < len(lines):
        logger.info("resuming at step %d: dropped %d later rows of %s", step, len(lines) - len(kept), path)
        path.write_text("".join(f"{line}\n" for line in kept))


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_config(
    r: int, alpha: int, dropout: float, target_modules: list[str] | str, task_type: str = "CAUSAL_LM"
):
    from peft import LoraConfig

    # `--lora_target_modules all-linear` arrives as ["all-linear"]; peft expands the keyword only as a plain string.
    if isinstance(target_modules, list) and len(target_modules) == 1 and target_modules[0] == "all-linear":
        target_modules = "all-linear"
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type
    )


def _row_step(line: str) -> int | None:
    """A metrics row's step; None for a line cut short by a kill (it is dropped with the rows after it)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


def resume_checkpoint(cfg: Any) -> str | None:
    """The checkpoint a stage resumes from: none unless ``cfg.resume``; else the last complete ``checkpoint-N``.

    A process killed while the Trainer saves leaves a ``checkpoint-N`` without ``trainer_state.json`` (written
    last): resuming from it would fail, so it is skipped, and the log says so.
    """
    if not cfg.resume:
        return None
    found = []
    for folder in Path(str(cfg.output_dir)).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if m and folder.is_dir():
            found.append((int(m.group(1)), folder))
    for _, folder in sorted(found, reverse=True):
        if _complete(folder):
            return str(folder)
        logger.warning(
            "resume: skipping %s, an incomplete checkpoint (no readable trainer_state.json)", folder
        )
    return None


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def training_prompts(cfg: Any, prompts: Any, stage: str) -> list[str]:
    """Prompts passed in, or read from ``cfg.prompts_data``; de-duplicated (order kept) and capped."""
    from alignpro_plugins.data import load_prompts

    if prompts is None:
        if not cfg.prompts_data:
            raise ValueError(f"{stage} needs training prompts: set prompts_data or pass prompts=...")
        prompts = load_prompts(cfg.prompts_data, field=cfg.prompt_field, context_field=cfg.context_field)
    unique = list(dict.fromkeys(prompts))
    return unique[: cfg.max_prompts] if cfg.max_prompts else unique
