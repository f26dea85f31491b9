"""Reward stage: train r(x, y) on preference pairs with TRL's RewardTrainer; report held-out accuracy."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignpro_plugins.data import PreferencePair, load_preferences, load_prompts, split_by_prompt
from alignpro_plugins.models import resolve_model
from alignpro_plugins.rewards import REWARD_MANIFEST, RewardModel, encode_pairs, prompt_digest
from trainers.common import count_trainable, metrics_callback, resume_checkpoint, seed_stage
from trainers.reward_config import AlignProRewardConfig

logger = logging.getLogger(__name__)


def prompt_shard_of(prompt: str, num_shards: int) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % num_shards


def _normalized(prompt: str) -> str:
    return " ".join(prompt.split())


def pairwise_accuracy(reward: RewardModel, pairs: Sequence[PreferencePair]) -> float:
    if not pairs:
        return float("nan")
    prompts = [p.prompt for p in pairs]
    chosen = reward(prompts, [p.chosen for p in pairs])
    rejected = reward(prompts, [p.rejected for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


class AlignProRewardTrainer:
    """Train a reward model and write it as a self-describing folder (model + ``alignpro_reward.json``)."""

    def __init__(
        self, config: AlignProRewardConfig, *, pairs: Sequence[PreferencePair] | None = None
    ) -> None:
        self.config = config
        self.pairs = list(pairs) if pairs is not None else self._load_pairs()
        if not self.pairs:
            raise ValueError("no preference pairs: set preference_data (files or hub ids) or pass pairs=...")
        self.n_excluded_pairs = self._exclude(config)
        if config.prompt_shard is not None:
            self.pairs = [
                p
                for p in self.pairs
                if prompt_shard_of(p.prompt, config.num_prompt_shards) == config.prompt_shard
            ]
        self.train_pairs, self.eval_pairs = split_by_prompt(
            self.pairs, lambda p: p.prompt, eval_fraction=config.eval_fraction, seed=config.split_seed
        )

    def _exclude(self, config: AlignProRewardConfig) -> int:
        """Drop every pair whose prompt is in exclude_prompt_files (whitespace-insensitive); returns how many."""
        if not config.exclude_prompt_files:
            return 0
        excluded = {
            _normalized(x)
            for source in config.exclude_prompt_files
            for x in load_prompts(
                source, field=config.exclude_prompt_field, context_field=config.exclude_context_field
            )
        }
        before = len(self.pairs)
        self.pairs = [p for p in self.pairs if _normalized(p.prompt) not in excluded]
        logger.info(
            "reward stage: %d pairs dropped (prompt in exclude_prompt_files)", before - len(self.pairs)
        )
        if not self.pairs:
            raise ValueError(
                "every preference pair's prompt is in exclude_prompt_files: nothing left to train on"
            )
        return before - len(self.pairs)

    def _load_pairs(self) -> list[PreferencePair]:
        cfg = self.config
        pairs: list[PreferencePair] = []
        for source in cfg.preference_data:
            pairs += load_preferences(
                source,
                prompt_field=cfg.prompt_field,
                chosen_field=cfg.chosen_field,
                rejected_field=cfg.rejected_field,
                data_dir=cfg.data_dir,
                limit=cfg.max_pairs_per_source,
            )
        return pairs

    def _dataset(self, tokenizer: Any, pairs: Sequence[PreferencePair]):
        import datasets

        cfg = self.config
        kw = {"max_length": int(cfg.max_length or 256), "max_prompt_length": cfg.max_prompt_length}
        prompts = [p.prompt for p in pairs]
        # Pre-tokenized columns: the trainer and the scorer then encode (x, y) identically.
        return datasets.Dataset.from_dict(
            {
                "chosen_ids": encode_pairs(tokenizer, prompts, [p.chosen for p in pairs], **kw),
                "rejected_ids": encode_pairs(tokenizer, prompts, [p.rejected for p in pairs], **kw),
            }
        )

    def train(self) -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from trl import RewardTrainer

        cfg = self.config
        seed_stage(cfg)  # the score head is initialised here, before the Trainer seeds anything
        path = resolve_model(cfg.base_model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self._freeze(model, cfg.freeze_layers)
        logger.info(
            "reward stage: %d train / %d held-out pairs, %d trainable parameters",
            len(self.train_pairs),
            len(self.eval_pairs),
            count_trainable(model),
        )
        trainer = RewardTrainer(
            model=model,
            args=cfg,
            train_dataset=self._dataset(tokenizer, self.train_pairs),
            processing_class=tokenizer,
            callbacks=[metrics_callback(cfg, "reward")],
        )
        trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
        out = Path(str(cfg.output_dir))
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        scorer = RewardModel(str(out), max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        accuracy = pairwise_accuracy(scorer, self.eval_pairs)
        train_acc = pairwise_accuracy(scorer, self.train_pairs[: len(self.eval_pairs) or 200])
        meta = {
            "kind": "alignpro-reward-model",
            "base_model": cfg.base_model,
            "data": list(cfg.preference_data),
            "prompt_shard": cfg.prompt_shard,
            "num_prompt_shards": cfg.num_prompt_shards,
            "split_seed": cfg.split_seed,
            "exclude_prompt_files": list(cfg.exclude_prompt_files),
            "n_excluded_pairs": self.n_excluded_pairs,
            "n_train_pairs": len(self.train_pairs),
            "n_eval_pairs": len(self.eval_pairs),
            "heldout_pairwise_accuracy": accuracy,
            "train_pairwise_accuracy_sample": train_acc,
            "steps": trainer.state.global_step,
            "max_length": cfg.max_length,
            "max_prompt_length": cfg.max_prompt_length,
            # Digests, not text: lets anyone check two reward models saw disjoint prompts.
            "train_prompt_digests": sorted({prompt_digest(p.prompt) for p in self.train_pairs}),
        }
        (out / REWARD_MANIFEST).write_text(json.dumps(meta, indent=1))
        logger.info("reward model saved to %s; held-out pairwise accuracy %.3f", out, accuracy)
        scorer.meta = meta
        return scorer

    @staticmethod
    def _freeze(model: Any, n_layers: int) -> None:
        """Freeze the input embeddings and the lowest ``n_layers`` transformer layers."""
        if n_layers <= 0:
            return
        base = getattr(model, model.base_model_prefix, model)
        # encoder.layer: BERT-style encoders (the default base); layers / h: Llama- and GPT-2-style decoders.
        stacks = (
            getattr(getattr(base, "encoder", None), "layer", None),
            getattr(base, "layers", None),
            getattr(base, "h", None),
        )
        layers = next((s for s in stacks if isinstance(s, torch.nn.ModuleList)), None)
        # BERT-style `embeddings` also holds the position / type embeddings; elsewhere the token embeddings.
        embeddings = getattr(base, "embeddings", None)
        if not isinstance(embeddings, torch.nn.Module):
            try:
                embeddings = model.get_input_embeddings()
            except NotImplementedError:
                embeddings = None
        if layers is None or embeddings is None:
            raise ValueError(
                f"freeze_layers={n_layers}: found no input embeddings and layer stack to freeze in "
                f"{type(model).__name__} (known: encoder.layer, layers, h); set freeze_layers=0 to train it whole"
            )
        if n_layers > len(layers):
            raise ValueError(
                f"freeze_layers={n_layers}, but {type(model).__name__} has {len(layers)} layers: use 0..{len(layers)}"
            )
        for module in (embeddings, *list(layers)[:n_layers]):
            for p in module.parameters():
                p.requires_grad = False
        if count_trainable(model) == 0:
            raise ValueError(
                f"freeze_layers={n_layers} left nothing trainable in {type(model).__name__}; lower freeze_layers"
            )


def train_reward(config: AlignProRewardConfig) -> RewardModel:
    os.makedirs(str(config.output_dir), exist_ok=True)
    return AlignProRewardTrainer(config).train()
