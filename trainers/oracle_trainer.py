"""RLHF oracle (configuration iii): GRPO on the target model itself, rewarded by r(x, y), LoRA adapter output."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignpro_plugins.prompter import load_causal_lm
from alignpro_plugins.rewards import as_reward
from trainers.common import JsonlMetricsCallback, latest_checkpoint, lora_config, training_prompts
from trainers.oracle_config import RLHFOracleConfig


class RLHFOracleTrainer:
    def __init__(
        self, config: RLHFOracleConfig, *, prompts: Sequence[str] | None = None, reward: Any | None = None
    ):
        self.config = config
        self.prompts = training_prompts(config, prompts, "the RLHF oracle")
        self.reward = as_reward(reward if reward is not None else config.reward_model)
        self.model, self.tokenizer, _ = load_causal_lm(config.target)
        self.tokenizer.padding_side = "left"

    def reward_fn(
        self, prompts: list[str], completions: list[str], original: list[str], **_: Any
    ) -> list[float]:
        # Conversational data: each completion is a list of messages.
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self.reward(original, [t.strip() for t in texts])

    def train(self) -> str:
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
            peft_config=lora_config(
                cfg.lora_r, cfg.lora_alpha, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"]
            ),
            callbacks=[JsonlMetricsCallback(Path(str(cfg.output_dir)) / "metrics.jsonl", "oracle")],
        )
        trainer.train(resume_from_checkpoint=latest_checkpoint(str(cfg.output_dir)) if cfg.resume else None)
        trainer.save_model(str(cfg.output_dir))
        (Path(str(cfg.output_dir)) / "alignpro_oracle.json").write_text(
            json.dumps(
                {
                    "kind": "rlhf-oracle-adapter",
                    "target": cfg.target,
                    "reward_model": cfg.reward_model,
                    "steps": trainer.state.global_step,
                    "prompts": len(self.prompts),
                    "beta": cfg.beta,
                },
                indent=1,
            )
        )
        return str(cfg.output_dir)


def train_oracle(config: RLHFOracleConfig, **kwargs: Any) -> str:
    os.makedirs(str(config.output_dir), exist_ok=True)
    return RLHFOracleTrainer(config, **kwargs).train()
