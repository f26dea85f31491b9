from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from trainers.arguments import (
    PrompterRLArguments,
    apply_hardware_defaults,
    as_str_list,
    check_algorithm,
    launched_processes,
)


@dataclass
class KLOptimumArguments:
    """The kl-optimum algorithm's rounds, for the prompter (:class:`KLOptimumConfig`) and the RLHF oracle."""

    algorithm: str = field(
        default="kl-optimum",
        metadata={
            "help": "'kl-optimum' (this config) or 'grpo' (TRL GRPO: its own options, `--algorithm grpo --help`)."
        },
    )
    rounds: int = field(
        default=1,
        metadata={
            "help": "Sample-resample-distil rounds; each re-anchors on the current model (so λ compounds) and "
            "saves round-N/, which `resume` continues after."
        },
    )
    prompts_per_round: int | None = field(
        default=None,
        metadata={
            "help": "Fresh prompts for every round — round r trains on prompts [r·n, (r+1)·n) — so each round "
            "adds signal instead of re-fitting the same prompts. None: every round uses all prompts."
        },
    )
    include_greedy: bool = field(
        default=True,
        metadata={
            "help": "Score the model's deployed (non-sampled) output beside its samples, so a round moves only "
            "where a sample beats what the model already does."
        },
    )

    def check_kl_optimum_arguments(self, config: str, command: str) -> None:
        check_algorithm(self.algorithm, "kl-optimum", config, command)
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        n = self.prompts_per_round
        if n is not None and n < 1:
            raise ValueError(f"prompts_per_round must be >= 1 or None (all prompts every round), got {n}")
        samples = getattr(self, "num_generations", None)
        if (samples or 0) < 1:
            raise ValueError(f"num_generations (samples per prompt) must be >= 1, got {samples}")
        processes = launched_processes()
        if processes > 1:
            # Its rounds do not split across processes: each one would sample and score the same rewrites and
            # write the same round-N/ folders and metrics rows (racing saves fail).
            raise ValueError(
                f"kl-optimum runs as one process, but this run was launched as {processes} processes (accelerate "
                f"launch, torchrun or mpirun) and its rounds do not split across them: run `alignpro {command} "
                f"--algorithm kl-optimum` without a launcher, or train across processes with `--algorithm grpo`"
            )


@dataclass
class KLOptimumConfig(KLOptimumArguments, PrompterRLArguments, TrainingArguments):
    """RL stage by kl-optimum: the optimum of max_ρ E[r(x, y)] − λ·KL(ρ‖ρ_sft), sampled and distilled.

    ρ*(x'|x) ∝ ρ_sft(x'|x)·exp(r/λ): each round samples ``num_generations`` rewrites per prompt from the prompter,
    resamples them with weights softmax(z/λ) (z: the rewards standardised per prompt) and distils the draws into
    its adapter with TRL's SFTTrainer. Every generation is used and the target answers in large batches: far more
    signal per CPU-minute than GRPO (:class:`trainers.rl_config.AlignProRLConfig`). Every field is also a CLI flag
    and a YAML key (``rl:`` with ``algorithm: kl-optimum``); the learning rate, batch size, seed and precision
    fields are those of each round's distillation.
    """

    top_p: float = field(default=1.0, metadata={"help": "Top-p of the sampled rewrites."})
    anchors: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Augment or refine mode: fixed guidance texts scored beside the samples of every prompt ('' = "
            "no change), e.g. the guidance library; the resampling may pick them. Empty: samples only."
        },
    )
    length_control: float = field(
        default=0.0,
        metadata={
            "help": "Share (0..1) of the reward's dependence on answer length removed before resampling (pooled "
            "within-prompt slope of reward on answer words), so rounds distil rewrites whose answers are better "
            "rather than only longer. 0: the raw reward. The logged reward and val_reward (so keep_best's "
            "choice) stay raw."
        },
    )
    validation_prompts: int = field(
        default=0,
        metadata={
            "help": "Hold out the last n training prompts as a fixed validation set; the mean reward of the "
            "prompter's deployed rewrites on them is logged as val_reward before round 1 (the SFT prompter, "
            "step 0) and after every round. 0: no validation."
        },
    )
    keep_best: bool = field(
        default=False,
        metadata={
            "help": "With validation_prompts: the artifact is the round with the best val_reward — the SFT "
            "prompter itself (round 0) when no round beat it (as Trainer's load_best_model_at_end)."
        },
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={
            "help": "With validation_prompts: stop after this many consecutive rounds whose val_reward does not "
            "beat the best so far (as transformers' EarlyStoppingCallback). 0: run all rounds."
        },
    )

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        self.check_kl_optimum_arguments("KLOptimumConfig", "rl")
        self.check_prompter_rl_arguments()
        self.anchors = as_str_list(self.anchors, "anchors")
        if not 0.0 <= self.length_control <= 1.0:
            raise ValueError(
                f"length_control is the share of the length effect removed: 0..1, got {self.length_control}"
            )
        if self.validation_prompts < 0:
            raise ValueError(f"validation_prompts must be >= 0, got {self.validation_prompts}")
        if self.early_stopping_patience < 0:
            raise ValueError(
                f"early_stopping_patience is a number of rounds >= 0 (0: off), got {self.early_stopping_patience}"
            )
        needs_validation = {
            "early_stopping_patience": "stops on the validation reward",
            "keep_best": "picks the round with the best validation reward",
        }
        for option, why in needs_validation.items():
            if getattr(self, option) and not self.validation_prompts:
                raise ValueError(f"{option} {why}: set validation_prompts > 0 (e.g. 48) or drop {option}")
        TrainingArguments.__post_init__(self)
