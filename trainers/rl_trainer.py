"""RL stage (Align-Pro): GRPO on the prompter, rewarded by r(x, π_F(x')) with a KL penalty to the SFT prompter."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from alignpro_plugins.prompter import Prompter
from alignpro_plugins.rewards import as_reward
from trainers.common import (
    JsonlMetricsCallback,
    build_target,
    check_reward_source,
    check_round_prompts,
    count_trainable,
    latest_checkpoint,
    lora_config,
    round_prompts,
    round_seed,
    seed_stage,
    target_cache_path,
    training_prompts,
    wrap_target,
)
from trainers.rl_config import AlignProRLConfig
from trainers.scoring import RewriteScorer

logger = logging.getLogger(__name__)


def _timed_grpo_class():
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPO that also logs where each step's time goes: prompter generation, target, reward, update."""

        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._generate_single_turn(*args, **kwargs)
            finally:
                self._alignpro_times["prompter_generation_s"] += time.perf_counter() - t0

        def training_step(self, *args, **kwargs):
            self._alignpro_times = dict.fromkeys(("prompter_generation_s", "target_s", "reward_s"), 0.0)
            t0 = time.perf_counter()
            out = super().training_step(*args, **kwargs)
            total = time.perf_counter() - t0
            t = self._alignpro_times
            for k, v in t.items():
                self._metrics["train"][f"time/{k}"].append(v)
            self._metrics["train"]["time/update_s"].append(max(total - sum(t.values()), 0.0))
            self._metrics["train"]["time/step_s"].append(total)
            return out

    return TimedGRPOTrainer


