"""The reward stage's options on tiny models: length-matched accuracy, the length penalty, ensembles, the decoder
backbone with a LoRA, batches that run each distinct sequence once, and the config's checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignpro_plugins.data import PreferencePair
from alignpro_plugins.rewards import REWARD_MANIFEST, RewardModel, encode_pairs, load_reward
from alignpro_plugins.testing import build_tiny_llama_classifier
from trainers import reward_trainer
from trainers.reward_batches import (
    DedupPreferenceCollator,
    PairRewardTrainer,
    PromptGroupedSampler,
    prompt_grouped_order,
)
from trainers.reward_config import AlignProRewardConfig
from trainers.reward_metrics import (
    answer_token_counts,
    fit_length_penalty,
    length_matched,
    length_penalty_sample,
    pairwise_metrics,
    score_pairs,
)
from trainers.reward_trainer import AlignProRewardTrainer

TINY = dict(
    per_device_train_batch_size=4, report_to="none", save_steps=1000, logging_steps=1, disable_tqdm=True
)
WORDS = ["good", "answer", "with", "examples", "and", "steps", "the", "code", "python", "tea"]


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def reference_pairs(n_prompts: int = 12, per_prompt: int = 4) -> list[PreferencePair]:
    """AlpacaEval-like pairs: each prompt's answers are compared with one reference answer of 4 words; half the
    chosen answers are as long (length-matched), half 9 words long."""
    pairs = []
    for i in range(n_prompts):
        reference = f"no idea at {i}"
        for j in range(per_prompt):
            chosen = f"{words(3 if j % 2 else 8, j)} {i}"
            pairs.append(PreferencePair(f"what is {i} ?", chosen, reference))
    return pairs


def config(tmp_path, base: str, name: str = "rm", **kw) -> AlignProRewardConfig:
    settings = dict(TINY, base_model=base, max_steps=3, learning_rate=1e-3, eval_fraction=0.25, max_length=32)
    return AlignProRewardConfig(output_dir=str(tmp_path / name), **(settings | kw))


def manifest(folder) -> dict:
    return json.loads((folder / REWARD_MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------- metrics
def test_length_matched_accuracy_and_longer_preferred_rates_on_known_pairs():
    # (chosen words, rejected words, chosen score, rejected score)
    rows = [
        (10, 8, 1.0, 0.0),  # differ by 2 = 20% of 10: matched; right; longer (chosen) preferred
        (8, 10, 0.0, 1.0),  # matched; wrong; longer (rejected) preferred
        (10, 7, 1.0, 0.0),  # 30%: not matched; right; longer preferred
        (3, 12, 2.0, 1.0),  # not matched; right; shorter preferred
        (5, 5, 0.0, 0.0),  # same length: matched; a tie is not right; in no longer-rate
    ]
    pairs = [PreferencePair(f"x{i}", words(c), words(r, 1)) for i, (c, r, _, _) in enumerate(rows)]
    assert [length_matched(p) for p in pairs] == [True, True, False, False, True]
    metrics = pairwise_metrics(pairs, [r[2] for r in rows], [r[3] for r in rows])
    assert metrics == {
        "pairwise_accuracy": 3 / 5,
        "pairwise_accuracy_length_matched": 1 / 3,
        "n_pairs": 5,
        "n_pairs_length_matched": 3,
        "longer_preferred_rate": 3 / 4,  # pairs 0, 1, 2 of the 4 whose lengths differ
        "labels_longer_preferred_rate": 2 / 4,  # chosen is longer in pairs 0 and 2
    }
    wider = pairwise_metrics(pairs, [r[2] for r in rows], [r[3] for r in rows], tolerance=0.3)
    assert (wider["n_pairs_length_matched"], wider["pairwise_accuracy_length_matched"]) == (4, 2 / 4)
    none_matched = pairwise_metrics(pairs[2:4], [1.0, 2.0], [0.0, 1.0])
    assert none_matched["n_pairs_length_matched"] == 0
    assert math.isnan(none_matched["pairwise_accuracy_length_matched"])


def test_score_pairs_scores_each_distinct_answer_once():
    calls = []

    def scorer(prompts, answers):
        calls.extend(zip(prompts, answers, strict=True))
        return [float(len(a)) for a in answers]

    pairs = [PreferencePair("x", "long answer", "ref"), PreferencePair("x", "mid", "ref")]
    pairs.append(PreferencePair("y", "ref", "a"))  # the same answer to another prompt is another input
    assert score_pairs(scorer, pairs) == ([11.0, 3.0, 3.0], [3.0, 3.0, 1.0])
    assert sorted(calls) == sorted(
        [("x", "long answer"), ("x", "ref"), ("x", "mid"), ("y", "ref"), ("y", "a")]
    )


def test_length_penalty_fit_recovers_a_known_beta(tiny_encoder_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    answers = [words(n, n) for n in (1, 3, 4, 7, 12, 20)]
    tokens = answer_token_counts(tokenizer, answers)
    assert tokens == [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert len(set(tokens)) > 3
    # Three pairs (chosen, rejected), each prompt with its own offset a_x, which falls as its answers grow: a
    # scorer exactly a_x + β·len. Only the within-pair slope is β; one line through all six answers is not.
    chosen, rejected = tokens[1::2], tokens[0::2]
    offsets = [0.0, -1.0, -3.0]
    scores = (
        [a + 0.05 * n for a, n in zip(offsets, chosen, strict=True)],
        [a + 0.05 * n for a, n in zip(offsets, rejected, strict=True)],
    )
    assert fit_length_penalty(scores, (chosen, rejected)) == pytest.approx(0.05, abs=1e-12)
    with pytest.raises(ValueError, match="in every training pair both answers have the same token count"):
        fit_length_penalty(([1.0, 5.0], [2.0, 0.0]), ([3, 4], [3, 4]))


# ---------------------------------------------------------------------------------------------- one model
def recomputed(reward, pairs, tolerance=0.2) -> dict:
    return pairwise_metrics(pairs, *score_pairs(reward, pairs), tolerance=tolerance)


def test_the_manifest_reports_what_the_saved_reward_scores(tiny_encoder_dir, tmp_path):
    trainer = AlignProRewardTrainer(
        config(tmp_path, tiny_encoder_dir, length_matched_tolerance=0.5), pairs=reference_pairs()
    )
    reward = trainer.train()
    meta = manifest(tmp_path / "rm")
    again = recomputed(load_reward(str(tmp_path / "rm")), trainer.eval_pairs, tolerance=0.5)
    assert 0 < meta["n_eval_pairs_length_matched"] == again["n_pairs_length_matched"] < meta["n_eval_pairs"]
    assert meta["heldout_pairwise_accuracy"] == again["pairwise_accuracy"]
    assert meta["heldout_pairwise_accuracy_length_matched"] == again["pairwise_accuracy_length_matched"]
    assert meta["heldout_longer_preferred_rate"] == again["longer_preferred_rate"]
    assert meta["heldout_labels_longer_preferred_rate"] == again["labels_longer_preferred_rate"] == 1.0
    assert meta["length_control"] == "none" and "heldout_pairwise_accuracy_raw" not in meta
    assert (meta["length_matched_tolerance"], meta["group_by_prompt"], meta["lora"]) == (0.5, False, None)
    assert reward.meta == meta


def test_length_penalty_is_fitted_on_training_answers_and_the_scorer_applies_it(tiny_encoder_dir, tmp_path):
    trainer = AlignProRewardTrainer(
        config(tmp_path, tiny_encoder_dir, length_control="penalty"), pairs=reference_pairs()
    )
    trainer.train()
    folder = tmp_path / "rm"
    meta = manifest(folder)
    controlled, raw = RewardModel(str(folder)), RewardModel(str(folder), length_control=False)
    # β is the within-pair slope of the raw scores of the seeded training sample's answers on their tokens.
    sample = length_penalty_sample(trainer.train_pairs, trainer.config.seed)
    assert not {p.prompt for p in sample} & {p.prompt for p in trainer.eval_pairs}
    answers = [p.chosen for p in sample] + [p.rejected for p in sample]
    tokens = answer_token_counts(raw.tokenizer, answers)
    scores = raw([p.prompt for p in sample] * 2, answers)
    half = len(sample)
    beta = fit_length_penalty((scores[:half], scores[half:]), (tokens[:half], tokens[half:]))
    assert meta["length_control"] == "penalty" and meta["length_penalty_fit_answers"] == len(answers)
    assert meta["length_penalty_per_token"] == pytest.approx(beta, rel=1e-6)
    assert controlled(["x"] * 2, answers[:2]) == pytest.approx(
        [s - beta * n for s, n in zip(raw(["x"] * 2, answers[:2]), tokens[:2], strict=True)], rel=1e-5
    )
    # Both kinds of score are reported, each as its scorer gives it.
    for scorer, suffix in ((controlled, ""), (raw, "_raw")):
        again = recomputed(scorer, trainer.eval_pairs)
        assert meta[f"heldout_pairwise_accuracy{suffix}"] == again["pairwise_accuracy"]
        assert (
            meta[f"heldout_pairwise_accuracy_length_matched{suffix}"]
            == again["pairwise_accuracy_length_matched"]
        )
        assert meta[f"heldout_longer_preferred_rate{suffix}"] == again["longer_preferred_rate"]


def test_max_eval_pairs_scores_a_seeded_sample_of_the_heldout_pairs(tiny_encoder_dir, tmp_path):
    every = AlignProRewardTrainer(config(tmp_path, tiny_encoder_dir), pairs=reference_pairs())
    capped = AlignProRewardTrainer(
        config(tmp_path, tiny_encoder_dir, max_eval_pairs=5), pairs=reference_pairs()
    )
    assert len(every.eval_pairs) > 5 and len(capped.eval_pairs) == 5
    assert set(capped.eval_pairs) < set(every.eval_pairs) and capped.train_pairs == every.train_pairs
    again = AlignProRewardTrainer(
        config(tmp_path, tiny_encoder_dir, max_eval_pairs=5), pairs=reference_pairs()
    )
    assert again.eval_pairs == capped.eval_pairs
    assert len(length_penalty_sample(capped.train_pairs, 0, 5)) == 5


def test_the_stage_recovers_beta_from_a_reward_that_is_exactly_linear_in_length(
    tiny_encoder_dir, tmp_path, monkeypatch
):
    # Prompt i's answers are about i words long and its offset a_i = -i/2 falls as they grow: a slope pooled
    # across prompts would take the offsets in; Bradley-Terry training fixes only the differences within a pair.
    pairs = [
        PreferencePair(f"what is {i} ?", words(3 + i + j, j), words(2 + i, 5))
        for i in range(12)
        for j in range(3)
    ]

    class LinearInLength(RewardModel):
        def score(self, prompts, answers):  # a_i + β·tokens(answer), β = 1/32 (exact in binary)
            tokens = answer_token_counts(self.tokenizer, answers)
            return [-int(x.split()[2]) / 2 + n / 32 for x, n in zip(prompts, tokens, strict=True)]

    monkeypatch.setattr(reward_trainer, "RewardModel", LinearInLength)
    AlignProRewardTrainer(config(tmp_path, tiny_encoder_dir, length_control="penalty"), pairs=pairs).train()
    meta = manifest(tmp_path / "rm")
    assert meta["length_penalty_per_token"] == 1 / 32
    # Raw, the longer answer always wins; with the penalty both answers of a pair score a_x: no pair is ranked.
    assert meta["heldout_longer_preferred_rate_raw"] == 1.0 and meta["heldout_longer_preferred_rate"] == 0.0
    assert meta["heldout_pairwise_accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------- ensembles
def test_ensemble_trains_members_on_disjoint_shards_and_one_heldout_split(tiny_encoder_dir, tmp_path):
    pairs = reference_pairs()
    cfg = config(tmp_path, tiny_encoder_dir, "ens", ensemble_size=2, ensemble_combine="mean-minus-std")
    trainer = AlignProRewardTrainer(cfg, pairs=pairs)
    ensemble = trainer.train()
    out = tmp_path / "ens"
    meta = manifest(out)
    assert (meta["kind"], meta["members"], meta["combine"], meta["combine_k"]) == (
        "alignpro-reward-ensemble",
        ["member-0", "member-1"],
        "mean-minus-std",
        1.0,
    )
    members = [manifest(out / f"member-{j}") for j in range(2)]
    heldout = {p.prompt for p in trainer.eval_pairs}
    digests = [set(m["train_prompt_digests"]) for m in members]
    assert not digests[0] & digests[1]  # disjoint prompt shards
    assert digests[0] | digests[1] == set(meta["train_prompt_digests"])
    assert len(meta["train_prompt_digests"]) == len({p.prompt for p in trainer.train_pairs})
    assert sum(m["n_train_pairs"] for m in members) == len(trainer.train_pairs) == meta["n_train_pairs"]
    assert all(m["n_eval_pairs"] == len(trainer.eval_pairs) for m in members)  # one shared held-out split
    assert not heldout & {p.prompt for p in trainer.train_pairs}
    assert [m["seed"] for m in members] == [cfg.seed, cfg.seed + 1]
    assert [m["ensemble_member"]["index"] for m in members] == [0, 1]
    # The reported accuracies are the loaded ensemble's and each member's own.
    again = recomputed(load_reward(str(out)), trainer.eval_pairs)
    assert meta["heldout_pairwise_accuracy"] == again["pairwise_accuracy"]
    assert meta["heldout_pairwise_accuracy_length_matched"] == again["pairwise_accuracy_length_matched"]
    assert [m["heldout_pairwise_accuracy"] for m in meta["member_metrics"]] == [
        m["heldout_pairwise_accuracy"] for m in members
    ]
    # member_scale: each member's mean/std on held-out answers (no labels), so the rule combines z-scores.
    answers = [a for p in trainer.eval_pairs for a in (p.chosen, p.rejected)]
    for scale, j in zip(meta["member_scale"], range(2), strict=True):
        scores = RewardModel(str(out / f"member-{j}"))(
            [p.prompt for p in trainer.eval_pairs for _ in "cr"], answers
        )
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
        assert (scale["mean"], scale["std"]) == pytest.approx((mean, std), rel=1e-5)
    assert ensemble.identity == load_reward(str(out)).identity


def test_a_length_controlled_ensemble_scales_raw_member_scores_by_their_own_fit(tiny_encoder_dir, tmp_path):
    cfg = config(tmp_path, tiny_encoder_dir, "ens", ensemble_size=2, length_control="penalty")
    trainer = AlignProRewardTrainer(cfg, pairs=reference_pairs())
    trainer.train()
    out = tmp_path / "ens"
    meta = manifest(out)
    prompts = [p.prompt for p in trainer.eval_pairs for _ in "cr"]
    answers = [a for p in trainer.eval_pairs for a in (p.chosen, p.rejected)]
    for key, controlled in (("member_scale", True), ("member_scale_raw", False)):
        for scale, j in zip(meta[key], range(2), strict=True):
            scores = RewardModel(str(out / f"member-{j}"), length_control=controlled)(prompts, answers)
            mean = sum(scores) / len(scores)
            std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
            assert (scale["mean"], scale["std"]) == pytest.approx((mean, std), rel=1e-5)
    assert meta["member_scale"] != meta["member_scale_raw"]
    raw = load_reward(str(out), length_control=False)
    assert raw.member_scale == meta["member_scale_raw"]  # type: ignore[attr-defined]
    again = recomputed(raw, trainer.eval_pairs)
    assert meta["heldout_pairwise_accuracy_raw"] == again["pairwise_accuracy"]
    assert meta["heldout_longer_preferred_rate_raw"] == again["longer_preferred_rate"]


def test_ensemble_resume_keeps_complete_members(tiny_encoder_dir, tmp_path, monkeypatch):
    pairs = reference_pairs()
    AlignProRewardTrainer(config(tmp_path, tiny_encoder_dir, "ens", ensemble_size=2), pairs=pairs).train()
    out = tmp_path / "ens"
    weights = {j: (out / f"member-{j}" / "model.safetensors").read_bytes() for j in range(2)}
    trained = []
    real = AlignProRewardTrainer._train_model

    def spy(self, cfg, train_pairs, member=None):
        trained.append(member["index"])
        return real(self, cfg, train_pairs, member)

    monkeypatch.setattr(AlignProRewardTrainer, "_train_model", spy)
    resume = config(tmp_path, tiny_encoder_dir, "ens", ensemble_size=2, resume=True)
    AlignProRewardTrainer(resume, pairs=pairs).train()
    assert trained == []
    (out / "member-1" / REWARD_MANIFEST).unlink()  # killed before member 1 was finished
    AlignProRewardTrainer(resume, pairs=pairs).train()
    assert trained == [1]
    assert (out / "member-0" / "model.safetensors").read_bytes() == weights[0]
    assert manifest(out)["members"] == ["member-0", "member-1"]
    # Without resume, every member is trained again.
    AlignProRewardTrainer(config(tmp_path, tiny_encoder_dir, "ens", ensemble_size=2), pairs=pairs).train()
    assert trained == [1, 0, 1]
    # A member folder from other settings is not silently reused.
    other = config(tmp_path, tiny_encoder_dir, "ens", ensemble_size=2, resume=True, seed=7)
    with pytest.raises(ValueError, match="member-0 holds a reward model whose .*seed.* differ from member 0"):
        AlignProRewardTrainer(other, pairs=pairs).train()


def test_bootstrap_members_resample_all_training_pairs(tiny_encoder_dir, tmp_path):
    cfg = config(tmp_path, tiny_encoder_dir, ensemble_size=3, ensemble_split="bootstrap")
    trainer = AlignProRewardTrainer(cfg, pairs=reference_pairs())
    data = trainer.member_train_pairs()
    assert [len(d) for d in data] == [len(trainer.train_pairs)] * 3
    assert all(set(d) <= set(trainer.train_pairs) for d in data)
    assert len({tuple(d) for d in data}) == 3 and any(len(set(d)) < len(d) for d in data)
    assert data == AlignProRewardTrainer(cfg, pairs=reference_pairs()).member_train_pairs()  # seeded


# ---------------------------------------------------------------------------------------------- decoder + LoRA
@pytest.fixture(scope="module")
def tiny_llama_classifier(tmp_path_factory) -> str:
    return build_tiny_llama_classifier(tmp_path_factory.mktemp("tiny-llama-classifier"))


def test_decoder_with_lora_trains_saves_merged_and_reloads_without_peft(
    tiny_llama_classifier, tmp_path, monkeypatch
):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    probe = (["what is 1 ?", "what is 2 ?"], ["good answer with examples 1", "no 2"])
    seen = {}

    class Recording(PairRewardTrainer):
        def train(self, *args, **kwargs):  # scores of the trained LoRA model, before it is merged
            result = super().train(*args, **kwargs)
            ids = encode_pairs(self.processing_class, *probe, max_length=96, max_prompt_length=96)
            with torch.no_grad():
                self.model.eval()
                seen["scores"] = [self.model(input_ids=torch.tensor([x])).logits[0, 0].item() for x in ids]
                seen["trainable"] = sorted(n for n, p in self.model.named_parameters() if p.requires_grad)
            return result

    monkeypatch.setattr(reward_trainer, "PairRewardTrainer", Recording)
    cfg = config(
        tmp_path,
        tiny_llama_classifier,
        max_length=96,
        max_steps=4,
        learning_rate=5e-2,
        use_lora=True,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        freeze_layers=1,
    )
    AlignProRewardTrainer(cfg, pairs=reference_pairs()).train()
    out = tmp_path / "rm"
    # The LoRA went on the layer above the frozen one; PEFT's SEQ_CLS task kept the score head trainable.
    assert any("layers.1.self_attn.q_proj.lora_A" in n for n in seen["trainable"])
    assert not any("layers.0." in n for n in seen["trainable"])
    assert any("score" in n for n in seen["trainable"])
    assert manifest(out)["lora"]["layers_to_transform"] == [1]
    # A plain transformers folder: merged weights, no adapter files, no peft names.
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    saved = load_file(str(out / "model.safetensors"))
    assert not [k for k in saved if "lora" in k or "base_model.model" in k]
    base = load_file(str(Path(tiny_llama_classifier) / "model.safetensors"))
    assert torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(
        saved["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"]
    )
    assert not torch.equal(saved["score.weight"], base["score.weight"])
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    reward = RewardModel(str(out), max_length=96, max_prompt_length=96)
    # Pads with eos (the base had no pad token), as training did; scores as the trained LoRA model did.
    assert reward.tokenizer.pad_token == "<|im_end|>" == reward.tokenizer.eos_token
    assert model.config.pad_token_id == reward.tokenizer.eos_token_id
    assert reward(*probe) == pytest.approx(seen["scores"], abs=1e-5)
    assert len(set(seen["scores"])) == 2


# ---------------------------------------------------------------------------------------------- speed path
def test_prompt_grouped_order_is_a_seeded_permutation_of_batches_that_share_prompts():
    groups = [f"p{i % 7}" for i in range(62)]  # 7 prompts of 8 or 9 pairs
    lengths = [(i * 37) % 50 + 1 for i in range(62)]
    order = prompt_grouped_order(groups, lengths, batch_size=4, seed=3)
    assert sorted(order) == list(range(62))
    assert order == prompt_grouped_order(groups, lengths, batch_size=4, seed=3)
    assert order != prompt_grouped_order(groups, lengths, batch_size=4, seed=4)
    batches = [order[b : b + 4] for b in range(0, 62, 4)]
    # Each prompt's pairs fill whole batches (a batch straddles at most two prompts), sorted by length in each.
    assert all(len({groups[i] for i in batch}) <= 2 for batch in batches)
    assert sum(len({groups[i] for i in batch}) for batch in batches) <= 16 + 7
    for batch in batches:
        for g in {groups[i] for i in batch}:
            within = [lengths[i] for i in batch if groups[i] == g]
            assert within == sorted(within)
    assert len(batches[-1]) == 2  # the partial batch is last: the Trainer cuts the same batches
    sampler = PromptGroupedSampler(groups, lengths, batch_size=4, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)  # the Trainer calls it each epoch: a new order
    assert list(sampler) != first and sorted(sampler) == list(range(62)) and len(sampler) == 62


@pytest.mark.parametrize("multiple", [None, 8])
def test_the_dedup_collator_pads_as_trls_collator_and_indexes_every_slot(multiple):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    rows = [
        {"chosen_ids": [5, 6, 7], "rejected_ids": [9, 9]},
        {"chosen_ids": [5, 6], "rejected_ids": [9, 9]},  # the rejected answer of the first pair again
        {
            "chosen_ids": [1, 2, 3, 4, 5],
            "rejected_ids": [5, 6],
        },  # a chosen answer of another pair, rejected here
    ]
    trl_batch = DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=multiple)(rows)
    batch = DedupPreferenceCollator(0, multiple)(rows)
    assert batch["input_ids"].shape[0] == 4  # 6 slots, 4 distinct sequences
    assert batch["sequence_index"].tolist() == [0, 1, 2, 3, 3, 1]
    assert torch.equal(batch["input_ids"][batch["sequence_index"]], trl_batch["input_ids"])
    assert torch.equal(batch["attention_mask"][batch["sequence_index"]], trl_batch["attention_mask"])


def _plain_and_dedup_gradients(model_dir, tmp_path, freeze_layers: int):
    """Loss and gradients of one batch with shared answers: TRL's collator and loss against the dedup path."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = reference_pairs(n_prompts=2, per_prompt=3)
    prompts = [p.prompt for p in pairs]
    rows = [
        {"chosen_ids": c, "rejected_ids": r}
        for c, r in zip(
            encode_pairs(tokenizer, prompts, [p.chosen for p in pairs], max_length=32, max_prompt_length=16),
            encode_pairs(
                tokenizer, prompts, [p.rejected for p in pairs], max_length=32, max_prompt_length=16
            ),
            strict=True,
        )
    ]
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    results = {}
    for name, trainer_cls, collator in (
        ("plain", RewardTrainer, None),
        ("dedup", PairRewardTrainer, DedupPreferenceCollator(tokenizer.pad_token_id)),
    ):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        AlignProRewardTrainer._freeze(model, freeze_layers)
        args = AlignProRewardConfig(output_dir=str(tmp_path / name), **TINY)
        trainer = trainer_cls(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=collator
        )
        batch = trainer.data_collator(rows)
        model.train()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (loss.item(), grads, batch["input_ids"].shape[0])
    return results


