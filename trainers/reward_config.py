from __future__ import annotations

from dataclasses import dataclass, field

from trl import RewardConfig

from alignpro_plugins.reward_ensemble import COMBINE_RULES
from alignpro_plugins.rewards import LENGTH_CONTROLS
from trainers.arguments import StageArguments, apply_hardware_defaults, as_str_list
from trainers.reward_metrics import LENGTH_MATCHED_TOLERANCE

ENSEMBLE_SPLITS = ("shards", "bootstrap")


@dataclass
class AlignProRewardConfig(StageArguments, RewardConfig):
    """Reward stage: a reward model r(x, y) from preference pairs, on TRL's RewardTrainer.

    Every field is also a CLI flag (``alignpro reward --help``) and a YAML key (``reward:`` in a recipe).
    """

    base_model: str = field(
        default="all-minilm-l6-v2",
        metadata={"help": "Sequence-classification base: packaged name, local folder or hub id."},
    )
    preference_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Preference files or hub ids: (prompt, chosen, rejected) rows, or HH-RLHF dialogues."
        },
    )
    prompt_field: str = field(
        default="prompt", metadata={"help": "Prompt column (absent: HH-RLHF dialogue rows)."}
    )
    chosen_field: str = field(default="chosen", metadata={"help": "Preferred answer column."})
    rejected_field: str = field(default="rejected", metadata={"help": "Dispreferred answer column."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Hub data set sub-folder (e.g. harmless-base)."}
    )
    max_pairs_per_source: int | None = field(
        default=None, metadata={"help": "Cap on pairs read from each source."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of PROMPTS held out for pairwise accuracy."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the held-out prompt split."})
    max_eval_pairs: int | None = field(
        default=None,
        metadata={
            "help": "Score at most this many held-out pairs (a seeded sample; the rest is neither trained on "
            "nor scored), and at most this many training pairs for the training sample and the length "
            "penalty. For slow bases (a decoder on CPU); None scores every held-out pair."
        },
    )
    prompt_shard: int | None = field(
        default=None,
        metadata={
            "help": "Train only on prompts in this shard (0..num_prompt_shards-1): two shards give two "
            "reward models with disjoint prompts (a training reward and an independent judge)."
        },
    )
    num_prompt_shards: int = field(default=2, metadata={"help": "Number of prompt shards."})
    exclude_prompt_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Prompt files or hub ids whose prompts are never trained on: pass your evaluation sets "
            "(AlpacaEval's preference pairs hold every Self-Instruct evaluation prompt, for one)."
        },
    )
    exclude_prompt_field: str = field(
        default="instruction", metadata={"help": "Prompt column of exclude_prompt_files."}
    )
    exclude_context_field: str | None = field(
        default="context",
        metadata={"help": "Optional context column of exclude_prompt_files, appended as in evaluation."},
    )
    max_prompt_length: int = field(default=96, metadata={"help": "Prompt tokens kept (truncated first)."})
    freeze_layers: int = field(
        default=0,
        metadata={
            "help": "Freeze the embeddings and this many lower layers (faster on CPU: no backward pass through "
            "them). With use_lora, the LoRA goes on the layers above them only."
        },
    )
    group_by_prompt: bool = field(
        default=False,
        metadata={
            "help": "Batch the pairs of one prompt together, sorted by length: little padding, and an answer "
            "several pairs share (AlpacaEval's reference answers) is run once per batch. Same loss, fewer tokens."
        },
    )
    length_matched_tolerance: float = field(
        default=LENGTH_MATCHED_TOLERANCE,
        metadata={
            "help": "Held-out pairs whose answers differ in word count by at most this share of the longer one "
            "are 'length-matched'; their accuracy is reported beside the accuracy on all pairs."
        },
    )
    length_control: str = field(
        default="none",
        metadata={
            "help": "'none': raw scores. 'penalty': after training, fit β (the slope of score on answer tokens "
            "within training pairs) and score raw − β·tokens, so length alone does not pay."
        },
    )
    use_lora: bool = field(
        default=False,
        metadata={
            "help": "Train a LoRA (and the score head) instead of the model's weights; saved merged, so the "
            "artifact loads without peft. For decoder bases such as smollm2-135m-instruct."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (use_lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (use_lora)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "LoRA dropout (use_lora); TRL's disable_dropout (on by default) sets it to 0."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Modules that get a LoRA (use_lora): names, or all-linear."},
    )
    ensemble_size: int = field(
        default=1,
        metadata={
            "help": "K > 1 trains K reward models into output_dir/member-0..K-1 (seeds seed..seed+K-1, data "
            "per ensemble_split, one shared held-out split) and writes an ensemble that load_reward opens."
        },
    )
    ensemble_split: str = field(
        default="shards",
        metadata={
            "help": "Members' training data: 'shards' (disjoint prompt shards: K members cost one model) or "
            "'bootstrap' (each a resample of all training pairs: K times the cost)."
        },
    )
    ensemble_combine: str = field(
        default="mean",
        metadata={"help": "How the ensemble combines its members' scores: mean, min or mean-minus-std."},
    )
    ensemble_combine_k: float = field(
        default=1.0, metadata={"help": "k of mean-minus-std: mean − k·std of the members' scores."}
    )
    max_length: int | None = field(default=256, metadata={"help": "Prompt + answer tokens."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per device per step."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: slower on CPU for small models."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=200, metadata={"help": "Checkpoint every N steps."})

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        RewardConfig.__post_init__(self)
        self.preference_data = as_str_list(self.preference_data, "preference_data")
        self.exclude_prompt_files = as_str_list(self.exclude_prompt_files, "exclude_prompt_files")
        if self.freeze_layers < 0:
            raise ValueError(
                f"freeze_layers is a number of layers: >= 0 (0 trains every layer), got {self.freeze_layers}"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.prompt_shard is not None and not 0 <= self.prompt_shard < self.num_prompt_shards:
            raise ValueError(
                f"prompt_shard must be in [0, {self.num_prompt_shards}), got {self.prompt_shard}"
            )
        self.lora_target_modules = as_str_list(self.lora_target_modules, "lora_target_modules")
        self.check_reward_options()

    def check_reward_options(self) -> None:
        if self.max_eval_pairs is not None and self.max_eval_pairs < 1:
            raise ValueError(
                f"max_eval_pairs is None (every held-out pair) or >= 1, got {self.max_eval_pairs}"
            )
        if not 0 <= self.length_matched_tolerance < 1:
            raise ValueError(
                "length_matched_tolerance is the share of the longer answer's word count two answers may differ "
                f"by: in [0, 1) (default {LENGTH_MATCHED_TOLERANCE}), got {self.length_matched_tolerance}"
            )
        _check_choice("length_control", self.length_control, LENGTH_CONTROLS)
        _check_choice("ensemble_split", self.ensemble_split, ENSEMBLE_SPLITS)
        _check_choice("ensemble_combine", self.ensemble_combine, COMBINE_RULES)
        if (
            isinstance(self.ensemble_size, bool)
            or not isinstance(self.ensemble_size, int)
            or self.ensemble_size < 1
        ):
            raise ValueError(
                f"ensemble_size is a number of reward models: 1 (one model) or more, got {self.ensemble_size!r}"
            )
        if not (self.ensemble_combine_k >= 0 and self.ensemble_combine_k != float("inf")):
            raise ValueError(
                f"ensemble_combine_k is the k of mean − k·std: a finite number >= 0, got {self.ensemble_combine_k}"
            )
        if self.use_lora:
            if self.lora_r < 1 or self.lora_alpha <= 0:
                raise ValueError(
                    f"use_lora needs lora_r >= 1 and lora_alpha > 0, got lora_r={self.lora_r}, "
                    f"lora_alpha={self.lora_alpha}"
                )
            if not self.lora_target_modules:
                raise ValueError("use_lora needs lora_target_modules: module names, or all-linear")
            if not 0 <= self.lora_dropout < 1:
                raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(repr(a) for a in accepted)}")
