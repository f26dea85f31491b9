"""Argument groups the stage configs share, and the checks their ``__post_init__`` runs.

Each group is a dataclass mixin listed BEFORE the TRL config it joins (``class X(RLArguments, GRPOConfig)``), so
its CPU-friendly defaults win over TRL's. ``TrainingArguments.__post_init__`` does not call ``super()``: a config
calls its groups' checks and its TRL base's ``__post_init__`` by name.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from alignpro_plugins.manifest import MODES, check_dtype

logger = logging.getLogger(__name__)

# Where launchers put the number of processes they started: torchrun / `accelerate launch` (WORLD_SIZE), mpirun.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started for this run (1 without a launcher)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def apply_hardware_defaults(cfg: Any) -> None:
    """bf16 only on a GPU that supports it (most CPUs emulate it, ~5x slower); TensorBoard reporting when installed;
    a multi-process launch without a GPU trains as one job on the CPU."""
    has_cuda = torch.cuda.is_available()
    if getattr(cfg, "bf16", None) is None:
        cfg.bf16 = bool(has_cuda and torch.cuda.is_bf16_supported())
    if not has_cuda:
        cfg.bf16 = False
        cfg.fp16 = False
        cfg.dataloader_pin_memory = False  # nothing to pin to; torch warns on every DataLoader otherwise
        device_api = getattr(torch, "accelerator", None)  # torch >= 2.6: also XPU and other devices
        if device_api is None or not device_api.is_available():
            join_cpu_process_group(cfg)
    if getattr(cfg, "report_to", None) in (None, "all", ["all"]):
        cfg.report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    adopt_activation_checkpointing(cfg)


def join_cpu_process_group(cfg: Any) -> None:
    """Under a multi-process launch on a machine without a GPU, train as one data-parallel job over gloo.

    Without ``use_cpu``, transformers ignores the launcher's process group on a CPU-only machine: every process
    trains alone on all the data and every one of them writes ``output_dir``. ``accelerate launch --cpu
    --num_processes N`` without mpirun starts only one process (it sets MASTER_ADDR for the others, which never
    come): say so, since the run is then N times smaller per step than asked for.
    """
    if launched_processes() > 1:
        cfg.use_cpu = True
        cfg.ddp_backend = cfg.ddp_backend or "gloo"  # torch's CPU backend
    elif os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR"):
        logger.warning(
            "this run is a single process: `accelerate launch --cpu --num_processes N` starts N CPU processes "
            "only through mpirun (--mpirun_hostfile). On one machine without a GPU, launch them with "
            "`accelerate launch --multi_gpu --num_processes N ...` (they train on the CPU over gloo)"
        )


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


RL_ALGORITHMS = ("grpo", "kl-optimum")


def check_algorithm(algorithm: str, expected: str, config: str, command: str = "rl") -> None:
    """``algorithm`` names the config's own algorithm; the other one has a config class of its own."""
    if algorithm == expected:
        return
    if algorithm not in RL_ALGORITHMS:
        raise ValueError(f"algorithm must be 'grpo' or 'kl-optimum', got {algorithm!r}")
    raise ValueError(
        f"{config} is algorithm={expected!r}; algorithm={algorithm!r} has a config class of its own, which the "
        f"`algorithm: {algorithm}` key (YAML) or flag picks (`alignpro {command} --algorithm {algorithm} --help`)"
    )


@dataclass
class TargetArguments:
    """How to reach the frozen target LLM (used by the SFT bootstrap, the guidance search and the RL stage)."""

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
        self.check_target_arguments()

    def check_target_arguments(self) -> None:
        check_dtype(self.target_dtype, "target_dtype")
        if self.target_base_url and not self.target_model_name:
            raise ValueError(
                f"target_base_url is set ({self.target_base_url}) but target_model_name is not: set "
                "`target_model_name` to the model name the endpoint serves (listed by <target_base_url>/models)"
            )


@dataclass
class StageArguments:
    """What every training stage can do: resume. (Each stage on a TRL config also turns TRL's activation
    checkpointing off: it makes small models slower on CPU; TRL and transformers type that field differently.)"""

    resume: bool = field(
        default=False, metadata={"help": "Resume from the latest complete checkpoint in output_dir."}
    )


@dataclass
class GRPOArguments:
    """A run on TRL's GRPO (the prompter's RL stage, or the oracle): the algorithm's name, frequent logs and saves."""

    algorithm: str = field(
        default="grpo",
        metadata={
            "help": "'grpo' (this config: TRL's GRPO, KL penalty beta) or 'kl-optimum' (sample, resample by "
            "exp(r/λ), distil: a config of its own, whose options `--algorithm kl-optimum --help` lists)."
        },
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=10, metadata={"help": "Checkpoint every N steps."})


@dataclass
class RLArguments(StageArguments):
    """Every RL run, whatever the algorithm and whichever model it tunes (the prompter, or the RLHF oracle)."""

    prompts_data: str | None = field(default=None, metadata={"help": "Training prompts x: file or hub id."})
    prompt_field: str = field(default="prompt", metadata={"help": "Prompt column of prompts_data."})
    context_field: str | None = field(
        default=None, metadata={"help": "Optional context column appended to x."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Cap on training prompts."})
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward artifact (from `alignpro reward`)."}
    )
    # λ > 0 by default: without it nothing keeps the tuned model close to where it started.
    beta: float = field(
        default=0.05,
        metadata={
            "help": "λ, the KL coefficient to the SFT prompter (the oracle's: to the untuned target); > 0. For "
            "kl-optimum, the λ of the resampling."
        },
    )
    lora_r: int = field(
        default=16,
        metadata={"help": "LoRA rank (for the prompter: only when starting without an SFT adapter)."},
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    learning_rate: float = field(default=3e-5, metadata={"help": "Learning rate."})
    num_generations: int | None = field(
        default=4, metadata={"help": "Samples per prompt (GRPO's group; kl-optimum's K)."}
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per device per step."})
    max_completion_length: int | None = field(default=48, metadata={"help": "Sample length cap during RL."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})


@dataclass
class PrompterRLArguments(RLArguments, TargetArguments):
    """The prompter's RL stage, whichever algorithm: where the policy starts, its mode, and the frozen target."""

    sft_prompter: str | None = field(
        default=None,
        metadata={"help": "SFT prompter artifact (from `alignpro sft`); the policy init and KL anchor."},
    )
    base_model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "Prompter base when no sft_prompter is given."}
    )
    mode: str | None = field(
        default=None, metadata={"help": "Override the artifact's mode (augment / rewrite)."}
    )

    def check_prompter_rl_arguments(self) -> None:
        self.check_target_arguments()
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(
                f"mode must be one of {', '.join(repr(m) for m in MODES)}, or unset to keep the SFT prompter's "
                f"mode; got {self.mode!r}"
            )
        if self.beta <= 0:
            raise ValueError(
                "beta (λ) must be > 0: it is the KL penalty that keeps the prompter near the SFT prompter"
            )
