"""RL stage (Align-Pro) by kl-optimum: rounds of sampling from the prompter, resampling by exp(r/λ), distilling."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from pathlib import Path

from alignpro_plugins.manifest import GenerationDefaults, appends_guidance
from alignpro_plugins.prompter import Prompter
from trainers import kl_optimum
from trainers.common import round_seed, seed_stage
from trainers.kl_optimum_config import KLOptimumConfig
from trainers.prompter_rl import PrompterRLTrainer

logger = logging.getLogger(__name__)


class KLOptimumTrainer(PrompterRLTrainer):
    """The prompter's RL stage by kl-optimum (see :mod:`trainers.kl_optimum`); one round per checkpoint.

    Arguments as :class:`trainers.prompter_rl.PrompterRLTrainer`. With ``validation_prompts = n`` the last n
    training prompts are held out of every round to measure the deployed rewrites (``val_reward``). A refine-mode
    prompter (its SFT artifact the anchor) reads each prompt's first answer y₀ = π_F(x), asked once before the
    rounds; the reward scores the answer to its x'' against x.
    """

    algorithm = "kl-optimum"
    config: KLOptimumConfig

    def check_prompts(self) -> None:
        cfg = self.config
        self.val_prompts: list[str] = []
        n_val = cfg.validation_prompts
        if n_val:
            if n_val >= len(self.prompts):
                raise ValueError(
                    f"RL: validation_prompts={n_val} holds out the last {n_val} training prompts, but there are "
                    f"only {len(self.prompts)}; lower it or give more prompts"
                )
            self.prompts, self.val_prompts = self.prompts[:-n_val], self.prompts[-n_val:]
        kl_optimum.check_round_prompts(self.prompts, cfg.prompts_per_round, cfg.rounds, "RL")

    def train(self) -> Prompter:
        """Sample from ρ_sft, resample by exp(r/λ), distil; ``round-N/`` holds the adapter after round N."""
        cfg = self.config
        seed_stage(cfg)  # a new LoRA is initialised before anything else draws random numbers
        out = Path(str(cfg.output_dir))
        if cfg.anchors and not appends_guidance(self.mode):
            raise ValueError(
                f"anchors are guidance appended to x, so they need mode='augment' or 'refine' (this prompter: "
                f"{self.mode!r}); drop anchors or set mode='augment'"
            )
        model, peft_config = self.policy()
        if peft_config is not None:
            from peft import get_peft_model

            self.prompter.model = get_peft_model(model, peft_config)
        settings = GenerationDefaults(
            max_new_tokens=int(cfg.max_completion_length or 48),
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            repetition_penalty=1.0,
        )
        # The deployed decoding (the artifact's own settings, sampling off), at the training length cap.
        deployed = replace(self.prompter.manifest.generation, do_sample=False)
        greedy = replace(deployed, max_new_tokens=settings.max_new_tokens) if cfg.include_greedy else None
        metrics = out / "metrics.jsonl"
        answers = self.first_answers([*self.prompts, *self.val_prompts])
        start = kl_optimum.resume_last_round(self.prompter.model, out, metrics) if cfg.resume else 0
        history = []
        best_val, stale, stopped = float("-inf"), 0, False  # early stopping counts this invocation's rounds
        if self.val_prompts and start == 0:
            # Round 0 is the SFT prompter: the point every round is measured against (and kept if none beats it).
            v0 = kl_optimum.deployed_reward(
                self.scorer, self.val_prompts, deployed, self.mode, answers=answers
            )
            kl_optimum.log_row(metrics, {"stage": "rl", "step": 0, "time": time.time(), "val_reward": v0})
            logger.info("kl-optimum validation before round 1 (SFT prompter): %.4f", v0)
            kl_optimum.save_round(self.prompter, out, 0)
            best_val = v0
        for r in range(start, cfg.rounds):
            # Each round from its own seed: a resumed run samples what an unbroken one would have.
            seed_stage(cfg, r)
            pairs, stats = kl_optimum.run_round(
                self.scorer,
                kl_optimum.round_prompts(self.prompts, cfg.prompts_per_round, r),
                k=int(cfg.num_generations or 4),
                lam=cfg.beta,
                settings=settings,
                mode=self.mode,
                rng=random.Random(round_seed(cfg.seed, r)),
                anchors=cfg.anchors,
                greedy=greedy,
                length_control=cfg.length_control,
                answers=answers,
            )
            stats.update(
                kl_optimum.distil(
                    self.prompter, pairs, cfg, out / f"round-{r + 1}-sft", self.mode, answers=answers
                )
            )
            if self.val_prompts:
                stats["val_reward"] = kl_optimum.deployed_reward(
                    self.scorer, self.val_prompts, deployed, self.mode, answers=answers
                )
            stats["time/step_s"] = sum(v for k, v in stats.items() if k.startswith("time/"))
            row = {"stage": "rl", "step": r + 1, "time": time.time(), **stats}
            kl_optimum.log_row(metrics, row)
            logger.info("kl-optimum round %d: %s", r + 1, {k: round(v, 4) for k, v in stats.items()})
            history.append(row)
            kl_optimum.save_round(self.prompter, out, r + 1)
            if cfg.early_stopping_patience and "val_reward" in stats:
                stale = 0 if stats["val_reward"] > best_val else stale + 1
                best_val = max(best_val, stats["val_reward"])
                if stale >= cfg.early_stopping_patience and r + 1 < cfg.rounds:
                    logger.info(
                        "kl-optimum: stopping after round %d: %d round(s) without a validation gain over %.4f",
                        r + 1,
                        stale,
                        best_val,
                    )
                    stopped = True
                    break
        selected = kl_optimum.keep_best_round(self.prompter.model, out) if cfg.keep_best else None
        extra = {
            **({"selected_round": selected} if selected is not None else {}),
            **({"early_stopped_after_round": start + len(history)} if stopped else {}),
        }
        self.finish(
            len(history) + start,
            history[0]["reward"] if history else None,
            history[-1]["reward"] if history else None,
            extra or None,
        )
        return self.prompter
