"""Reward stage: train r(x, y) on preference pairs with TRL's RewardTrainer, or an ensemble of K; report held-out
accuracy on all pairs and on length-matched ones; optionally fit a length penalty."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignpro_plugins.data import PreferencePair, load_preferences, load_prompts, split_by_prompt
from alignpro_plugins.models import resolve_model
from alignpro_plugins.reward_ensemble import RewardEnsemble
from alignpro_plugins.rewards import (
    ENSEMBLE_KIND,
    REWARD_MANIFEST,
    RewardFunction,
    RewardModel,
    encode_pairs,
    load_reward,
    prompt_digest,
    read_reward_manifest,
)
from trainers.common import count_trainable, lora_config, metrics_callback, resume_checkpoint, seed_stage
from trainers.reward_batches import DedupPreferenceCollator, PairRewardTrainer
from trainers.reward_config import AlignProRewardConfig
from trainers.reward_metrics import (
    ScoredPairs,
    answer_token_counts,
    fit_length_penalty,
    length_penalty_sample,
    pairwise_metrics,
    score_pairs,
)

logger = logging.getLogger(__name__)

MODEL_KIND = "alignpro-reward-model"


def prompt_shard_of(prompt: str, num_shards: int) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % num_shards


def _normalized(prompt: str) -> str:
    return " ".join(prompt.split())


def heldout_entries(metrics: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    """The manifest's held-out keys for one kind of score (``suffix`` "_raw": the scores before length control)."""
    return {
        f"heldout_pairwise_accuracy{suffix}": metrics["pairwise_accuracy"],
        f"heldout_pairwise_accuracy_length_matched{suffix}": metrics["pairwise_accuracy_length_matched"],
        f"heldout_longer_preferred_rate{suffix}": metrics["longer_preferred_rate"],
    }


