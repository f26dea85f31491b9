"""RLHF oracle (configuration iii): the target itself fine-tuned by RL (GRPO or kl-optimum) on r(x, y), as LoRA."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignpro_plugins.engine import load_causal_lm
from alignpro_plugins.rewards import as_reward
from trainers import kl_optimum
from trainers.common import (
    check_reward_source,
    lora_config,
    metrics_callback,
    resume_checkpoint,
    round_seed,
    seed_stage,
    training_prompts,
)
from trainers.oracle_config import KLOptimumOracleConfig, RLHFOracleConfig

logger = logging.getLogger(__name__)


class OracleTrainer:
    """Base of the RLHF oracle's trainers: the target, its training prompts and reward, the oracle's record."""

    algorithm: str

    def __init__(
        self,
        config: RLHFOracleConfig | KLOptimumOracleConfig,
        *,
        prompts: Sequence[str] | None = None,
        reward: Any | None = None,
    ):
        self.config = config
        check_reward_source("the RLHF oracle", reward, config.reward_model)
        self.prompts = training_prompts(config, prompts, "the RLHF oracle")
        self.check_prompts()
        self.reward = as_reward(reward if reward is not None else config.reward_model)
        self.model, self.tokenizer, _ = load_causal_lm(config.target)
        self.tokenizer.padding_side = "left"

    def check_prompts(self) -> None:
        """Algorithm-specific checks of ``self.prompts``, before the model loads."""

    def train(self) -> str:
        seed_stage(self.config)  # the LoRA is initialised before the Trainer seeds anything
        steps = self.train_steps()
        cfg = self.config
        (Path(str(cfg.output_dir)) / "alignpro_oracle.json").write_text(
            json.dumps(
                {
                    "kind": "rlhf-oracle-adapter",
                    "target": cfg.target,
                    "reward_model": cfg.reward_model,
                    "algorithm": self.algorithm,
                    "steps": steps,
                    "prompts": len(self.prompts),
                    "beta": cfg.beta,
                },
                indent=1,
            )
        )
        return str(cfg.output_dir)

    def train_steps(self) -> int:
        """Train the LoRA, save it in ``output_dir``; the number of optimiser steps."""
        raise NotImplementedError

    def lora(self) -> Any:
        cfg = self.config
        return lora_config(cfg.lora_r, cfg.lora_alpha, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])


class KLOptimumOracleTrainer(OracleTrainer):
    """The oracle by kl-optimum: K sampled answers per prompt, resampled by softmax(z/λ) and distilled."""

    algorithm = "kl-optimum"
    config: KLOptimumOracleConfig

    def check_prompts(self) -> None:
        cfg = self.config
        kl_optimum.check_round_prompts(self.prompts, cfg.prompts_per_round, cfg.rounds, "the RLHF oracle")

    def train_steps(self) -> int:
        from peft import get_peft_model

        from alignpro_plugins.targets import TransformersTarget

        cfg = self.config
        out = Path(str(cfg.output_dir))
        k = int(cfg.num_generations or 4)
        model = get_peft_model(self.model, self.lora())
        steps = 0
        start = kl_optimum.resume_last_round(model, out, out / "metrics.jsonl") if cfg.resume else 0
        for r in range(start, cfg.rounds):
            # Each round from its own seed: a resumed run samples what an unbroken one would have.
            seed_stage(cfg, r)
            rng = random.Random(round_seed(cfg.seed, r))
            prompts = kl_optimum.round_prompts(self.prompts, cfg.prompts_per_round, r)
            model.eval()
            sampler = TransformersTarget(
                model,
                self.tokenizer,
                max_new_tokens=int(cfg.max_completion_length or 96),
                temperature=cfg.temperature,
                batch_size=32,
            )
            t0 = time.perf_counter()
            xs = [x for x in prompts for _ in range(k)]
            sampled = sampler.generate_ended(xs)
            # The target's greedy answer (how it is evaluated and deployed) joins each group, so a round
            # distils a sample only where it beats that answer.
            greedy = (
                TransformersTarget(
                    model, self.tokenizer, max_new_tokens=sampler.max_new_tokens, batch_size=32
                ).generate_ended(list(prompts))
                if cfg.include_greedy
                else []
            )
            g = k + bool(greedy)
            # (answer, ended): an answer cut at the cap is distilled without EOS, so the oracle does not
            # learn to stop where the training cap fell (measured: it then answered shorter than the frozen model).
            group = [a for i in range(len(prompts)) for a in sampled[i * k : (i + 1) * k] + greedy[i : i + 1]]
            answers = [a for a, _ in group]
            xs = [x for x in prompts for _ in range(g)]
            t1 = time.perf_counter()
            rewards = self.reward(xs, answers)
            t2 = time.perf_counter()
            rows, kls = [], []
            greedy_draws = 0
            for i, x in enumerate(prompts):
                draws, w = kl_optimum.resample(rewards[i * g : (i + 1) * g], cfg.beta, k, rng)
                kls.append(kl_optimum.kl_to_proposal(w))
                greedy_draws += sum(j == k for j in draws) if greedy else 0
                rows += [
                    {
                        "prompt": [{"role": "user", "content": x}],
                        "completion": [{"role": "assistant", "content": answers[i * g + j]}],
                        "ended": group[i * g + j][1],
                    }
                    for j in draws
                ]
            model, stats = kl_optimum.distil_rows(
                model, self.tokenizer, rows, cfg, out / f"round-{r + 1}-sft"
            )
            steps += stats["distil_steps"]
            stats.update(
                {
                    "reward": sum(rewards) / len(rewards),
                    "kl": sum(kls) / len(kls),
                    "cut_share": sum(not row["ended"] for row in rows) / len(rows),
                    **({"greedy_share": greedy_draws / (k * len(prompts))} if greedy else {}),
                    "time/target_s": t1 - t0,
                    "time/reward_s": t2 - t1,
                }
            )
            kl_optimum.log_row(out / "metrics.jsonl", {"stage": "oracle", "step": r + 1, **stats})
            logger.info("oracle kl-optimum round %d: %s", r + 1, stats)
            kl_optimum.save_round(model, out, r + 1)  # what --resume continues from
        model.save_pretrained(str(out))
        return steps


class RLHFOracleTrainer(OracleTrainer):
    """The oracle by TRL's GRPO on the target's own chat template."""

    algorithm = "grpo"
    config: RLHFOracleConfig

    def reward_fn(
        self, prompts: list[str], completions: list[str], original: list[str], **_: Any
    ) -> list[float]:
        # Conversational data: each completion is a list of messages.
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self.reward(original, [t.strip() for t in texts])

    def train_steps(self) -> int:
        import datasets
        from trl import GRPOTrainer

        cfg = self.config
        # Conversational prompts: GRPO applies the target's own chat template, exactly as at inference.
        data = datasets.Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": x}] for x in self.prompts], "original": self.prompts}
        )

        def alignpro_reward(
            prompts, completions, original, **kw
        ) -> list[float | None]:  # name shows in TRL logs
            return list(self.reward_fn(prompts, completions, original, **kw))

        trainer = GRPOTrainer(
            model=self.model,
            reward_funcs=[alignpro_reward],
            args=cfg,
            train_dataset=data,
            processing_class=self.tokenizer,
            peft_config=self.lora(),
            callbacks=[metrics_callback(cfg, "oracle")],
        )
        trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
        trainer.save_model(str(cfg.output_dir))
        return int(trainer.state.global_step)


def train_oracle(config: RLHFOracleConfig | KLOptimumOracleConfig, **kwargs: Any) -> str:
    """The RLHF oracle with the trainer paired with ``config``: GRPO, or kl-optimum for a KLOptimumOracleConfig."""
    os.makedirs(str(config.output_dir), exist_ok=True)
    if isinstance(config, KLOptimumOracleConfig):
        return KLOptimumOracleTrainer(config, **kwargs).train()
    return RLHFOracleTrainer(config, **kwargs).train()
