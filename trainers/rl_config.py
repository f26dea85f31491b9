from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from trainers.arguments import GRPOArguments, PrompterRLArguments, apply_hardware_defaults, check_algorithm


@dataclass
class AlignProRLConfig(PrompterRLArguments, GRPOArguments, GRPOConfig):
    """RL stage by GRPO: max_ρ E[r(x, y)] − λ·KL(ρ(·|x) ‖ ρ_sft(·|x)), x' ~ ρ(·|x), y ~ π_F(·|x'), on TRL's GRPO.

    ``beta`` is λ. The policy starts from the SFT prompter and the KL reference IS the SFT prompter (its adapter
    is copied into a frozen ``ref`` adapter). Every field is also a CLI flag and a YAML key (``rl:``). The same
    objective by sampling and distilling its closed-form optimum: :class:`trainers.kl_optimum_config.KLOptimumConfig`.
    """

    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: slower on CPU for small models."}
    )

    def __post_init__(self) -> None:
        apply_hardware_defaults(self)
        check_algorithm(self.algorithm, "grpo", "AlignProRLConfig")
        self.check_prompter_rl_arguments()
        GRPOConfig.__post_init__(self)
