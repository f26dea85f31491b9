"""The KL-regularised optimum, sampled and distilled: Align-Pro's RL objective without policy gradients.

For max_ρ E[r(x, y)] − λ·KL(ρ‖ρ_sft) the optimum is ρ*(x'|x) ∝ ρ_sft(x'|x)·exp(r(x, x')/λ). Sampling K rewrites
from ρ_sft and resampling them with self-normalised weights softmax(r/λ) draws (approximately) from ρ*
(sampling-importance-resampling); fitting the prompter to those draws by maximum likelihood is the M-projection
of ρ* onto the adapter family. Every generation is scored once, in large target batches, and reused by the
weights — the cheap route to RL signal on a CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alignpro_plugins.manifest import GenerationDefaults, appends_guidance
from alignpro_plugins.targets import TargetError, TargetRequest
from trainers.common import drop_rows_after
from trainers.reward_metrics import pooled_length_slope
from trainers.scoring import RewriteScorer

logger = logging.getLogger(__name__)


def first_answers(scorer: RewriteScorer, prompts: Sequence[str], batch: int = 64) -> dict[str, str]:
    """y₀ = π_F(x) for each prompt: the first answer a refinement prompter reads (the SFT bootstrap uses it too).

    Asked as the scorer asks x itself (same request, same answer cache), so "no change" candidates and rejected
    refinements, which reach the target as x, reuse these answers.
    """
    todo = list(dict.fromkeys(prompts))
    out: dict[str, str] = {}
    failed = 0
    for s in tqdm(
        range(0, len(todo), batch), desc="first answers y0 = target(x)", disable=len(todo) <= batch
    ):
        chunk = todo[s : s + batch]
        requests = [TargetRequest(x, original=x, context=scorer.contexts.get(x)) for x in chunk]
        try:
            answers = scorer.target.generate(requests)
        except TargetError as exc:  # a missing answer is shown as empty (and counted here)
            failed += sum(a is None for a in exc.answers)
            answers = exc.answers_or_empty()
        out.update(zip(chunk, answers, strict=True))
    if failed:
        logger.warning(
            "%d of %d first answers y0 failed at the target: the refinement prompter reads them as empty answers",
            failed,
            len(todo),
        )
    return out


def query(prompter: Any, x: str, mode: str, answers: Mapping[str, str] | None = None) -> str:
    """The prompter's query for x; in refine mode it shows x's first answer, ``answers[x]``."""
    return prompter.format_query(x, mode, answer=None if answers is None else answers[x])


def sir_weights(rewards: Sequence[float], lam: float) -> list[float]:
    """softmax(z/λ) with z the rewards standardised within the group (uniform when they are all equal)."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    if std < 1e-8:
        return [1.0 / len(rewards)] * len(rewards)
    logits = [(r - mean) / std / lam for r in rewards]
    top = max(logits)
    exp = [math.exp(v - top) for v in logits]
    total = sum(exp)
    return [e / total for e in exp]


def resample(
    rewards: Sequence[float], lam: float, k: int, rng: random.Random
) -> tuple[list[int], list[float]]:
    """K draws (indices into the group) from softmax(z/λ), and the weights they were drawn with."""
    w = sir_weights(rewards, lam)
    return rng.choices(range(len(rewards)), weights=w, k=k), w


def kl_to_proposal(weights: Sequence[float]) -> float:
    """KL(ρ* ‖ ρ_sft) estimated from the self-normalised weights of K proposal samples: Σ w log(K w)."""
    k = len(weights)
    return sum(w * math.log(k * w) for w in weights if w > 0)