class AlignProRewardTrainer:
    """Train a reward model (or ``ensemble_size`` of them) and write it as a self-describing folder (model +
    ``alignpro_reward.json``; an ensemble: ``member-*`` folders + an ensemble manifest)."""

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
        if config.max_eval_pairs is not None and len(self.eval_pairs) > config.max_eval_pairs:
            keep = random.Random(config.split_seed).sample(range(len(self.eval_pairs)), config.max_eval_pairs)
            self.eval_pairs = [self.eval_pairs[i] for i in sorted(keep)]

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

    def train(self) -> RewardFunction:
        if self.config.ensemble_size > 1:
            return self._train_ensemble()
        return self._train_model(self.config, self.train_pairs)

    # ------------------------------------------------------------------------------------------ one model
    def _train_model(
        self, cfg: AlignProRewardConfig, train_pairs: Sequence[PreferencePair], member: dict | None = None
    ) -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        out = Path(str(cfg.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        # The manifest is written last: a folder without one is an unfinished artifact, never a stale one.
        (out / REWARD_MANIFEST).unlink(missing_ok=True)
        seed_stage(cfg)  # the score head (and a LoRA) are initialised here, before the Trainer seeds anything
        path = resolve_model(cfg.base_model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        self._set_pad_token(tokenizer, model, cfg.pad_token)
        peft_config = self._lora(model, cfg) if cfg.use_lora else None
        if peft_config is None:
            self._freeze(model, cfg.freeze_layers)
        dataset, lengths = self._dataset(tokenizer, train_pairs)
        trainer = PairRewardTrainer(
            model=model,
            args=cfg,
            train_dataset=dataset,
            processing_class=tokenizer,
            # Deduplicating a batch is exact only when identical inputs score identically: without dropout.
            data_collator=(
                DedupPreferenceCollator(tokenizer.pad_token_id, cfg.pad_to_multiple_of)  # type: ignore[arg-type]
                if cfg.disable_dropout
                else None
            ),
            callbacks=[metrics_callback(cfg, "reward")],
            peft_config=peft_config,
            prompt_groups=[p.prompt for p in train_pairs] if cfg.group_by_prompt else None,
            lengths=lengths,
        )
        trained: Any = trainer.model  # the PeftModel when use_lora
        logger.info(
            "reward stage: %d train / %d held-out pairs, %d trainable parameters",
            len(train_pairs),
            len(self.eval_pairs),
            count_trainable(trained),
        )
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
        if peft_config is not None:
            # Merged: the artifact is a plain sequence-classification folder that loads without peft.
            trained.merge_and_unload().save_pretrained(str(out))
        else:
            trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        meta = {
            "kind": MODEL_KIND,
            "base_model": cfg.base_model,
            "data": list(cfg.preference_data),
            "prompt_shard": cfg.prompt_shard,
            "num_prompt_shards": cfg.num_prompt_shards,
            "split_seed": cfg.split_seed,
            "seed": cfg.seed,
            "exclude_prompt_files": list(cfg.exclude_prompt_files),
            "n_excluded_pairs": self.n_excluded_pairs,
            "n_train_pairs": len(train_pairs),
            "n_eval_pairs": len(self.eval_pairs),
            **self._evaluate(out, cfg, train_pairs),
            "steps": trainer.state.global_step,
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
            "max_length": cfg.max_length,
            "max_prompt_length": cfg.max_prompt_length,
            "freeze_layers": cfg.freeze_layers,
            "group_by_prompt": cfg.group_by_prompt,
            "lora": _lora_record(peft_config),
            **({"ensemble_member": member} if member else {}),
            # Digests, not text: lets anyone check two reward models saw disjoint prompts.
            "train_prompt_digests": sorted({prompt_digest(p.prompt) for p in train_pairs}),
        }
        _write_manifest(out, meta)
        logger.info(
            "reward model saved to %s; held-out pairwise accuracy %.3f (length-matched %.3f)",
            out,
            meta["heldout_pairwise_accuracy"],
            meta["heldout_pairwise_accuracy_length_matched"],
        )
        return RewardModel(str(out))  # re-read: it scores as its manifest says (length control included)

    def _evaluate(
        self, out: Path, cfg: AlignProRewardConfig, train_pairs: Sequence[PreferencePair]
    ) -> dict[str, Any]:
        """Held-out metrics (and, for length_control='penalty', the fitted β and the raw scores' metrics)."""
        # No manifest is written yet, so these are the raw scores; each pair set is scored once.
        raw = RewardModel(str(out), max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        sample = length_penalty_sample(train_pairs, cfg.seed, cfg.max_eval_pairs)
        heldout, train = score_pairs(raw, self.eval_pairs), score_pairs(raw, sample)
        entries: dict[str, Any] = {
            "length_matched_tolerance": cfg.length_matched_tolerance,
            "length_control": cfg.length_control,
        }
        if cfg.length_control == "penalty":
            tokens = (
                answer_token_counts(raw.tokenizer, [p.chosen for p in sample]),
                answer_token_counts(raw.tokenizer, [p.rejected for p in sample]),
            )
            beta = fit_length_penalty(train, tokens)
            entries |= {
                "length_penalty_per_token": beta,
                "length_penalty_fit_answers": 2 * len(sample),
            }
            entries |= heldout_entries(self._metrics(heldout, cfg), "_raw")
            # What RewardModel scores once the manifest carries the penalty: raw − β·(answer tokens).
            heldout = _penalized(raw.tokenizer, beta, self.eval_pairs, heldout)
            train = _penalized(raw.tokenizer, beta, sample, train)
        return self._report(heldout, train, sample, cfg) | entries

    def _metrics(self, heldout: ScoredPairs, cfg: AlignProRewardConfig) -> dict[str, Any]:
        return pairwise_metrics(self.eval_pairs, *heldout, tolerance=cfg.length_matched_tolerance)

    def _report(
        self,
        heldout: ScoredPairs,
        train: ScoredPairs,
        train_sample: Sequence[PreferencePair],
        cfg: AlignProRewardConfig,
    ) -> dict[str, Any]:
        """The manifest's held-out entries for the scores a reward gives by default, and a training sample's."""
        metrics = self._metrics(heldout, cfg)
        return {
            **heldout_entries(metrics),
            "n_eval_pairs_length_matched": metrics["n_pairs_length_matched"],
            "heldout_labels_longer_preferred_rate": metrics["labels_longer_preferred_rate"],
            "train_pairwise_accuracy_sample": pairwise_metrics(train_sample, *train)["pairwise_accuracy"],
        }

    @staticmethod
    def _set_pad_token(tokenizer: Any, model: Any, configured: str | None) -> None:
        """Pad with TRL's (deprecated) pad_token option, else the tokenizer's pad token, else its eos (decoders
        often ship none), as TRL's RewardTrainer will: the model pools the last token before the padding, the
        collator pads with it, and the saved tokenizer makes the scorer (RewardModel) pad the same way."""
        if configured is not None:
            tokenizer.pad_token = configured
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"{type(tokenizer).__name__} has neither a pad nor an eos token: set tokenizer.pad_token and "
                    "save the tokenizer with the base model"
                )
            tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id

    def _dataset(self, tokenizer: Any, pairs: Sequence[PreferencePair]):
        """Pre-tokenized columns (the trainer and the scorer encode (x, y) identically) and each pair's width."""
        import datasets

        cfg = self.config
        kw = {"max_length": int(cfg.max_length or 256), "max_prompt_length": cfg.max_prompt_length}
        prompts = [p.prompt for p in pairs]
        chosen = encode_pairs(tokenizer, prompts, [p.chosen for p in pairs], **kw)
        rejected = encode_pairs(tokenizer, prompts, [p.rejected for p in pairs], **kw)
        lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
        return datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected}), lengths

    # ------------------------------------------------------------------------------------------ layers, LoRA
    @staticmethod
    def _layer_stack(model: Any) -> torch.nn.ModuleList | None:
        base = getattr(model, model.base_model_prefix, model)
        # encoder.layer: BERT-style encoders (the default base); layers / h: Llama- and GPT-2-style decoders.
        stacks = (
            getattr(getattr(base, "encoder", None), "layer", None),
            getattr(base, "layers", None),
            getattr(base, "h", None),
        )
        return next((s for s in stacks if isinstance(s, torch.nn.ModuleList)), None)

    @classmethod
    def _freeze(cls, model: Any, n_layers: int) -> None:
        """Freeze the input embeddings and the lowest ``n_layers`` transformer layers."""
        if n_layers <= 0:
            return
        base = getattr(model, model.base_model_prefix, model)
        layers = cls._layer_stack(model)
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

    @classmethod
    def _lora(cls, model: Any, cfg: AlignProRewardConfig):
        """PEFT's SEQ_CLS LoRA (the score head stays trainable); with freeze_layers, on the layers above only."""
        targets: list[str] | str = cfg.lora_target_modules
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        if targets != ["all-linear"] and not set(targets) & set(linear):
            raise ValueError(
                f"lora_target_modules {targets} name no linear layer of {type(model).__name__}; its linear "
                f"layers: {linear} (or all-linear)"
            )
        lora = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, task_type="SEQ_CLS")
        if cfg.freeze_layers > 0:
            layers = cls._layer_stack(model)
            if layers is None or cfg.freeze_layers >= len(layers):
                count = "no layer stack" if layers is None else f"{len(layers)} layers"
                raise ValueError(
                    f"freeze_layers={cfg.freeze_layers} with use_lora leaves no layer for the LoRA in "
                    f"{type(model).__name__} ({count}): use fewer frozen layers"
                )
            lora = dataclasses.replace(lora, layers_to_transform=list(range(cfg.freeze_layers, len(layers))))
        return lora

    # ------------------------------------------------------------------------------------------ ensemble
    def member_train_pairs(self) -> list[list[PreferencePair]]:
        """Each member's training pairs. 'shards': the training prompts, shuffled (seed), dealt round-robin into
        K disjoint shards; 'bootstrap': K resamples (with replacement) of all training pairs, seeds seed..seed+K-1.
        The held-out prompts are the same for every member."""
        cfg = self.config
        k = cfg.ensemble_size
        if cfg.ensemble_split == "bootstrap":
            return [
                random.Random(cfg.seed + j).choices(self.train_pairs, k=len(self.train_pairs))
                for j in range(k)
            ]
        prompts = sorted({p.prompt for p in self.train_pairs})
        if len(prompts) < k:
            raise ValueError(
                f"ensemble_size={k} with ensemble_split='shards' needs at least {k} training prompts, got "
                f"{len(prompts)}: use ensemble_split='bootstrap' or fewer members"
            )
        random.Random(cfg.seed).shuffle(prompts)
        shard = {x: i % k for i, x in enumerate(prompts)}
        return [[p for p in self.train_pairs if shard[p.prompt] == j] for j in range(k)]

    def _train_ensemble(self) -> RewardFunction:
        cfg = self.config
        out = Path(str(cfg.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / REWARD_MANIFEST).unlink(missing_ok=True)
        names = [f"member-{j}" for j in range(cfg.ensemble_size)]
        for j, (name, pairs) in enumerate(zip(names, self.member_train_pairs(), strict=True)):
            member_cfg = dataclasses.replace(
                cfg, output_dir=str(out / name), seed=cfg.seed + j, ensemble_size=1
            )
            member = {"index": j, "size": cfg.ensemble_size, "split": cfg.ensemble_split}
            if cfg.resume and self._member_done(out / name, member_cfg, pairs, member):
                logger.info("reward ensemble: %s is complete, not retrained", name)
                continue
            self._train_model(member_cfg, pairs, member)
        rule: dict[str, Any] = {
            "kind": ENSEMBLE_KIND,
            "members": names,
            "combine": cfg.ensemble_combine,
            "combine_k": cfg.ensemble_combine_k,
        }
        _write_manifest(out, rule)  # what load_reward needs to open the folder; the metrics follow
        # Members fit their scores only up to an offset: the rules combine z-scores, each member's mean and std
        # fitted on held-out answers (which no member trained on; no labels used), as load_reward expects; with
        # length control, for the raw scores too (load_reward(..., length_control=False)).
        scale_pairs = length_penalty_sample(self.eval_pairs or self.train_pairs, cfg.seed, cfg.max_eval_pairs)
        prompts = [p.prompt for p in scale_pairs for _ in range(2)]
        answers = [a for p in scale_pairs for a in (p.chosen, p.rejected)]
        rule["member_scale"] = RewardEnsemble.from_pretrained(out).fit_member_scale(prompts, answers)
        if cfg.length_control == "penalty":
            raw_members = RewardEnsemble.from_pretrained(out, length_control=False)
            rule["member_scale_raw"] = raw_members.fit_member_scale(prompts, answers)
        _write_manifest(out, rule)
        ensemble = load_reward(str(out))
        sample = length_penalty_sample(self.train_pairs, cfg.seed, cfg.max_eval_pairs)
        heldout, train = score_pairs(ensemble, self.eval_pairs), score_pairs(ensemble, sample)
        entries: dict[str, Any] = {
            "length_matched_tolerance": cfg.length_matched_tolerance,
            "length_control": cfg.length_control,
        }
        if cfg.length_control == "penalty":
            raw = load_reward(str(out), length_control=False)
            entries |= heldout_entries(self._metrics(score_pairs(raw, self.eval_pairs), cfg), "_raw")
        member_metrics = [
            {"member": name, **_member_summary(read_reward_manifest(out / name))} for name in names
        ]
        meta = {
            **rule,
            **self._report(heldout, train, sample, cfg),
            **entries,
            "base_model": cfg.base_model,
            "data": list(cfg.preference_data),
            "ensemble_split": cfg.ensemble_split,
            "prompt_shard": cfg.prompt_shard,
            "num_prompt_shards": cfg.num_prompt_shards,
            "split_seed": cfg.split_seed,
            "exclude_prompt_files": list(cfg.exclude_prompt_files),
            "n_excluded_pairs": self.n_excluded_pairs,
            "n_train_pairs": len(self.train_pairs),
            "n_eval_pairs": len(self.eval_pairs),
            "train_seconds": round(sum(m["train_seconds"] for m in member_metrics), 1),
            "member_metrics": member_metrics,
            # The union of the members' (as for one model): what the ensemble has seen.
            "train_prompt_digests": sorted({prompt_digest(p.prompt) for p in self.train_pairs}),
        }
        _write_manifest(out, meta)
        logger.info(
            "reward ensemble of %d saved to %s; held-out pairwise accuracy %.3f (members %s)",
            len(names),
            out,
            meta["heldout_pairwise_accuracy"],
            ", ".join(f"{m['heldout_pairwise_accuracy']:.3f}" for m in member_metrics),
        )
        return load_reward(str(out))

    def _member_done(
        self, folder: Path, cfg: AlignProRewardConfig, pairs: Sequence[PreferencePair], member: dict
    ) -> bool:
        """True when ``folder`` holds this member, complete; an artifact of another member is an error."""
        meta = read_reward_manifest(folder)
        if meta.get("kind") != MODEL_KIND:
            return False
        expected = {
            "ensemble_member": member,
            "seed": cfg.seed,
            "n_train_pairs": len(pairs),
            "train_prompt_digests": sorted({prompt_digest(p.prompt) for p in pairs}),
            "n_eval_pairs": len(self.eval_pairs),
        }
        differs = [key for key, value in expected.items() if meta.get(key) != value]
        if differs:
            raise ValueError(
                f"{folder} holds a reward model whose {', '.join(differs)} differ from member "
                f"{member['index']} of this ensemble: delete the folder to retrain it, or use another output_dir"
            )
        return True


def _penalized(
    tokenizer: Any, beta: float, pairs: Sequence[PreferencePair], scores: ScoredPairs
) -> ScoredPairs:
    chosen = answer_token_counts(tokenizer, [p.chosen for p in pairs])
    rejected = answer_token_counts(tokenizer, [p.rejected for p in pairs])
    return (
        [s - beta * n for s, n in zip(scores[0], chosen, strict=True)],
        [s - beta * n for s, n in zip(scores[1], rejected, strict=True)],
    )


def _member_summary(meta: dict[str, Any]) -> dict[str, Any]:
    keys = [k for k in meta if k.startswith("heldout_")] + ["n_train_pairs", "seed", "train_seconds"]
    keys += ["length_penalty_per_token"] if "length_penalty_per_token" in meta else []
    return {k: meta[k] for k in keys if k in meta}


def _lora_record(peft_config: Any) -> dict[str, Any] | None:
    if peft_config is None:
        return None
    targets = peft_config.target_modules
    return {
        "r": peft_config.r,
        "alpha": peft_config.lora_alpha,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "layers_to_transform": peft_config.layers_to_transform,
        "merged": True,
    }


def _write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    """Whole or not at all: a kill mid-write leaves the previous manifest (or none), never half of one."""
    tmp = folder / f".{REWARD_MANIFEST}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / REWARD_MANIFEST)


def train_reward(config: AlignProRewardConfig) -> RewardFunction:
    os.makedirs(str(config.output_dir), exist_ok=True)
    return AlignProRewardTrainer(config).train()
