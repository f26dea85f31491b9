from __future__ import annotations

from dataclasses import dataclass, field

from trl import RewardConfig

from trainers.arguments import StageArguments, apply_hardware_defaults, as_str_list


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
        metadata={"help": "Freeze the embeddings and this many lower encoder layers (faster on CPU)."},
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