@pytest.mark.parametrize("freeze_layers", [0, 1])
def test_dedup_batches_give_the_loss_and_gradients_of_the_full_batch(
    tiny_encoder_dir, tmp_path, freeze_layers
):
    results = _plain_and_dedup_gradients(tiny_encoder_dir, tmp_path, freeze_layers)
    (plain_loss, plain_grads, plain_rows), (loss, grads, rows) = results["plain"], results["dedup"]
    assert (plain_rows, rows) == (12, 8)  # 6 pairs: 6 chosen + 2 distinct references
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_frozen_layers_leave_the_gradients_of_the_trainable_top_unchanged(tiny_encoder_dir, tmp_path):
    whole = _plain_and_dedup_gradients(tiny_encoder_dir, tmp_path, 0)["dedup"]
    frozen = _plain_and_dedup_gradients(tiny_encoder_dir, tmp_path, 1)["dedup"]
    assert frozen[0] == pytest.approx(whole[0], abs=1e-7)
    top = frozen[1]
    assert top and not any("layer.0." in n or "embeddings" in n for n in top)
    for name, grad in top.items():
        torch.testing.assert_close(grad, whole[1][name], atol=1e-7, rtol=1e-6, msg=name)


def test_group_by_prompt_trains_on_fewer_tokens(tiny_encoder_dir, tmp_path):
    def tokens_run(name, **kw):
        cfg = config(tmp_path, tiny_encoder_dir, name, max_steps=-1, num_train_epochs=1, **kw)
        AlignProRewardTrainer(cfg, pairs=reference_pairs()).train()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return max(r["num_tokens"] for r in rows if "num_tokens" in r), manifest(tmp_path / name)["steps"]

    (random_tokens, random_steps), (grouped_tokens, grouped_steps) = (
        tokens_run("random"),
        tokens_run("grouped", group_by_prompt=True),
    )
    assert random_steps == grouped_steps  # the same pairs, one pass
    assert grouped_tokens < 0.8 * random_tokens  # each prompt's reference answer runs once per batch


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"length_control": "input"}, "length_control='input' is unknown; accepted: 'none', 'penalty'"),
        ({"ensemble_size": 0}, "ensemble_size is a number of reward models: 1 .* got 0"),
        ({"ensemble_combine": "median"}, "ensemble_combine='median' is unknown; accepted: 'mean', 'min'"),
        ({"ensemble_split": "random"}, "ensemble_split='random' is unknown; accepted: 'shards', 'bootstrap'"),
        ({"ensemble_combine_k": -1.0}, "ensemble_combine_k is the k of mean − k·std: a finite number >= 0"),
        ({"length_matched_tolerance": 1.5}, r"length_matched_tolerance .* in \[0, 1\) .* got 1.5"),
        ({"max_eval_pairs": 0}, r"max_eval_pairs is None \(every held-out pair\) or >= 1, got 0"),
        ({"use_lora": True, "lora_r": 0}, "use_lora needs lora_r >= 1"),
        ({"use_lora": True, "lora_target_modules": []}, "use_lora needs lora_target_modules"),
    ],
)
def test_bad_reward_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        AlignProRewardConfig(output_dir=str(tmp_path), **options)


