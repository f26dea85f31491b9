from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from alignpro_plugins.manifest import MODES
from trainers.common import (
    TargetArguments,
    apply_hardware_defaults,
    as_str_list,
    check_algorithm,
    check_kl_rounds,
    grpo_checks_relaxed,
)


@dataclass
class AlignProRLConfig(GRPOConfig, TargetArguments):
    """RL stage: max_ρ E[r(x, y)] − λ·KL(ρ(·|x) ‖ ρ_sft(·|x)), x' ~ ρ(·|x), y ~ π_F(·|x'), on TRL's GRPO.

    ``beta`` is λ. The policy starts from the SFT prompter and the KL reference IS the SFT prompter (its adapter
    is copied into a frozen ``ref`` adapter). Every field is also a CLI flag and a YAML key (``rl:``).
    """

    sft_prompter: str | None = field(
        default=None,
        metadata={"help": "SFT prompter artifact (from `alignpro sft`); the policy init and KL anchor."},
    )
    base_model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "Prompter base when no sft_prompter is given."}
    )
    algorithm: str = field(
        default="grpo",
        metadata={
            "help": "'grpo' (TRL GRPO, KL penalty beta) or 'kl-optimum': sample num_generations rewrites per "
            "prompt from the SFT prompter, resample them with weights softmax(z/beta) (z = rewards "
            "standardised per prompt), i.e. draws from rho* ∝ rho_sft·exp(r/λ), and distil them. Every "
            "generation is used and the target answers in large batches: far more signal per CPU-minute."
        },
    )
    kl_rounds: int = field(
        default=1,
        metadata={
            "help": "kl-optimum: sample-resample-distil rounds (each round "
            "re-anchors on the current policy, so λ compounds)."
        },
    )
    kl_prompts_per_round: int | None = field(
        default=None,
        metadata={
            "help": "kl-optimum: fresh prompts for every round — round r trains on prompts "
            "[r·n, (r+1)·n) — so each round adds signal instead of re-fitting the same prompts. "
            "None: every round uses all prompts."
        },
    )
    kl_anchors: list[str] = field(
        default_factory=list,
        metadata={
            "help": "kl-optimum, augment mode: fixed guidance texts scored beside the samples of every prompt "
            "('' = no change), e.g. the guidance library; the resampling may pick them. Empty: samples only."
        },
    )
    kl_include_greedy: bool = field(
        default=True,
        metadata={
            "help": "kl-optimum: score the prompter's deployed (non-sampled) rewrite beside its samples, so a "
            "round moves only where a sample beats what the prompter already does."
        },
    )
    kl_length_control: float = field(
        default=0.0,
        metadata={
            "help": "kl-optimum: share (0..1) of the reward's dependence on answer length removed before "
            "resampling (pooled within-prompt slope of reward on answer words), so rounds distil rewrites "
            "whose answers are better rather than only longer. 0: the raw reward. The logged reward and "
            "val_reward (so kl_keep_best's choice) stay raw."
        },
    )
    kl_validation_prompts: int = field(
        default=0,
        metadata={
            "help": "kl-optimum: hold out the last n training prompts as a fixed validation set; the mean "
            "reward of the prompter's deployed rewrites on them is logged as val_reward before round 1 "
            "(the SFT prompter, step 0) and after every round. 0: no validation."
        },
    )
    kl_keep_best: bool = field(
        default=False,
        metadata={
            "help": "kl-optimum, with kl_validation_prompts: the artifact is the round with the best "
            "val_reward — the SFT prompter itself (round 0) when no round beat it (as Trainer's "
            "load_best_model_at_end)."
        },
    )
    kl_early_stopping_patience: int = field(
        default=0,
        metadata={
            "help": "kl-optimum, with kl_validation_prompts: stop after this many consecutive rounds whose "
            "val_reward does not beat the best so far (as transformers' EarlyStoppingCallback). A prompter "
            "whose deployed rewrite no round changes stops paying for rounds. 0: run all kl_rounds."
        },
    )
    mode: str | None = field(
        default=None, metadata={"help": "Override the artifact's mode (augment / rewrite)."}
    )
    prompts_data: str | None = field(default=None, metadata={"help": "Training prompts x: file or hub id."})
    prompt_field: str = field(default="prompt", metadata={"help": "Prompt column of prompts_data."})
    context_field: str | None = field(
        default=None, metadata={"help": "Optional context column appended to x."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Cap on training prompts."})
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward artifact (from `alignpro reward`)."}
    )
    # λ > 0 by default: without it nothing keeps the prompter close to the SFT prompter.
    beta: float = field(default=0.05, metadata={"help": "λ, the KL coefficient to the SFT prompter (> 0)."})
    lora_r: int = field(
        default=16, metadata={"help": "LoRA rank (only when starting without an SFT adapter)."}
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    # CPU-friendly overrides of TRL's defaults.
    learning_rate: float = field(default=3e-5, metadata={"help": "Learning rate."})
    num_generations: int | None = field(default=4, metadata={"help": "Rewrites per prompt (the GRPO group)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per device per step."})
    max_completion_length: int | None = field(default=48, metadata={"help": "Rewrite length cap during RL."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature for rewrites."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: slower on CPU for small models."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=10, metadata={"help": "Checkpoint every N steps."})
    resume: bool = field(default=False, metadata={"help": "Resume from the latest checkpoint in output_dir."})

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        TargetArguments.__post_init__(self)
        self.kl_anchors = as_str_list(self.kl_anchors, "kl_anchors")
        check_algorithm(self)
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(
                f"mode must be one of {', '.join(repr(m) for m in MODES)}, or unset to keep the SFT prompter's "
                f"mode; got {self.mode!r}"
            )
        if self.beta <= 0:
            raise ValueError(
                "beta (λ) must be > 0: it is the KL penalty that keeps the prompter near the SFT prompter"
            )
        check_kl_rounds(self)
        if not 0.0 <= self.kl_length_control <= 1.0:
            raise ValueError(
                f"kl_length_control is the share of the length effect removed: 0..1, got {self.kl_length_control}"
            )
        if self.kl_validation_prompts < 0:
            raise ValueError(f"kl_validation_prompts must be >= 0, got {self.kl_validation_prompts}")
        if self.kl_early_stopping_patience < 0:
            raise ValueError(
                f"kl_early_stopping_patience is a number of rounds >= 0 (0: off), got {self.kl_early_stopping_patience}"
            )
        if self.kl_early_stopping_patience and not self.kl_validation_prompts:
            raise ValueError(
                "kl_early_stopping_patience stops on the validation reward: set kl_validation_prompts > 0 "
                "(e.g. 48) or drop kl_early_stopping_patience"
            )
        if self.kl_keep_best and not self.kl_validation_prompts:
            raise ValueError(
                "kl_keep_best picks the round with the best validation reward: set kl_validation_prompts > 0 "
                "(e.g. 48) or drop kl_keep_best"
            )
        with grpo_checks_relaxed(self):
            super().__post_init__()
