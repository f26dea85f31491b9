"""RL stage (Align-Pro) by GRPO: TRL's GRPOTrainer on the prompter, rewarded by r(x, π_F(x')), KL to the SFT prompter."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from transformers import TrainerCallback

from alignpro_plugins.prompter import Prompter
from trainers import kl_optimum
from trainers.common import metrics_callback, resume_checkpoint, seed_stage
from trainers.kl_optimum_config import KLOptimumConfig
from trainers.prompter_rl import PrompterRLTrainer
from trainers.rl_config import AlignProRLConfig


class StepTimes(TrainerCallback):
    """Where each GRPO step's time goes, measured through public hooks only.

    The clock starts at ``on_step_begin``. TRL calls the reward function once the step's rewrites are sampled:
    the time until its first call is ``prompter_generation_s`` (sampling, and TRL's log-prob passes before
    scoring), and the reward function adds what it spent in the target and the reward. ``on_step_end`` closes
    the step; the rest is ``update_s``. :meth:`flush` gives the means since the last log, under ``time/``.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._current: dict[str, float] = {}
        self._steps: list[dict[str, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._current = {"target_s": 0.0, "reward_s": 0.0}

    def scored(self, started: float, timings: dict[str, float]) -> None:
        """A reward call that began at ``started`` (``time.perf_counter()``) and spent ``timings``."""
        if self._start is None:
            return
        self._current.setdefault("prompter_generation_s", started - self._start)
        for key in ("target_s", "reward_s"):
            self._current[key] += timings[key]

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is None:
            return
        total = time.perf_counter() - self._start
        step = {"prompter_generation_s": 0.0, **self._current}
        step["update_s"] = max(total - sum(step.values()), 0.0)
        step["step_s"] = total
        self._steps.append(step)
        self._start = None

    def flush(self) -> dict[str, float]:
        steps, self._steps = self._steps, []
        if not steps:
            return {}
        return {f"time/{key}": sum(s[key] for s in steps) / len(steps) for key in steps[0]}


def _grpo_trainer_class():
    from trl import GRPOTrainer

    class AlignProGRPOTrainer(GRPOTrainer):
        """TRL's GRPO; its public ``log`` also reports the step times (:class:`StepTimes`)."""

        def __init__(self, *args: Any, step_times: StepTimes, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.step_times = step_times

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            logs.update(self.step_times.flush())
            super().log(logs, start_time)

    return AlignProGRPOTrainer


class AlignProRLTrainer(PrompterRLTrainer):
    """The prompter's RL stage by GRPO (see :class:`trainers.prompter_rl.PrompterRLTrainer` for the arguments);
    ``callbacks`` are TrainerCallbacks handed to TRL's GRPOTrainer."""

    algorithm = "grpo"

    def __init__(
        self, config: AlignProRLConfig, *, callbacks: list[TrainerCallback] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(config, **kwargs)
        self.callbacks = list(callbacks or [])
        self.step_times = StepTimes()
        self.trainer: Any = None

    def reward_fn(
        self, prompts: list[str], completions: list[str], original: list[str], **kwargs: Any
    ) -> list[float]:
        """GRPO reward: guard x' (fallback = x), answer with the frozen target, score against ORIGINAL x."""
        started = time.perf_counter()
        batch = self.scorer.score(original, completions, mode=self.mode)
        self.step_times.scored(started, batch.timings)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("alignpro/fallback_rate", batch.fallback_rate)
            log_metric(
                "alignpro/rewrite_chars",
                sum(len(r.generated or "") for r in batch.results) / len(batch.results),
            )
            log_metric("alignpro/target_failures", float(self.target.stats.failures))
        return batch.rewards

    def dataset(self):
        import datasets

        answers = self.first_answers(self.prompts)  # refine mode: the queries show y0
        return datasets.Dataset.from_dict(
            {
                "prompt": [kl_optimum.query(self.prompter, x, self.mode, answers) for x in self.prompts],
                "original": self.prompts,
            }
        )

    def train(self) -> Prompter:
        cfg = self.config
        seed_stage(cfg)  # a new LoRA is initialised before the Trainer seeds anything
        model, peft_config = self.policy()
        self.prompter.tokenizer.padding_side = "left"

        def alignpro_reward(
            prompts, completions, original, **kw
        ) -> list[float | None]:  # name shows in TRL logs
            return list(self.reward_fn(prompts, completions, original, **kw))

        self.trainer = _grpo_trainer_class()(
            model=model,
            reward_funcs=[alignpro_reward],
            args=cfg,
            train_dataset=self.dataset(),
            processing_class=self.prompter.tokenizer,
            peft_config=peft_config,
            callbacks=[self.step_times, metrics_callback(cfg, "rl"), *self.callbacks],
            step_times=self.step_times,
        )
        self.trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
        policy = self.trainer.model
        if "ref" in getattr(policy, "peft_config", {}):
            policy.delete_adapter("ref")  # the artifact holds the trained adapter only
        policy.eval()
        self.prompter.model = policy
        history = [h for h in self.trainer.state.log_history if "reward" in h]
        self.finish(
            self.trainer.state.global_step,
            history[0]["reward"] if history else None,
            history[-1]["reward"] if history else None,
            self.target_counts(),
            save=self.trainer.is_world_process_zero(),  # one writer under `accelerate launch`
        )
        return self.prompter

    def target_counts(self) -> dict[str, int]:
        """The target's call, cache-hit and failure counts summed over the processes, and how many there were.

        Under `accelerate launch` each process asks its own target (and cache) for its share of the rewrites.
        A collective: every process calls it.
        """
        stats = self.target.stats
        accelerator = self.trainer.accelerator
        local = torch.tensor([stats.calls, stats.cache_hits, stats.failures], device=accelerator.device)
        calls, hits, failures = accelerator.reduce(local, reduction="sum").tolist()
        return {
            "processes": accelerator.num_processes,
            "target_calls": calls,
            "target_cache_hits": hits,
            "target_failures": failures,
        }


def train_rl(config: AlignProRLConfig | KLOptimumConfig, **kwargs: Any) -> Prompter:
    """The RL stage with the trainer paired with ``config``: GRPO, or kl-optimum for a ``KLOptimumConfig``."""
    from trainers.kl_optimum_trainer import KLOptimumTrainer

    os.makedirs(str(config.output_dir), exist_ok=True)
    if isinstance(config, KLOptimumConfig):
        return KLOptimumTrainer(config, **kwargs).train()
    return AlignProRLTrainer(config, **kwargs).train()