def test_lora_options_the_model_cannot_take_are_refused(tiny_encoder_dir, tiny_llama_classifier, tmp_path):
    pairs = reference_pairs()
    on_bert = config(tmp_path, tiny_encoder_dir, use_lora=True)  # q_proj...: Llama names; BERT's are query...
    with pytest.raises(ValueError, match=r"name no linear layer of BertForSequenceClassification.*'query'"):
        AlignProRewardTrainer(on_bert, pairs=pairs).train()
    too_deep = config(tmp_path, tiny_llama_classifier, use_lora=True, freeze_layers=2)
    with pytest.raises(
        ValueError, match="freeze_layers=2 with use_lora leaves no layer for the LoRA .*2 layers"
    ):
        AlignProRewardTrainer(too_deep, pairs=pairs).train()


def test_the_new_options_are_flags(tmp_path):
    from alignpro_plugins.cli import parse_stage_config

    cfg = parse_stage_config(
        "reward",
        [
            "--output_dir",
            str(tmp_path),
            "--length_control",
            "penalty",
            "--ensemble_size",
            "3",
            "--ensemble_combine",
            "mean-minus-std",
            "--group_by_prompt",
            "--use_lora",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
        ],
    )
    assert (cfg.length_control, cfg.ensemble_size, cfg.ensemble_combine) == ("penalty", 3, "mean-minus-std")
    assert cfg.group_by_prompt and cfg.use_lora and cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_retraining_in_place_drops_the_old_manifest_first(tiny_encoder_dir, tmp_path, monkeypatch):
    """A folder without its manifest is unfinished: a run killed while retraining never leaves the old one."""
    cfg = config(tmp_path, tiny_encoder_dir, length_control="penalty")
    AlignProRewardTrainer(cfg, pairs=reference_pairs()).train()
    assert (tmp_path / "rm" / REWARD_MANIFEST).exists()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PairRewardTrainer, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        AlignProRewardTrainer(cfg, pairs=reference_pairs()).train()
    assert not (tmp_path / "rm" / REWARD_MANIFEST).exists()
