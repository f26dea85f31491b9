from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from alignpro_plugins.guidance import GUIDANCE_LIBRARY
from alignpro_plugins.manifest import MODES
from trainers.arguments import StageArguments, TargetArguments, apply_hardware_defaults, as_str_list

# Candidate guidance the bootstrap scores beside the prompter's own samples (augment mode). Starting from
# what a user would try first means the SFT prompter begins at least where the fixed-instruction baseline is.
DEFAULT_GUIDANCE_TEMPLATES = list(GUIDANCE_LIBRARY)
# Checked here for pairs_data and by the trainer for pairs= (which no config holds).
REFINE_NEEDS_BOOTSTRAP = (
    "mode='refine' learns from the frozen target's first answers, which (prompt, improved prompt) pairs do not "
    "hold: drop the pairs (pairs_data, or pairs= in code) and bootstrap from prompts (prompts_data, or prompts=) "
    "with a reward"
)


@dataclass
class AlignProSFTConfig(StageArguments, SFTConfig, TargetArguments):
    """SFT stage: LoRA SFT of the prompter on (prompt, improved prompt) pairs, or on best-of-K bootstrap targets.

    Every field is also a CLI flag (``alignpro sft --help``) and a YAML key (``sft:`` in a recipe).
    """

    base_model: str = field(default="smollm2-135m-instruct", metadata={"help": "Prompter base model."})
    mode: str = field(
        default="augment",
        metadata={
            "help": "'augment' (keep x, add guidance), 'rewrite' (x' replaces x) or 'refine' (keep x, add guidance "
            "written from x and the frozen target's first answer y0; bootstrap only: each query shows y0)."
        },
    )
    pairs_data: str | None = field(
        default=None, metadata={"help": "(prompt, improved prompt) pairs: file or hub id. Omit to bootstrap."}
    )
    prompt_field: str = field(
        default="instruction", metadata={"help": "Prompt column of pairs_data / prompts_data."}
    )
    target_field: str = field(
        default="optimized_prompt", metadata={"help": "Improved-prompt column of pairs_data."}
    )
    context_field: str | None = field(
        default="context", metadata={"help": "Optional context column appended to x."}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "Cap on pairs / bootstrap prompts."})
    # Bootstrap (best-of-K): the sampled form of the closed-form optimum rho* ∝ rho_sft · exp(r / λ).
    prompts_data: str | None = field(
        default=None, metadata={"help": "Prompts for the bootstrap: file or hub id."}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward artifact (from `alignpro reward`)."}
    )
    num_candidates: int = field(
        default=3, metadata={"help": "K: sampled rewrites per prompt in the bootstrap."}
    )
    candidate_temperature: float = field(
        default=0.9, metadata={"help": "Sampling temperature for candidates."}
    )
    include_templates: bool = field(
        default=True,
        metadata={"help": "Score fixed guidance templates as candidates too (augment and refine modes)."},
    )
    templates: list[str] = field(
        default_factory=lambda: list(DEFAULT_GUIDANCE_TEMPLATES), metadata={"help": "Guidance templates."}
    )
    templates_from: str | None = field(
        default=None,
        metadata={
            "help": "Output folder of `alignpro guidance` (read when the trainer starts, so a recipe can run the "
            "search first): its best `templates_from_top` texts are scored before `templates`."
        },
    )
    templates_from_top: int = field(
        default=3, metadata={"help": "How many of the guidance search's texts join `templates`."}
    )
    include_no_change: bool = field(
        default=True,
        metadata={"help": "Score 'no change' too; if it wins, the prompter learns to leave x alone."},
    )
    prompter_max_new_tokens: int = field(default=48, metadata={"help": "Rewrite length cap while sampling."})
    prompt_only_prompter: str | None = field(
        default=None,
        metadata={
            "help": "Refine mode: a prompt-only (augment) prompter artifact; its guidance for each x joins that "
            "prompt's candidates, so the refinement prompter starts at least where it is."
        },
    )
    refine_answer_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Refine mode: tokens of the first answer the prompter's query shows (recorded in the "
            "artifact). None: the manifest default (256)."
        },
    )
    bootstrap_neighbours: int = field(
        default=0,
        metadata={
            "help": "0: each prompt's target is its own best candidate. N > 0: the fixed candidate (template or "
            "'no change') with the best reward averaged over the prompt and its N most similar bootstrap "
            "prompts, so one noisy answer does not decide the target. -1: choose N by leave-one-out reward."
        },
    )
    bootstrap_embedding_model: str = field(
        default="all-minilm-l6-v2",
        metadata={
            "help": "Sentence encoder (name or local folder) that finds similar prompts for bootstrap_neighbours."
        },
    )
    # LoRA
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "LoRA target modules."},
    )
    # CPU-friendly overrides of TRL's defaults.
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate (LoRA)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    max_length: int | None = field(default=512, metadata={"help": "Max tokens of query + target."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: slower on CPU for small models."}
    )
    fit_check_prompts: int = field(
        default=16,
        metadata={
            "help": "After training, decode this many training prompts as deployed (greedy) and record how often "
            "the prompter reproduces its SFT target (provenance 'fit_check'); warns when most targets are one "
            "text and few are reproduced (underfit: raise num_train_epochs). 0 skips."
        },
    )
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        SFTConfig.__post_init__(self)
        self.check_target_arguments()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {self.mode!r}")
        if self.mode != "refine":
            for option in ("prompt_only_prompter", "refine_answer_tokens"):
                if getattr(self, option) is not None:
                    raise ValueError(
                        f"{option} is a refine-mode setting, but mode is {self.mode!r}: set mode='refine' or "
                        f"drop {option}"
                    )
        elif self.pairs_data:
            raise ValueError(REFINE_NEEDS_BOOTSTRAP)
        if self.refine_answer_tokens is not None and self.refine_answer_tokens < 1:
            raise ValueError(f"refine_answer_tokens must be >= 1 (or None), got {self.refine_answer_tokens}")
        self.templates = as_str_list(self.templates, "templates")
        if self.templates_from_top < 1:
            raise ValueError(f"templates_from_top must be >= 1, got {self.templates_from_top}")
        if self.fit_check_prompts < 0:
            raise ValueError(
                f"fit_check_prompts is a number of prompts >= 0 (0 skips); got {self.fit_check_prompts}"
            )
        if self.num_candidates < 0:
            raise ValueError("num_candidates must be >= 0")
        if self.bootstrap_neighbours < -1:
            raise ValueError(
                f"bootstrap_neighbours is 0 (off), a neighbourhood size N > 0, or -1 (choose N by "
                f"leave-one-out); got {self.bootstrap_neighbours}"
            )
