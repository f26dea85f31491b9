from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import GRPOConfig

from trainers.arguments import GRPOArguments, RLArguments, apply_hardware_defaults, check_algorithm
from trainers.kl_optimum_config import KLOptimumArguments


@dataclass
class OracleArguments(RLArguments):
    """The RLHF oracle, whichever algorithm: the target itself, tuned as LoRA on the prompter's reward."""

    target: str = field(
        default="smollm2-135m-instruct", metadata={"help": "Model to fine-tune (the frozen target)."}
    )
    max_completion_length: int | None = field(default=96, metadata={"help": "Answer length cap during RL."})

    def check_beta(self) -> None:
        if self.beta <= 0:
            raise ValueError(
                f"beta must be > 0, got {self.beta}: it is the KL penalty that keeps the tuned target near the "
                "untuned one (for kl-optimum, the λ of the resampling). Set it to the prompter's RL beta for a "
                "like-for-like oracle (default 0.05)"
            )


@dataclass
class RLHFOracleConfig(OracleArguments, GRPOArguments, GRPOConfig):
    """The paper's RLHF configuration (iii): the TARGET itself fine-tuned by RL (LoRA) on the same reward model,
    prompts and step budget as the prompter — an upper reference that Align-Pro cannot use in production.

    This config trains it with TRL's GRPO; :class:`KLOptimumOracleConfig` with kl-optimum, for a like-for-like
    comparison with a prompter trained that way.
    """

    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: slower on CPU for small models."}
    )

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        check_algorithm(self.algorithm, "grpo", "RLHFOracleConfig", "oracle")
        self.check_beta()
        GRPOConfig.__post_init__(self)


@dataclass
class KLOptimumOracleConfig(KLOptimumArguments, OracleArguments, TrainingArguments):
    """The RLHF oracle by kl-optimum: sample ``num_generations`` answers per prompt from the target, resample them
    by softmax(z/beta), distil the draws into its LoRA; ``rounds`` rounds. Use it when the prompter was trained
    with kl-optimum, so both sides of the comparison get the same algorithm and budget."""

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        self.check_kl_optimum_arguments("KLOptimumOracleConfig", "oracle")
        self.check_beta()
        TrainingArguments.__post_init__(self)
