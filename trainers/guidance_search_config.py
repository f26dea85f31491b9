from __future__ import annotations

from dataclasses import dataclass, field

from alignpro_plugins.guidance import GUIDANCE_LIBRARY
from trainers.arguments import TargetArguments, as_str_list

OBJECTIVES = ("mean", "win_rate", "mean_minus_std")


@dataclass
class GuidanceSearchConfig(TargetArguments):
    """Guidance search: the fixed guidance text whose answers score best *across* training prompts.

    Candidates are the seed texts plus recombinations of their sentences; successive halving scores every
    candidate on a few prompts, keeps the best fraction, doubles the prompts, and so on; the finalists (and
    "no change") are compared on validation prompts no rung saw. The winner is a `template` a user can append
    as is, or the fixed candidate the SFT bootstrap distils (``alignpro sft --templates_from <output_dir>``).

    Every field is also a CLI flag (``alignpro guidance --help``) and a YAML key.
    """

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for guidance_search.json and the answer cache (unset: trainer_output, as in TRL)."
        },
    )
    prompts_data: str | None = field(
        default=None, metadata={"help": "Training prompts to score texts on: file or hub id."}
    )
    prompt_field: str = field(default="instruction", metadata={"help": "Prompt column of the prompt files."})
    context_field: str | None = field(
        default="context", metadata={"help": "Optional context column appended to x."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Cap on search prompts."})
    validation_data: str | None = field(
        default=None,
        metadata={
            "help": "Validation prompts: file or hub id. Omit to hold validation_prompts out of prompts_data."
        },
    )
    validation_prompts: int = field(
        default=32,
        metadata={
            "help": "Validation prompts the finalists are compared on (0: pick on the search prompts)."
        },
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward artifact (from `alignpro reward`) that scores answers against x."},
    )
    seed_texts: list[str] = field(
        default_factory=lambda: list(GUIDANCE_LIBRARY),
        metadata={"help": "Guidance texts the search starts from (default: the guidance library)."},
    )
    recombine: bool = field(
        default=True,
        metadata={
            "help": "Also score each seed sentence alone and each seed text extended by one sentence of "
            "another seed."
        },
    )
    min_prompts: int = field(
        default=16,
        metadata={"help": "Prompts every candidate is scored on in the first rung; rungs double it."},
    )
    keep_fraction: float = field(
        default=0.5, metadata={"help": "Share of candidates (best objective so far) each rung keeps."}
    )
    objective: str = field(
        default="mean",
        metadata={
            "help": "What ranks a text across prompts, in the rungs and on validation: 'mean' (mean reward), "
            "'win_rate' (share of prompts where its answer beats 'no change', ties half), or "
            "'mean_minus_std' (mean reward minus risk_aversion times the rewards' standard deviation across "
            "prompts: prefers a text that lifts every prompt a little over one that lifts some a lot).",
            "choices": list(OBJECTIVES),
        },
    )
    risk_aversion: float = field(
        default=1.0,
        metadata={"help": "With objective 'mean_minus_std': the weight of the standard deviation (>= 0)."},
    )
    finalists: int = field(
        default=3,
        metadata={"help": "Halving stops at this many candidates; they meet on validation prompts."},
    )
    seed: int = field(
        default=0, metadata={"help": "Shuffles the prompts before the rungs take them in order."}
    )

    def __post_init__(self) -> None:
        self.check_target_arguments()
        self.output_dir = self.output_dir or "trainer_output"
        self.seed_texts = as_str_list(self.seed_texts, "seed_texts")
        if not [t for t in self.seed_texts if t.strip()]:
            raise ValueError("seed_texts needs at least one non-empty guidance text")
        if self.min_prompts < 1:
            raise ValueError(f"min_prompts must be >= 1, got {self.min_prompts}")
        if not 0 < self.keep_fraction < 1:
            raise ValueError(f"keep_fraction must be in (0, 1), got {self.keep_fraction}")
        if self.finalists < 1:
            raise ValueError(f"finalists must be >= 1, got {self.finalists}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.risk_aversion < 0:
            raise ValueError(f"risk_aversion must be >= 0, got {self.risk_aversion}")
        if self.validation_prompts < 0:
            raise ValueError(f"validation_prompts must be >= 0, got {self.validation_prompts}")
