"""SFT stage: LoRA SFT of the prompter.

Targets come from (prompt, improved prompt) pairs, or, when there are none, from a best-of-K bootstrap: K
sampled rewrites of the untrained prompter (plus fixed guidance templates and 'no change'), each scored by
the reward of the frozen target's answer against the original prompt; the best becomes the SFT target.

Refine mode bootstraps a refinement prompter the same way, with the frozen target's first answer y₀ = π_F(x)
in every query: the candidates are refinements sampled from (x, y₀), the guidance templates, a prompt-only
prompter's guidance (``prompt_only_prompter``) and 'no change' (whose answer is y₀ itself); each x'' is answered
and scored r(x, π_F(x'')), and the prompter learns (x, y₀) → the best.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alignpro_plugins.data import load_prompt_pairs, load_prompts
from alignpro_plugins.manifest import GenerationDefaults, appends_guidance
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.rewards import as_reward
from trainers import kl_optimum
from trainers.common import (
    build_target,
    check_reward_source,
    count_trainable,
    lora_config,
    metrics_callback,
    resume_checkpoint,
    seed_stage,
    target_cache_path,
    wrap_target,
)
from trainers.scoring import RewriteScorer
from trainers.sft_config import REFINE_NEEDS_BOOTSTRAP, AlignProSFTConfig

logger = logging.getLogger(__name__)

NO_CHANGE = ""  # augment mode: an empty completion means "leave the prompt as it is"
SFT_NEEDS_DATA = (
    "SFT needs pairs_data (prompt pairs) or prompts_data (bootstrap prompts, scored with reward_model), or "
    "pairs= / prompts= passed to the trainer"
)


class AlignProSFTTrainer:
    def __init__(
        self,
        config: AlignProSFTConfig,
        *,
        prompter: Prompter | None = None,
        pairs: Sequence[tuple[str, str]] | None = None,
        prompts: Sequence[str] | None = None,
        target: Any | None = None,
        reward: Any | None = None,
    ) -> None:
        self.config = config
        if pairs is None and not config.pairs_data:
            # Bootstrap: check its inputs before the prompter loads.
            if prompts is None and not config.prompts_data:
                raise ValueError(SFT_NEEDS_DATA)
            check_reward_source("The SFT bootstrap (no pairs_data)", reward, config.reward_model)
        if config.templates_from:
            from trainers.guidance_search_trainer import GuidanceSearchResult

            searched = GuidanceSearchResult.load(config.templates_from).ranked(config.templates_from_top)
            config.templates = list(dict.fromkeys([*searched, *config.templates]))
        if config.mode == "refine" and pairs is not None:
            raise ValueError(REFINE_NEEDS_BOOTSTRAP)
        self.prompter = prompter or Prompter.from_base(config.base_model, mode=config.mode, similarity=None)
        self.prompter.manifest = self.prompter.manifest.for_mode(config.mode)
        if config.refine_answer_tokens is not None:
            self.prompter.manifest.refine_answer_tokens = config.refine_answer_tokens
        self._first: dict[str, str] = {}  # refine mode: x -> the frozen target's first answer y0
        self._pairs = list(pairs) if pairs is not None else None
        self._prompts = list(prompts) if prompts is not None else None
        self._target = target
        self._reward = reward
        self.bootstrap_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ targets
    def sft_pairs(self) -> list[tuple[str, str]]:
        cfg = self.config
        if self._pairs is not None:
            return self._pairs[: cfg.max_pairs] if cfg.max_pairs else self._pairs
        if cfg.pairs_data:
            return load_prompt_pairs(
                cfg.pairs_data,
                prompt_field=cfg.prompt_field,
                target_field=cfg.target_field,
                context_field=cfg.context_field,
                limit=cfg.max_pairs,
            )
        prompts = self._prompts
        if prompts is None:
            if not cfg.prompts_data:
                raise ValueError(SFT_NEEDS_DATA)
            prompts = load_prompts(cfg.prompts_data, field=cfg.prompt_field, context_field=cfg.context_field)
        prompts = list(dict.fromkeys(prompts))
        if cfg.max_pairs:
            prompts = prompts[: cfg.max_pairs]
        return self.bootstrap(prompts)

    def query(self, x: str) -> str:
        """The prompter's query for x in the trained mode (refine: it shows x's first answer)."""
        return kl_optimum.query(self.prompter, x, self.config.mode, self._first or None)

    def candidates(self, prompts: Sequence[str]) -> list[list[tuple[str, bool]]]:
        """Per prompt: (generation, hit_limit) candidates — sampled rewrites, the prompt-only prompter's guidance
        (refine mode), templates, 'no change'."""
        cfg = self.config
        sampled: list[list[tuple[str, bool]]] = [[] for _ in prompts]
        if cfg.num_candidates:
            settings = GenerationDefaults(
                max_new_tokens=cfg.prompter_max_new_tokens,
                do_sample=True,
                temperature=cfg.candidate_temperature,
                top_p=0.95,
            )
            bs = 8
            seed_stage(cfg)  # the same samples whether train() or a direct sft_pairs() call gets here
            for s in tqdm(range(0, len(prompts), bs), desc="bootstrap: sampling rewrites"):
                chunk = prompts[s : s + bs]
                queries = [self.query(p) for p in chunk]
                rows = self.prompter.engine.generate(queries, settings, cfg.num_candidates)
                for i, row in enumerate(rows):
                    sampled[s + i] = [(g.text, not g.ended) for g in row]
        prompt_only = self.prompt_only_guidance(prompts)
        out = []
        for i, row in enumerate(sampled):
            cands = list(row)
            if prompt_only is not None:
                cands.append((prompt_only[i], False))
            if appends_guidance(cfg.mode) and cfg.include_templates:
                cands += [(t, False) for t in cfg.templates]
            if cfg.include_no_change:
                cands.append((NO_CHANGE, False))
            out.append(cands)
        return out

    def prompt_only_guidance(self, prompts: Sequence[str]) -> list[str] | None:
        """The guidance ``prompt_only_prompter`` appends to each prompt ('' where it keeps x), or None if unset."""
        path = self.config.prompt_only_prompter
        if path is None:
            return None
        prompt_only = Prompter.from_pretrained(path, similarity=None)
        try:
            if prompt_only.manifest.mode != "augment":
                raise ValueError(
                    f"prompt_only_prompter {path} is a {prompt_only.manifest.mode!r} prompter; a refinement is "
                    "guidance appended to x, so only an augment-mode prompter's guidance can be a candidate"
                )
            results = prompt_only.rewrite_results(list(prompts))
        finally:
            prompt_only.close()
        return [(r.generated or NO_CHANGE) if r.rewritten else NO_CHANGE for r in results]

    def bootstrap(self, prompts: Sequence[str]) -> list[tuple[str, str]]:
        cfg = self.config
        target = (
            wrap_target(self._target, target_cache_path(str(cfg.output_dir)))
            if self._target is not None
            else build_target(cfg, str(cfg.output_dir))
        )
        reward = as_reward(self._reward if self._reward is not None else cfg.reward_model)
        scorer = RewriteScorer(self.prompter, target, reward)
        if cfg.mode == "refine":
            self._first = kl_optimum.first_answers(scorer, prompts)
        cands = self.candidates(prompts)
        flat = [(x, g, h) for x, row in zip(prompts, cands, strict=True) for g, h in row]
        scores: list[float] = []
        results = []
        step = 64
        for s in tqdm(range(0, len(flat), step), desc="bootstrap: scoring r(x, target(x'))"):
            chunk = flat[s : s + step]
            batch = scorer.score(
                [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk], cfg.mode
            )
            scores += batch.rewards
            results += batch.results
        pairs, log_rows, wins = [], [], {"sampled": 0, "template": 0, "no_change": 0}
        if cfg.prompt_only_prompter is not None:
            wins["prompt_only"] = 0
        n_sampled = cfg.num_candidates
        gains = []
        smoothed, smoothing_stats = self.smoothed_choices(prompts, cands, scores)
        k = 0
        for i, (x, row) in enumerate(zip(prompts, cands, strict=True)):
            n = len(row)
            rs, res = scores[k : k + n], results[k : k + n]
            k += n
            # Candidates that fell back are identical to 'no change'; only usable rewrites can be targets.
            best = (
                smoothed[i]
                if smoothed is not None
                else max(
                    range(n),
                    key=lambda j: rs[j] if (res[j].rewritten or row[j][0] == NO_CHANGE) else float("-inf"),
                )
            )
            text = (
                NO_CHANGE
                if row[best][0] == NO_CHANGE or not res[best].rewritten
                else res[best].generated or NO_CHANGE
            )
            # By the winner's place in its row (see candidates()), not its text: a sample may equal a template.
            kind = (
                "no_change"
                if text == NO_CHANGE
                else "sampled"
                if best < n_sampled
                else "prompt_only"
                if cfg.prompt_only_prompter is not None and best == n_sampled
                else "template"
            )
            wins[kind] += 1
            baseline = rs[-1] if cfg.include_no_change else rs[best]
            gains.append(rs[best] - baseline)
            pairs.append((x, text))
            log_rows.append(
                {
                    "prompt": x,
                    **({"first_answer": self._first[x]} if self._first else {}),
                    "target": text,
                    "kind": kind,
                    "reward": rs[best],
                    "candidates": [
                        # text: the prompter's raw output; shown: what the target answered (after the guard)
                        {"text": c[0], "shown": q.text, "reward": r, "fallback": q.fallback_reason}
                        for c, r, q in zip(row, rs, res, strict=True)
                    ],
                }
            )
        Path(str(cfg.output_dir)).mkdir(parents=True, exist_ok=True)
        with open(Path(str(cfg.output_dir)) / "bootstrap.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in log_rows)
        self.bootstrap_stats = {
            "prompts": len(prompts),
            "candidates_per_prompt": len(cands[0]) if cands else 0,
            "winners": wins,
            "mean_gain_over_no_change": sum(gains) / max(len(gains), 1),
            "target_calls": target.stats.calls,
            "target_failures": target.stats.failures,
            **smoothing_stats,
        }
        if cfg.mode == "refine":
            self.bootstrap_stats["prompt_only_prompter"] = cfg.prompt_only_prompter
        logger.info("bootstrap: %s", self.bootstrap_stats)
        return pairs

    def smoothed_choices(
        self, prompts: Sequence[str], cands: Sequence[Sequence[tuple[str, bool]]], scores: Sequence[float]
    ) -> tuple[list[int] | None, dict[str, Any]]:
        """Per prompt, the index (in its candidate row) of the fixed candidate with the best reward averaged over
        the prompt and its ``bootstrap_neighbours`` most similar bootstrap prompts (None when smoothing is off),
        and the statistics of that choice for ``bootstrap_stats``."""
        cfg = self.config
        if not cfg.bootstrap_neighbours:
            return None, {}
        # The fixed candidates (guidance texts, "no change") close every row, in the same order on every prompt.
        n_fixed = (len(cfg.templates) if appends_guidance(cfg.mode) and cfg.include_templates else 0) + int(
            cfg.include_no_change
        )
        if n_fixed < 2:
            raise ValueError(
                "bootstrap_neighbours chooses among the fixed candidates (templates, 'no change'): it needs at "
                "least two; set templates / include_no_change, or bootstrap_neighbours=0"
            )
        if len(prompts) < 2:
            raise ValueError(
                "bootstrap_neighbours needs at least 2 bootstrap prompts; set it to 0 for one prompt"
            )
        import torch

        from alignpro_plugins.embeddings import Embedder
        from trainers import bootstrap_labels

        row_len = len(cands[0])
        rewards = torch.tensor(scores, dtype=torch.float64).view(len(prompts), row_len)[
            :, row_len - n_fixed :
        ]
        # Refine mode: neighbours are prompts whose first answers are alike too, so the pick can follow y0.
        texts = [f"{x}\n\n{self._first[x]}" for x in prompts] if self._first else list(prompts)
        order = bootstrap_labels.neighbour_order(
            Embedder(cfg.bootstrap_embedding_model).embed(texts).double()
        )
        size, loo = bootstrap_labels.choose_neighbours(rewards, order)
        if cfg.bootstrap_neighbours > 0:
            size = min(cfg.bootstrap_neighbours, len(prompts) - 1)
        picks = bootstrap_labels.smoothed_picks(rewards, order, size)
        stats = {
            "neighbours": size,
            "neighbours_chosen_by": "leave-one-out" if cfg.bootstrap_neighbours < 0 else "config",
            # Mean reward each neighbourhood size's pick earns on prompts it did not see (the largest is "all").
            "leave_one_out_reward": {str(k): round(v, 5) for k, v in loo.items()},
        }
        logger.info("bootstrap: targets smoothed over %d neighbours (leave-one-out: %s)", size, loo)
        return [row_len - n_fixed + j for j in picks], stats

    # ------------------------------------------------------------------ training
    def dataset(self, pairs: Sequence[tuple[str, str]]):
        import datasets

        rows = [{"prompt": self.query(x), "completion": y} for x, y in pairs]
        random.Random(self.config.seed).shuffle(rows)
        return datasets.Dataset.from_list(rows)

    def train(self) -> Prompter:
        from trl import SFTTrainer

        cfg = self.config
        # Bootstrap samples and the LoRA initialisation come before the Trainer seeds anything.
        seed_stage(cfg)
        pairs = self.sft_pairs()
        if not pairs:
            raise ValueError("no SFT pairs")
        model = self.prompter.model
        if not hasattr(model, "peft_config"):
            from peft import get_peft_model

            model = get_peft_model(
                model, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
            )
        if count_trainable(model) == 0:
            raise RuntimeError(
                "the prompter has no trainable parameters (a PeftModel loaded without is_trainable?)"
            )
        model.train()
        self.prompter.tokenizer.padding_side = "right"  # training pads right; generation switches back
        trainer = SFTTrainer(
            model=model,
            args=cfg,
            train_dataset=self.dataset(pairs),
            processing_class=self.prompter.tokenizer,
            callbacks=[metrics_callback(cfg, "sft")],
        )
        trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
        self.prompter.tokenizer.padding_side = "left"
        self.prompter.model = trainer.model
        self.prompter.model.eval()
        fit = self.fit_check(pairs) if cfg.fit_check_prompts else None
        prov = dict(self.prompter.manifest.provenance)
        prov.setdefault("stages", [])
        prov["stages"] = [
            *prov["stages"],
            {
                "stage": "sft",
                "data": cfg.pairs_data or cfg.prompts_data or "in-memory",
                "pairs": len(pairs),
                "steps": trainer.state.global_step,
                "bootstrap": self.bootstrap_stats or None,
                "fit_check": fit,
                "reward_model": cfg.reward_model,
            },
        ]
        self.prompter.manifest = replace(self.prompter.manifest, mode=cfg.mode, provenance=prov)
        self.prompter.save_pretrained(str(cfg.output_dir))
        return self.prompter

    def fit_check(self, pairs: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
        """How often the prompter, decoding greedily as deployed (intent guard included), emits its SFT target.

        Why: when the bootstrap settles on one long text for every prompt, an underfit prompter paraphrases it
        (measured: 3 epochs reproduced a two-sentence text on 24/100 held-out prompts, 6 epochs on 96/100), and
        a paraphrase is not the text whose reward was measured.
        """
        cfg = self.config
        n = min(cfg.fit_check_prompts, len(pairs))
        if n == 0:
            return None
        sample = [pairs[i * len(pairs) // n] for i in range(n)]  # spread over the (unshuffled) pairs
        settings = replace(self.prompter.manifest.generation, do_sample=False)
        emitted: list[str] = []
        at_limit = 0
        for s in range(0, n, 8):
            chunk = sample[s : s + 8]
            queries = [self.query(x) for x, _ in chunk]
            for (x, _), (g,) in zip(chunk, self.prompter.engine.generate(queries, settings), strict=True):
                raw, hit = g.text, not g.ended
                at_limit += hit
                res = self.prompter.finalize(x, raw, hit, cfg.mode)
                # A guard fallback passes the prompt through unchanged, which is what "no change" ("") teaches.
                emitted.append((res.generated or "") if res.fallback_reason is None else NO_CHANGE)
        hits = [e.strip() == y.strip() for e, (_, y) in zip(emitted, sample, strict=True)]
        top_text, top_count = Counter(y for _, y in pairs).most_common(1)[0]
        top_share = top_count / len(pairs)
        # The warning is about the repeated text: one-off targets (sampled rewrites) are not expected verbatim.
        top_hits = [h for h, (_, y) in zip(hits, sample, strict=True) if y == top_text]
        top_reproduced = sum(top_hits) / len(top_hits) if top_hits else None
        if top_share >= 0.5 and top_reproduced is not None and top_reproduced < 0.8:
            logger.warning(
                "SFT fit check: %.0f%% of the targets are one text, but the prompter emits it on only %d of the %d "
                "checked prompts that were taught it%s. Raise num_train_epochs (or learning_rate) so it emits the "
                "text whose reward was measured.",
                100 * top_share,
                sum(top_hits),
                len(top_hits),
                f"; {at_limit} of {n} hit max_new_tokens={settings.max_new_tokens}: raise it too"
                if at_limit
                else "",
            )
        return {
            "prompts": n,
            "reproduced": sum(hits) / n,
            "top_target_share": top_share,
            "top_target_reproduced": top_reproduced,
            "hit_max_new_tokens": at_limit / n,
        }


def train_sft(config: AlignProSFTConfig, **kwargs: Any) -> Prompter:
    os.makedirs(str(config.output_dir), exist_ok=True)
    return AlignProSFTTrainer(config, **kwargs).train()