class AlignProRLTrainer:
    def __init__(
        self,
        config: AlignProRLConfig,
        *,
        prompter: Prompter | str | None = None,
        prompts: Sequence[str] | None = None,
        target: Any | None = None,
        reward: Any | None = None,
        callbacks: list[Any] | None = None,
        on_target_inputs: Any | None = None,
    ) -> None:
        self.config = config
        self.callbacks = list(callbacks or [])
        # Input checks first: a missing reward or prompt file must not cost loading the prompter and target.
        check_reward_source("RL", reward, config.reward_model)
        self.prompts = training_prompts(config, prompts, "RL")
        self.val_prompts: list[str] = []
        if config.algorithm == "kl-optimum":
            n_val = config.kl_validation_prompts
            if n_val:
                if n_val >= len(self.prompts):
                    raise ValueError(
                        f"RL: kl_validation_prompts={n_val} holds out the last {n_val} training prompts, but "
                        f"there are only {len(self.prompts)}; lower it or give more prompts"
                    )
                self.prompts, self.val_prompts = self.prompts[:-n_val], self.prompts[-n_val:]
            check_round_prompts(self.prompts, config.kl_prompts_per_round, config.kl_rounds, "RL")
        src = prompter if prompter is not None else config.sft_prompter
        if isinstance(src, Prompter):
            self.prompter = src
        elif src is not None:
            self.prompter = Prompter.from_pretrained(src, is_trainable=True, similarity=None)
        else:
            self.prompter = Prompter.from_base(config.base_model, similarity=None)
        if config.mode:
            self.prompter.manifest.mode = config.mode
        self.mode = self.prompter.manifest.mode
        cache = target_cache_path(str(config.output_dir))
        self.target = (
            wrap_target(target, cache) if target is not None else build_target(config, str(config.output_dir))
        )
        self.reward = as_reward(reward if reward is not None else config.reward_model)
        self.scorer = RewriteScorer(self.prompter, self.target, self.reward, on_target_inputs)
        self.trainer: Any = None

    def reward_fn(
        self, prompts: list[str], completions: list[str], original: list[str], **kwargs: Any
    ) -> list[float]:
        """GRPO reward: guard x' (fallback = x), answer with the frozen target, score against ORIGINAL x."""
        batch = self.scorer.score(original, completions, mode=self.mode)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("alignpro/fallback_rate", batch.fallback_rate)
            log_metric(
                "alignpro/rewrite_chars",
                sum(len(r.generated or "") for r in batch.results) / len(batch.results),
            )
            log_metric("alignpro/target_failures", float(self.target.stats.failures))
        if self.trainer is not None and hasattr(self.trainer, "_alignpro_times"):
            self.trainer._alignpro_times["target_s"] += batch.timings["target_s"]
            self.trainer._alignpro_times["reward_s"] += batch.timings["reward_s"]
        return batch.rewards

    def dataset(self):
        import datasets

        return datasets.Dataset.from_dict(
            {
                "prompt": [self.prompter.format_query(x, self.mode) for x in self.prompts],
                "original": self.prompts,
            }
        )

    def _policy(self):
        cfg = self.config
        model = self.prompter.model
        peft_config = None
        if not hasattr(model, "peft_config"):
            # No SFT adapter: train a fresh LoRA; the reference is then the (unchanged) base = the SFT prompter.
            peft_config = lora_config(
                cfg.lora_r, cfg.lora_alpha, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"]
            )
        elif count_trainable(model) == 0:
            raise RuntimeError("the SFT adapter was loaded frozen (is_trainable=False): nothing would train")
        return model, peft_config

    def train(self) -> Prompter:
        seed_stage(self.config)  # a new LoRA is initialised before the Trainer seeds anything
        if self.config.algorithm == "kl-optimum":
            return self._train_kl_optimum()
        return self._train_grpo()

    def _train_kl_optimum(self) -> Prompter:
        """Sample from ρ_sft, resample by exp(r/λ), distil (see trainers/kl_optimum.py); one round per checkpoint."""
        import random

        from alignpro_plugins.manifest import GenerationDefaults
        from trainers import kl_optimum

        cfg = self.config
        out = Path(str(cfg.output_dir))
        if cfg.kl_anchors and self.mode != "augment":
            raise ValueError(
                f"kl_anchors are guidance appended to x, so they need mode='augment' (this prompter: "
                f"{self.mode!r}); drop kl_anchors or set mode='augment'"
            )
        model, peft_config = self._policy()
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
        greedy = replace(deployed, max_new_tokens=settings.max_new_tokens) if cfg.kl_include_greedy else None
        start = 0
        if cfg.resume:
            start = self._resume_rounds(out)
        history = []
        best_val, stale, stopped = float("-inf"), 0, False  # early stopping counts this invocation's rounds
        if self.val_prompts and start == 0:
            # Round 0 is the SFT prompter: the point every round is measured against (and kept if none beats it).
            v0 = kl_optimum.deployed_reward(self.scorer, self.val_prompts, deployed, self.mode)
            kl_optimum.log_row(
                out / "metrics.jsonl", {"stage": "rl", "step": 0, "time": time.time(), "val_reward": v0}
            )
            logger.info("kl-optimum validation before round 1 (SFT prompter): %.4f", v0)
            self.prompter.save_pretrained(out / "round-0")
            best_val = v0
        for r in range(start, cfg.kl_rounds):
            # Each round from its own seed: a resumed run samples what an unbroken one would have.
            seed_stage(cfg, r)
            pairs, stats = kl_optimum.run_round(
                self.scorer,
                round_prompts(self.prompts, cfg.kl_prompts_per_round, r),
                k=int(cfg.num_generations or 4),
                lam=cfg.beta,
                settings=settings,
                mode=self.mode,
                rng=random.Random(round_seed(cfg.seed, r)),
                anchors=cfg.kl_anchors,
                greedy=greedy,
                length_control=cfg.kl_length_control,
            )
            stats.update(kl_optimum.distil(self.prompter, pairs, cfg, out / f"round-{r + 1}-sft", self.mode))
            if self.val_prompts:
                stats["val_reward"] = kl_optimum.deployed_reward(
                    self.scorer, self.val_prompts, deployed, self.mode
                )
            stats["time/step_s"] = sum(v for k, v in stats.items() if k.startswith("time/"))
            row = {"stage": "rl", "step": r + 1, "time": time.time(), **stats}
            kl_optimum.log_row(out / "metrics.jsonl", row)
            logger.info("kl-optimum round %d: %s", r + 1, {k: round(v, 4) for k, v in stats.items()})
            history.append(row)
            self.prompter.save_pretrained(out / f"round-{r + 1}")
            if cfg.kl_early_stopping_patience and "val_reward" in stats:
                stale = 0 if stats["val_reward"] > best_val else stale + 1
                best_val = max(best_val, stats["val_reward"])
                if stale >= cfg.kl_early_stopping_patience and r + 1 < cfg.kl_rounds:
                    logger.info(
                        "kl-optimum: stopping after round %d: %d round(s) without a validation gain over %.4f",
                        r + 1,
                        stale,
                        best_val,
                    )
                    stopped = True
                    break
        selected = None
        if cfg.kl_keep_best and self.val_prompts:
            selected = kl_optimum.keep_best_round(self.prompter.model, out)
        self._finish(
            out,
            "kl-optimum",
            len(history) + start,
            history[0]["reward"] if history else None,
            history[-1]["reward"] if history else None,
            extra={
                **({"selected_round": selected} if selected is not None else {}),
                **({"early_stopped_after_round": start + len(history)} if stopped else {}),
            }
            or None,
        )
        return self.prompter

    def _resume_rounds(self, out: Path) -> int:
        from trainers import kl_optimum

        return kl_optimum.resume_last_round(self.prompter.model, out)

    def _finish(
        self,
        out: Path,
        algorithm: str,
        steps: int,
        first: float | None,
        last: float | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        cfg = self.config
        prov = dict(self.prompter.manifest.provenance)
        prov["stages"] = [
            *prov.get("stages", []),
            {
                "stage": "rl",
                "algorithm": algorithm,
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
        if (
            self.trainer is None or self.trainer.is_world_process_zero()
        ):  # one writer under `accelerate launch`
            self.prompter.save_pretrained(out)

    def _train_grpo(self) -> Prompter:
        cfg = self.config
        model, peft_config = self._policy()
        self.prompter.tokenizer.padding_side = "left"

        def alignpro_reward(
            prompts, completions, original, **kw
        ) -> list[float | None]:  # name shows in TRL logs
            return list(self.reward_fn(prompts, completions, original, **kw))

        self.trainer = _timed_grpo_class()(
            model=model,
            reward_funcs=[alignpro_reward],
            args=cfg,
            train_dataset=self.dataset(),
            processing_class=self.prompter.tokenizer,
            peft_config=peft_config,
            callbacks=[
                JsonlMetricsCallback(Path(str(cfg.output_dir)) / "metrics.jsonl", "rl"),
                *self.callbacks,
            ],
        )
        self.trainer._alignpro_times = dict.fromkeys(("prompter_generation_s", "target_s", "reward_s"), 0.0)
        resume = latest_checkpoint(str(cfg.output_dir)) if cfg.resume else None
        self.trainer.train(resume_from_checkpoint=resume)
        policy = self.trainer.model
        if "ref" in getattr(policy, "peft_config", {}):
            policy.delete_adapter("ref")  # the artifact holds the trained adapter only
        policy.eval()
        self.prompter.model = policy
        history = [h for h in self.trainer.state.log_history if "reward" in h]
        self._finish(
            Path(str(cfg.output_dir)),
            "grpo",
            self.trainer.state.global_step,
            history[0]["reward"] if history else None,
            history[-1]["reward"] if history else None,
        )
        return self.prompter


def train_rl(config: AlignProRLConfig, **kwargs: Any) -> Prompter:
    os.makedirs(str(config.output_dir), exist_ok=True)
    return AlignProRLTrainer(config, **kwargs).train()
