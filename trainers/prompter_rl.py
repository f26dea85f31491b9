"""What the prompter's RL stage does whichever algorithm trains it: the policy, the target, the reward, the record.

:class:`trainers.rl_trainer.AlignProRLTrainer` (GRPO) and :class:`trainers.kl_optimum_trainer.KLOptimumTrainer`
share this base: the training prompts, the prompter loaded from the SFT artifact (the policy's start and KL
anchor), the frozen target behind its answer cache, the reward, the scorer that joins them, and the provenance
the saved artifact records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from alignpro_plugins.prompter import Prompter
from alignpro_plugins.rewards import as_reward
from alignpro_plugins.targets import TargetRequest
from alignpro_plugins.targets.base import as_requests
from trainers import kl_optimum
from trainers.common import (
    build_target,
    check_reward_source,
    count_trainable,
    lora_config,
    target_cache_path,
    training_prompts,
    wrap_target,
)
from trainers.kl_optimum_config import KLOptimumConfig
from trainers.rl_config import AlignProRLConfig
from trainers.scoring import RewriteScorer


class PrompterRLTrainer:
    """Base of the prompter's RL trainers.

    ``prompts`` are the training prompts x: strings, or :class:`TargetRequest` objects whose ``context`` reaches
    the target and the reward with every rewrite of that x (a framework target's extra inputs, e.g. a DSPy
    example's other fields). ``target`` and ``reward`` default to the config's target and reward model.
    """

    algorithm: str

    def __init__(
        self,
        config: AlignProRLConfig | KLOptimumConfig,
        *,
        prompter: Prompter | str | None = None,
        prompts: Sequence[str | TargetRequest] | None = None,
        target: Any | None = None,
        reward: Any | None = None,
    ) -> None:
        self.config = config
        # Input checks first: a missing reward or prompt file must not cost loading the prompter and target.
        check_reward_source("RL", reward, config.reward_model)
        requests = as_requests(prompts) if prompts is not None else None
        texts = [r.original for r in requests] if requests is not None else None
        self.prompts = training_prompts(config, texts, "RL")
        self.contexts: dict[str, Any] = {}
        for request in requests or []:
            if request.context is not None:
                self.contexts.setdefault(request.original, request.context)  # the first, as for the prompts
        self.check_prompts()
        src = prompter if prompter is not None else config.sft_prompter
        if isinstance(src, Prompter):
            self.prompter = src
        elif src is not None:
            self.prompter = Prompter.from_pretrained(src, is_trainable=True, similarity=None)
        else:
            self.prompter = Prompter.from_base(config.base_model, similarity=None)
        if config.mode:
            self.prompter.manifest = self.prompter.manifest.for_mode(config.mode)
        self.mode = self.prompter.manifest.mode
        output_dir = str(config.output_dir)
        self.target = (
            wrap_target(target, target_cache_path(output_dir))
            if target is not None
            else build_target(config, output_dir)
        )
        self.reward = as_reward(reward if reward is not None else config.reward_model)
        self.scorer = RewriteScorer(self.prompter, self.target, self.reward, self.contexts)

    def check_prompts(self) -> None:
        """Algorithm-specific checks of ``self.prompts``, before any model loads."""

    def first_answers(self, prompts: Sequence[str]) -> dict[str, str] | None:
        """Refine mode: each prompt's first answer y₀ = π_F(x), which the prompter's queries show; else None."""
        return kl_optimum.first_answers(self.scorer, prompts) if self.mode == "refine" else None

    def policy(self) -> tuple[Any, Any]:
        """The model to train and, when it has no SFT adapter, the LoRA config of a fresh one."""
        cfg = self.config
        model = self.prompter.model
        if not hasattr(model, "peft_config"):
            # No SFT adapter: train a fresh LoRA; the reference is then the (unchanged) base = the SFT prompter.
            return model, lora_config(
                cfg.lora_r, cfg.lora_alpha, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"]
            )
        if count_trainable(model) == 0:
            raise RuntimeError("the SFT adapter was loaded frozen (is_trainable=False): nothing would train")
        return model, None

    def finish(
        self,
        steps: int,
        first: float | None,
        last: float | None,
        extra: dict[str, Any] | None = None,
        *,
        save: bool = True,
    ) -> None:
        """Record the stage in the artifact's provenance and save the prompter in ``output_dir``.

        ``extra`` entries join the record and replace its defaults (e.g. target counts summed over processes).
        """
        cfg = self.config
        prov = dict(self.prompter.manifest.provenance)
        prov["stages"] = [
            *prov.get("stages", []),
            {
                "stage": "rl",
                "algorithm": self.algorithm,
                "beta": cfg.beta,
                "steps": steps,
                "prompts": len(self.prompts),
                "num_generations": cfg.num_generations,
                "reward_model": cfg.reward_model,
                "target": self.target.identity,
                "reward_first": first,
                "reward_last": last,
                "target_calls": self.target.stats.calls,
                "target_cache_hits": self.target.stats.cache_hits,
                "target_failures": self.target.stats.failures,
                **(extra or {}),
            },
        ]
        self.prompter.manifest = replace(self.prompter.manifest, provenance=prov)
        if save:
            self.prompter.save_pretrained(Path(str(cfg.output_dir)))
