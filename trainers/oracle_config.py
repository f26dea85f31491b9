from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from trainers.common import apply_hardware_defaults, check_algorithm, check_kl_rounds, grpo_checks_relaxed


@dataclass
class RLHFOracleConfig(GRPOConfig):
    """The paper's RLHF configuration (iii): the TARGET itself fine-tuned by RL (LoRA) on the same reward model,
    prompts and step budget as the prompter — an upper reference that Align-Pro cannot use in production."""

    target: str = field(
        default="smollm2-135m-instruct", metadata={"help": "Model to fine-tune (the frozen target)."}
    )
    algorithm: str = field(
        default="grpo",
        metadata={
            "help": "'grpo' (TRL GRPO on the target) or 'kl-optimum' (sample num_generations answers per "
            "prompt from the target, resample by softmax(z/beta), distil into its LoRA): use the same "
            "algorithm as the prompter's RL stage for a like-for-like oracle."
        },
    )
    kl_rounds: int = field(default=1, metadata={"help": "kl-optimum: sample-resample-distil rounds."})
    kl_prompts_per_round: int | None = field(
        default=None,
        metadata={
            "help": "kl-optimum: fresh prompts for every round (round r trains on prompts [r·n, (r+1)·n)); "
            "None: every round uses all prompts. Match the prompter's RL stage for a like-for-like oracle."
        },
    )
    kl_include_greedy: bool = field(
        default=True,
        metadata={
            "help": "kl-optimum: score the target's greedy answer beside its samples, so a round moves only "
            "where a sample beats the answer the target gives when evaluated."
        },
    )
    prompts_data: str | None = field(default=None, metadata={"help": "Training prompts: file or hub id."})
    prompt_field: str = field(default="prompt", metadata={"help": "Prompt column."})
    context_field: str | None = field(default=None, metadata={"help": "Optional context column."})
    max_prompts: int | None = field(default=None, metadata={"help": "Cap on training prompts."})
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward artifact (from `alignpro reward`)."}
    )
    beta: float = field(default=0.05, metadata={"help": "KL coefficient to the untuned target (> 0)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    learning_rate: float = field(default=3e-5, metadata={"help": "Learning rate."})
    num_generations: int | None = field(default=4, metadata={"help": "Answers per prompt (the GRPO group)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per device per step."})
    max_completion_length: int | None = field(default=96, metadata={"help": "Answer length cap during RL."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: slower on CPU for small models."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=10, metadata={"help": "Checkpoint every N steps."})
    resume: bool = field(default=False, metadata={"help": "Resume from the latest checkpoint in output_dir."})

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        check_algorithm(self)
        if self.beta <= 0:
            raise ValueError(
                f"beta must be > 0, got {self.beta}: it is the KL penalty that keeps the tuned target near the "
                "untuned one (for kl-optimum, the λ of the resampling). Set it to the prompter's RL beta for a "
                "like-for-like oracle (default 0.05)"
            )
        check_kl_rounds(self)
        with grpo_checks_relaxed(self):
            super().__post_init__()
