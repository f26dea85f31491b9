"""Pieces shared by the three stages: CPU-friendly defaults, target/reward construction, metrics logging."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


def has_cuda() -> bool:
    return torch.cuda.is_available()


def apply_hardware_defaults(cfg: Any) -> None:
    """bf16 only on a GPU that supports it (most CPUs emulate it, ~5x slower); TensorBoard reporting when installed."""
    if getattr(cfg, "bf16", None) is None:
        cfg.bf16 = bool(has_cuda() and torch.cuda.is_bf16_supported())
    if not has_cuda():
        cfg.bf16 = False
        cfg.fp16 = False
        cfg.dataloader_pin_memory = False  # nothing to pin to; torch warns on every DataLoader otherwise
    if getattr(cfg, "report_to", None) in (None, "all", ["all"]):
        cfg.report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    adopt_activation_checkpointing(cfg)


def adopt_activation_checkpointing(cfg: Any) -> None:
    """Carry `gradient_checkpointing` over to transformers 5's `activation_checkpointing` (call before __post_init__).

    transformers 5 keeps the old name as an alias but warns on every config that sets it, and TRL's configs set it
    by default; moving the value to the new name keeps both spellings working without the warning. On
    transformers 4 there is no new name and this does nothing.
    """
    if hasattr(cfg, "activation_checkpointing") and cfg.activation_checkpointing is None:
        cfg.activation_checkpointing = bool(cfg.gradient_checkpointing)
    kwargs = getattr(cfg, "gradient_checkpointing_kwargs", None)
    if (
        hasattr(cfg, "activation_checkpointing_kwargs")
        and cfg.activation_checkpointing_kwargs is None
        and kwargs
    ):
        cfg.activation_checkpointing_kwargs, cfg.gradient_checkpointing_kwargs = kwargs, None


def checkpointing_kwargs(config_cls: type, enabled: bool) -> dict[str, Any]:
    """The keyword that sets activation checkpointing on `config_cls` (transformers 5's name where it exists)."""
    names = {f.name for f in fields(config_cls)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled}


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


def check_kl_rounds(cfg: Any) -> None:
    if cfg.kl_rounds < 1:
        raise ValueError(f"kl_rounds must be >= 1, got {cfg.kl_rounds}")
    n = cfg.kl_prompts_per_round
    if n is not None and n < 1:
        raise ValueError(f"kl_prompts_per_round must be >= 1 or None (all prompts every round), got {n}")
    if cfg.algorithm == "kl-optimum" and (cfg.num_generations or 0) < 1:
        raise ValueError(f"num_generations (samples per prompt) must be >= 1, got {cfg.num_generations}")


def check_algorithm(cfg: Any) -> None:
    """`algorithm` is one of the two; the kl_* options are set only where they act (GRPO would ignore them)."""
    if cfg.algorithm not in ("grpo", "kl-optimum"):
        raise ValueError(f"algorithm must be 'grpo' or 'kl-optimum', got {cfg.algorithm!r}")
    if cfg.algorithm == "kl-optimum":
        return
    changed = []
    for f in fields(cfg):
        if f.name.startswith("kl_"):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if getattr(cfg, f.name) != default:
                changed.append(f"{f.name}={getattr(cfg, f.name)!r}")
    if changed:
        raise ValueError(
            f"{', '.join(changed)}: the kl_* options apply to algorithm='kl-optimum' only, and "
            f"algorithm={cfg.algorithm!r} would ignore them; set algorithm='kl-optimum' or drop them"
        )


def as_str_list(value: Any, name: str) -> list[str]:
    """A list option given one string (a YAML scalar, or str in Python) means one item, not its characters."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    raise ValueError(
        f"{name} must be a list of strings (a YAML list, or one string for a single item), got {value!r}"
    )


def check_reward_source(stage: str, reward: Any, reward_model: str | None) -> None:
    """Fail before any model loads when the stage has nothing to score with."""
    if reward is None and not reward_model:
        raise ValueError(
            f"{stage} needs a reward: set `reward_model` (the folder written by `alignpro reward`) or pass "
            "reward= to the trainer"
        )


@contextmanager
def grpo_checks_relaxed(cfg: Any) -> Iterator[None]:
    """Run GRPOConfig's validation without its GRPO-only rule (generation batch divisible by num_generations).

    kl-optimum samples K per prompt in its own batches, so any K is valid there (K=3 with batch 8 included);
    GRPO keeps every check.
    """
    if cfg.algorithm != "kl-optimum":
        yield
        return
    k, batch = cfg.num_generations, cfg.per_device_train_batch_size
    # Any group size of at least 2 that divides the generation batch satisfies GRPO; batch 1 has none, so
    # validate with batch 2 (kl-optimum uses the batch only for distillation, restored below).
    cfg.per_device_train_batch_size = max(batch, 2)
    cfg.num_generations = 2 if cfg.per_device_train_batch_size % 2 == 0 else cfg.per_device_train_batch_size
    try:
        yield
    finally:
        cfg.num_generations, cfg.per_device_train_batch_size = k, batch


def round_prompts(prompts: Sequence[str], per_round: int | None, r: int) -> list[str]:
    """The prompts of kl-optimum round r (0-based): all of them, or the r-th fresh slice of ``per_round``."""
    if per_round is None:
        return list(prompts)
    return list(prompts[r * per_round : (r + 1) * per_round])


def check_round_prompts(prompts: Sequence[str], per_round: int | None, rounds: int, stage: str) -> None:
    if per_round is not None and len(prompts) < per_round * rounds:
        raise ValueError(
            f"{stage}: kl_prompts_per_round={per_round} x kl_rounds={rounds} needs {per_round * rounds} "
            f"distinct training prompts, got {len(prompts)}; give more prompts, lower kl_rounds, or set "
            "kl_prompts_per_round=None to reuse all prompts every round"
        )


@dataclass
class TargetArguments:
    """How to reach the frozen target LLM (used by the SFT bootstrap and the RL stage)."""

    target: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "Frozen target: a packaged model name, local folder or hub id (ignored with target_base_url)."
        },
    )
    target_base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible endpoint for the target, e.g. http://127.0.0.1:8000/v1"},
    )
    target_model_name: str | None = field(
        default=None, metadata={"help": "Model name to send to target_base_url."}
    )
    target_api_key_env: str | None = field(
        default=None,
        metadata={
            "help": "Environment variable holding the endpoint's API key. Unset: $OPENAI_API_KEY, sent only to "
            "api.openai.com, so an OpenAI key never reaches another host."
        },
    )
    target_max_new_tokens: int = field(default=96, metadata={"help": "Answer length cap during training."})
    target_batch_size: int = field(
        default=16, metadata={"help": "Batch size for a local target's generation."}
    )
    target_dtype: str = field(
        default="auto",
        metadata={
            "help": "A local target's dtype: auto (bf16 on a GPU that supports it, else fp32), float32, bfloat16 "
            "or float16. bfloat16 answers faster on CPUs with native bf16 (AMX) but gives other answers."
        },
    )
    target_concurrency: int = field(default=8, metadata={"help": "Concurrent requests to a remote target."})
    target_cache: str | None = field(
        default=None, metadata={"help": "jsonl answer cache; default <output_dir>/target_cache.jsonl"}
    )

    def __post_init__(self) -> None:
        # TrainingArguments.__post_init__ does not call super(): the stage configs call this explicitly.
        from alignpro_plugins.manifest import check_dtype

        check_dtype(self.target_dtype, "target_dtype")
        if self.target_base_url and not self.target_model_name:
            raise ValueError(
                f"target_base_url is set ({self.target_base_url}) but target_model_name is not: set "
                "`target_model_name` to the model name the endpoint serves (listed by <target_base_url>/models)"
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
    """Append every logged metrics dict to <output_dir>/metrics.jsonl (plots and resumable eval read it)."""

    def __init__(self, path: str | os.PathLike[str], stage: str) -> None:
        self.path = Path(path)
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401
        if logs and state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {"stage": self.stage, "step": state.global_step, "time": time.time(), **logs}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")


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


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def training_prompts(cfg: Any, prompts: Any, stage: str) -> list[str]:
    """Prompts passed in, or read from ``cfg.prompts_data``; de-duplicated (order kept) and capped."""
    from alignpro_plugins.data import load_prompts

    if prompts is None:
        if not cfg.prompts_data:
            raise ValueError(f"{stage} needs training prompts: set prompts_data or pass prompts=...")
        prompts = load_prompts(cfg.prompts_data, field=cfg.prompt_field, context_field=cfg.context_field)
    unique = list(dict.fromkeys(prompts))
    return unique[: cfg.max_prompts] if cfg.max_prompts else unique