def run_round(
    scorer: RewriteScorer,
    prompts: Sequence[str],
    *,
    k: int,
    lam: float,
    settings: GenerationDefaults,
    mode: str,
    rng: random.Random,
    gen_batch: int = 8,
    score_batch: int = 64,
    anchors: Sequence[str] = (),
    greedy: GenerationDefaults | None = None,
    length_control: float = 0.0,
    answers: Mapping[str, str] | None = None,
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Sample K rewrites per prompt, score r(x, target(x')), resample K draws from ρ*; return (x, x') targets.

    ``anchors`` (augment mode) are fixed guidance texts scored beside the K samples of every prompt, "" meaning
    "no change": the proposal becomes a mixture of ρ_sft and those points, so a round can always fall back on
    what a user would try first, and the anchors' answers are cached across rounds.

    ``greedy`` (decoding settings) adds the prompter's own deterministic rewrite of every prompt — what it
    produces when deployed — to its group: a sample is then distilled only where it beats what the prompter
    already does, and where none does the draws re-fit that rewrite instead of drifting toward sampling noise.

    ``length_control`` (0..1) removes that share of the reward's dependence on answer length before resampling:
    reward models favour longer answers, so without it a round can "win" by asking for length alone. The
    slope is the round's pooled within-prompt regression of reward on answer words; logged rewards stay raw.

    ``answers`` (refine mode): each prompt's first answer, which every query shows; the reward still scores the
    answer to x'' against x.
    """
    prompter = scorer.prompter
    t0 = time.perf_counter()
    samples: list[tuple[str, str, bool]] = []
    for s in tqdm(range(0, len(prompts), gen_batch), desc="kl-optimum: sampling rewrites"):
        chunk = prompts[s : s + gen_batch]
        queries = [query(prompter, x, mode, answers) for x in chunk]
        rows = [
            [(g.text, not g.ended) for g in row] for row in prompter.engine.generate(queries, settings, k)
        ]
        if greedy is not None:
            rows = [
                [*row, (g.text, not g.ended)]
                for row, (g,) in zip(rows, prompter.engine.generate(queries, greedy), strict=True)
            ]
        samples += [
            (x, g, h)
            for x, row in zip(chunk, rows, strict=True)
            for g, h in [*row, *((a, False) for a in anchors)]
        ]
    own_k = k + (greedy is not None)  # the prompter's own candidates come first in every group
    group = own_k + len(anchors)
    t1 = time.perf_counter()
    rewards: list[float] = []
    results = []
    words: list[int] = []
    timings = {"target_s": 0.0, "reward_s": 0.0}
    for s in tqdm(range(0, len(samples), score_batch), desc="kl-optimum: scoring r(x, target(x'))"):
        part = samples[s : s + score_batch]
        batch = scorer.score([c[0] for c in part], [c[1] for c in part], [c[2] for c in part], mode)
        rewards += batch.rewards
        results += batch.results
        words += [len(a.split()) for a in batch.answers]
        for key in timings:
            timings[key] += batch.timings[key]
    targets: list[tuple[str, str]] = []
    kls, chosen_rewards, ess = [], [], []
    anchor_draws = greedy_draws = 0
    slope = pooled_length_slope(rewards, words, group)
    selection = [r - length_control * slope * n for r, n in zip(rewards, words, strict=True)]
    for i, x in enumerate(prompts):
        rs = rewards[i * group : (i + 1) * group]
        res = results[i * group : (i + 1) * group]
        draws, w = resample(selection[i * group : (i + 1) * group], lam, k, rng)
        kls.append(kl_to_proposal(w))
        ess.append(1.0 / sum(v * v for v in w))
        anchor_draws += sum(j >= own_k for j in draws)
        greedy_draws += sum(j == k for j in draws) if greedy is not None else 0
        for j in draws:
            # A rejected rewrite reached the target as x itself: its target is "no change" (augment) .
            text = (res[j].generated or "") if res[j].rewritten else ""
            if text or appends_guidance(mode):
                targets.append((x, text))
            chosen_rewards.append(rs[j])
    # Fallback rate and length describe the prompter's own samples; "" anchors would count as fallbacks.
    own = [r for j, r in enumerate(results) if j % group < k]
    stats = {
        "reward": sum(rewards) / len(rewards),
        "reward_std": _std(rewards),
        "reward_resampled": sum(chosen_rewards) / max(len(chosen_rewards), 1),
        "kl": sum(kls) / len(kls),
        "effective_sample_size": sum(ess) / len(ess),
        "alignpro/fallback_rate": sum(not r.rewritten for r in own) / len(own),
        "alignpro/rewrite_chars": sum(len(r.generated or "") for r in own) / len(own),
        "time/prompter_generation_s": t1 - t0,
        "time/target_s": timings["target_s"],
        "time/reward_s": timings["reward_s"],
        "samples": len(samples),
        "anchor_share": anchor_draws / max(len(chosen_rewards), 1),
        "answer_words": sum(words) / max(len(words), 1),
        "length_slope": slope,
    }
    if greedy is not None:
        stats["greedy_share"] = greedy_draws / max(len(chosen_rewards), 1)
        stats["reward_greedy"] = sum(rewards[i * group + k] for i in range(len(prompts))) / len(prompts)
    return targets, stats


def deployed_reward(
    scorer: RewriteScorer,
    prompts: Sequence[str],
    settings: GenerationDefaults,
    mode: str,
    gen_batch: int = 8,
    answers: Mapping[str, str] | None = None,
) -> float:
    """Mean reward of the prompter's deployed (non-sampled) rewrites of ``prompts``: the validation metric."""
    prompter = scorer.prompter
    rows: list[tuple[str, bool]] = []
    for s in range(0, len(prompts), gen_batch):
        queries = [query(prompter, x, mode, answers) for x in prompts[s : s + gen_batch]]
        rows += [(g.text, not g.ended) for (g,) in prompter.engine.generate(queries, settings)]
    batch = scorer.score(list(prompts), [g for g, _ in rows], [h for _, h in rows], mode)
    return sum(batch.rewards) / len(batch.rewards)


def keep_best_round(model: Any, out: Path) -> int:
    """Load the adapter of the round with the best logged ``val_reward`` (earliest on ties, 0 = the start)."""
    log = out / "metrics.jsonl"
    vals = {
        row["step"]: row["val_reward"]
        for row in map(json.loads, log.read_text().splitlines())
        if "val_reward" in row
    }
    saved = dict(round_dirs(out))
    best = max((step for step in sorted(vals) if step in saved), key=lambda step: vals[step])
    _load_adapter(model, saved[best])
    logger.info("keeping round %d (val_reward %.4f; all: %s)", best, vals[best], vals)
    return best


def _std(values: Sequence[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def distil(
    prompter: Any,
    pairs: Sequence[tuple[str, str]],
    cfg: Any,
    output_dir: Path,
    mode: str,
    answers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One maximum-likelihood pass of the prompter's (trainable) adapter on the resampled draws."""
    rows = [{"prompt": query(prompter, x, mode, answers), "completion": y} for x, y in pairs]
    prompter.model, stats = distil_rows(prompter.model, prompter.tokenizer, rows, cfg, output_dir)
    return stats


def distil_rows(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: Any, output_dir: Path
) -> tuple[Any, dict[str, Any]]:
    """Fit a PEFT model to prompt/completion rows for one epoch with TRL's SFTTrainer; returns it in eval mode.

    Shared by the prompter's kl-optimum RL and the RLHF oracle's (same algorithm on the target itself). A row
    with ``"ended": False`` (its completion was cut at the generation cap) is fitted without EOS: the model
    learns the text, not to stop where the cap happened to fall.
    """
    import datasets
    from trl import SFTConfig, SFTTrainer

    from trainers.arguments import checkpointing_kwargs

    rows = tokenize_rows(tokenizer, rows)
    random.Random(cfg.seed).shuffle(rows)
    args = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        report_to="none",
        logging_steps=5,
        save_strategy="no",
        max_length=512,
        completion_only_loss=True,  # the rows are pre-tokenized: TRL can no longer infer it
        seed=cfg.seed,
        disable_tqdm=cfg.disable_tqdm,
        use_cpu=cfg.use_cpu,
        dataloader_pin_memory=cfg.dataloader_pin_memory,
        **checkpointing_kwargs(SFTConfig, False),
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    model.train()
    t0 = time.perf_counter()
    try:
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
        )
        out = trainer.train()
    finally:
        tokenizer.padding_side = side
    model = trainer.model
    model.eval()
    return model, {
        "loss": out.training_loss,
        "time/update_s": time.perf_counter() - t0,
        "distil_steps": out.global_step,
    }


def tokenize_rows(tokenizer: Any, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input_ids`` and ``completion_mask`` of prompt/completion rows, as generation sees them.

    A prompt is a string (already formatted) or chat messages (rendered with the generation prompt); the
    completion is a string or a one-message list. The completion is tokenized on its own after the prompt, as
    it was generated. It ends the way the model ends a turn — the chat template's own end of turn for chat rows,
    EOS otherwise — unless the row says ``"ended": False``: then it ends where the text ends.
    """
    out = []
    for row in rows:
        prompt, completion = row["prompt"], row["completion"]
        ended = row.get("ended") is not False
        ending = None
        if isinstance(prompt, list):
            messages = prompt
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if isinstance(completion, list):
                full = tokenizer.apply_chat_template([*messages, *completion], tokenize=False)
                completion = completion[-1]["content"]
                head = f"{prompt}{completion}"
                # The template's end of turn (e.g. "<|im_end|>\n", "<end_of_turn>\n"), when it renders the
                # answer verbatim after the generation prompt; else the tokenizer's EOS.
                ending = full[len(head) :] if full.startswith(head) and len(full) > len(head) else None
        elif isinstance(completion, list):
            completion = completion[-1]["content"]
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if ended:
            if ending is not None:
                c = [*c, *tokenizer(ending, add_special_tokens=False)["input_ids"]]
            elif tokenizer.eos_token_id is not None:
                c = [*c, tokenizer.eos_token_id]
        if c:  # a cut empty answer (e.g. a failed generation) has nothing to learn
            out.append({"input_ids": [*p, *c], "completion_mask": [0] * len(p) + [1] * len(c)})
    return out


def round_prompts(prompts: Sequence[str], per_round: int | None, r: int) -> list[str]:
    """The prompts of round r (0-based): all of them, or the r-th fresh slice of ``per_round``."""
    if per_round is None:
        return list(prompts)
    return list(prompts[r * per_round : (r + 1) * per_round])


def check_round_prompts(prompts: Sequence[str], per_round: int | None, rounds: int, stage: str) -> None:
    if per_round is not None and len(prompts) < per_round * rounds:
        raise ValueError(
            f"{stage}: prompts_per_round={per_round} x rounds={rounds} needs {per_round * rounds} distinct "
            f"training prompts, got {len(prompts)}; give more prompts, lower rounds, or set "
            "prompts_per_round=None to reuse all prompts every round"
        )


def log_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row, default=float) + "\n")


def round_dirs(out: Path) -> list[tuple[int, Path]]:
    """Finished rounds in ``out``: (N, ``round-N/``) holding the adapter after round N, in round order."""
    found = []
    for p in out.glob("round-*"):
        m = re.fullmatch(r"round-(\d+)", p.name)
        if m and (p / "adapter_model.safetensors").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_round(model: Any, out: Path, n: int) -> Path:
    """Save ``model`` (a Prompter or PEFT model) as ``round-N/``, whole or not at all.

    It is written to ``round-N.partial/`` and renamed into place: a process killed while saving leaves no
    ``round-N/`` that resume would take for a finished round.
    """
    final, partial = out / f"round-{n}", out / f"round-{n}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def resume_last_round(model: Any, out: Path, metrics: Path) -> int:
    """Load the adapter of the last finished round into ``model``; the number of rounds done (0: none).

    The rows ``metrics`` holds for later rounds (a run killed before saving their adapter) are dropped: those
    rounds run again and log again.
    """
    rounds = round_dirs(out)
    done = rounds[-1][0] if rounds else 0
    # With no round done, the run starts over, validation of the starting point (step 0) included.
    drop_rows_after(metrics, done if done > 0 else -1)
    if done == 0:
        return 0
    folder = rounds[-1][1]
    _load_adapter(model, folder)
    logger.info("resuming after round %d from %s", done, folder)
    return done


def _load_adapter(model: Any, folder: Path) -> None:
    """Put the adapter weights saved in ``folder`` (a ``round-N/``) into the PEFT ``model``, in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
