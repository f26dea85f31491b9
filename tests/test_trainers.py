"""The three stages on tiny models: they train, wire the reward and KL reference correctly, and resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil

import pytest
import torch

from alignpro_plugins.data import DataError
from alignpro_plugins.engine import Generation
from alignpro_plugins.prompter import Prompter
from trainers.kl_optimum_config import KLOptimumConfig
from trainers.kl_optimum_trainer import KLOptimumTrainer
from trainers.reward_config import AlignProRewardConfig
from trainers.reward_trainer import AlignProRewardTrainer, prompt_shard_of
from trainers.rl_config import AlignProRLConfig
from trainers.rl_trainer import AlignProRLTrainer
from trainers.sft_config import AlignProSFTConfig
from trainers.sft_trainer import AlignProSFTTrainer

PROMPTS = [
    "write a poem about the sea",
    "what are the benefits of green tea?",
    "explain python code",
    "list three numbers",
    "give two examples of good answers",
    "how do i write a function?",
]
TINY = dict(
    target_max_new_tokens=6,
    per_device_train_batch_size=2,
    report_to="none",
    save_steps=1000,
    logging_steps=1,
    disable_tqdm=True,
)


# RL on the tiny model: two samples of 6 tokens per prompt, a learning rate high enough to move the LoRA.
TINY_RL = dict(num_generations=2, max_completion_length=6, learning_rate=1e-2)


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}


def length_reward(prompts, answers):
    return [float(len(a)) for a in answers]


def recording_reward() -> tuple[list[str], object]:
    """A length reward, and the list of the prompts it scored answers against."""
    seen: list[str] = []

    def reward(prompts, answers):
        seen.extend(prompts)
        return length_reward(prompts, answers)

    return seen, reward


def test_sft_on_pairs_trains_lora(tiny_lm_dir, tmp_path):
    cfg = AlignProSFTConfig(output_dir=str(tmp_path / "sft"), base_model=tiny_lm_dir, max_steps=3, **TINY)
    trainer = AlignProSFTTrainer(cfg, pairs=[(p, "Answer in detail.") for p in PROMPTS])
    prompter = trainer.train()
    logs = [h for h in json.loads((tmp_path / "sft" / "alignpro.json").read_text())["provenance"]["stages"]]
    assert logs[-1]["stage"] == "sft" and logs[-1]["steps"] == 3
    assert (tmp_path / "sft" / "adapter_model.safetensors").exists()
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    # LoRA B starts at zero: a trained adapter has moved away from it.
    assert any(w.abs().sum() > 0 for n, w in _lora_weights(prompter.model).items() if "lora_B" in n)


def test_sft_bootstrap_keeps_best_candidate(tiny_lm_dir, tmp_path):
    cfg = AlignProSFTConfig(
        output_dir=str(tmp_path / "boot"),
        base_model=tiny_lm_dir,
        num_candidates=2,
        prompter_max_new_tokens=6,
        max_steps=1,
        **TINY,
    )
    # Reward = answer length; a callable target echoes its input, so the longest candidate input wins.
    trainer = AlignProSFTTrainer(cfg, prompts=PROMPTS[:3], target=lambda x: x, reward=length_reward)
    pairs = trainer.sft_pairs()
    rows = [json.loads(line) for line in (tmp_path / "boot" / "bootstrap.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 and len(rows) == 3
    for (x, chosen), row in zip(pairs, rows, strict=True):
        assert row["prompt"] == x
        usable = [c["reward"] for c in row["candidates"] if c["fallback"] is None or c["text"] == ""]
        assert row["reward"] == max(usable)
        assert chosen == row["target"]
        # Each candidate records what the target saw: with an echoing target and a length reward, its length.
        for c in row["candidates"]:
            assert c["reward"] == length_reward([x], [c["shown"]])[0]
            assert c["shown"] == x if c["fallback"] else c["shown"].startswith(x)
    assert trainer.bootstrap_stats["candidates_per_prompt"] == 2 + len(cfg.templates) + 1


def test_reward_stage_trains_and_reports_heldout_accuracy(tiny_encoder_dir, tmp_path):
    from alignpro_plugins.data import PreferencePair

    pairs = [
        PreferencePair(f"what is {i} ?", "a good detailed helpful answer with examples", "no")
        for i in range(40)
    ]
    cfg = AlignProRewardConfig(
        output_dir=str(tmp_path / "rm"),
        base_model=tiny_encoder_dir,
        max_steps=8,
        learning_rate=1e-3,
        eval_fraction=0.25,
        max_length=32,
        **{k: v for k, v in TINY.items() if k not in ("target_max_new_tokens",)},
    )
    trainer = AlignProRewardTrainer(cfg, pairs=pairs)
    held = {p.prompt for p in trainer.eval_pairs}
    assert held and held.isdisjoint({p.prompt for p in trainer.train_pairs})  # split by prompt
    before = trainer.train
    rm = before()
    meta = json.loads((tmp_path / "rm" / "alignpro_reward.json").read_text())
    assert meta["n_eval_pairs"] == len(trainer.eval_pairs)
    assert meta["heldout_pairwise_accuracy"] == pytest.approx(rm.meta["heldout_pairwise_accuracy"])
    assert meta["heldout_pairwise_accuracy"] > 0.5  # trivially separable pairs are learned


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = [p for p in folder.glob("*.safetensors")]
    return load_file(str(path))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_the_same_config_trains_the_same_reward_model(tiny_encoder_dir, tmp_path):
    """The score head is initialised before TRL's Trainer seeds anything: the stage seeds first."""
    from transformers import AutoModel, AutoTokenizer

    from alignpro_plugins.data import PreferencePair

    # A bare encoder (no score head saved), as sentence-embedding bases such as all-MiniLM-L6-v2 ship.
    base = str(tmp_path / "encoder")
    AutoModel.from_pretrained(tiny_encoder_dir).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(base)
    pairs = [PreferencePair(f"what is {i} ?", "a detailed answer with examples", "no") for i in range(24)]

    def run(name):
        cfg = AlignProRewardConfig(
            output_dir=str(tmp_path / name),
            base_model=base,
            max_steps=2,
            max_length=32,
            **{k: v for k, v in TINY.items() if k not in ("target_max_new_tokens",)},
        )
        torch.manual_seed(len(name))  # whatever the caller's RNG state, the stage starts from its own seed
        return AlignProRewardTrainer(cfg, pairs=pairs).train().meta["heldout_pairwise_accuracy"]

    assert run("a") == run("bb")
    _assert_same_tensors(_saved_tensors(tmp_path / "a"), _saved_tensors(tmp_path / "bb"))


def test_the_same_config_trains_the_same_sft_adapter(tiny_lm_dir, tmp_path):
    """The LoRA is initialised before TRL's Trainer seeds anything: the stage seeds first."""

    def run(name):
        cfg = AlignProSFTConfig(output_dir=str(tmp_path / name), base_model=tiny_lm_dir, max_steps=2, **TINY)
        torch.manual_seed(len(name))
        AlignProSFTTrainer(cfg, pairs=[(p, "Answer in detail.") for p in PROMPTS]).train()
        return _saved_tensors(tmp_path / name)

    _assert_same_tensors(run("a"), run("bb"))


def test_the_bootstrap_samples_the_same_candidates_from_its_seed(tiny_lm_dir, tmp_path):
    def candidates(name, global_seed):
        cfg = AlignProSFTConfig(
            output_dir=str(tmp_path / name),
            base_model=tiny_lm_dir,
            num_candidates=3,
            prompter_max_new_tokens=6,
            **TINY,
        )
        trainer = AlignProSFTTrainer(cfg, prompts=PROMPTS[:3], target=lambda x: x, reward=length_reward)
        torch.manual_seed(global_seed)
        return trainer.candidates(PROMPTS[:3])

    first = candidates("a", 1)
    assert candidates("b", 2) == first


def test_a_resumed_kl_optimum_run_ends_where_an_unbroken_one_does(sft_dir, tmp_path):
    """Each round samples from its own seed, so stopping after round 1 and resuming changes nothing."""

    def cfg(out, rounds, resume):
        return _kl_config(
            tmp_path,
            sft_dir,
            output_dir=str(tmp_path / out),
            rounds=rounds,
            resume=resume,
            num_generations=3,
            per_device_train_batch_size=3,
            prompts_per_round=3,
        )

    def train(c):
        torch.manual_seed(len(c.output_dir))
        KLOptimumTrainer(c, prompts=PROMPTS, target=lambda x: x, reward=length_reward).train()

    train(cfg("unbroken", 2, False))
    train(cfg("resumed", 1, False))
    train(cfg("resumed", 2, True))
    # Killed after logging round 2 but before its adapter was saved: resume runs round 2 again, and logs it once.
    train(cfg("killed", 2, False))
    shutil.rmtree(tmp_path / "killed" / "round-2")
    (tmp_path / "killed" / "round-2.partial").mkdir()  # what a kill during the save leaves
    train(cfg("killed", 2, True))
    for out in ("resumed", "killed"):
        _assert_same_tensors(_saved_tensors(tmp_path / "unbroken"), _saved_tensors(tmp_path / out))
    rows = {
        out: [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        for out in ("unbroken", "resumed", "killed")
    }
    for out in ("resumed", "killed"):
        assert [(r["step"], r["reward"]) for r in rows[out]] == [
            (r["step"], r["reward"]) for r in rows["unbroken"]
        ]
    assert not (tmp_path / "killed" / "round-2.partial").exists()


def _sft_config(tiny_lm_dir, out, max_steps, resume=False):
    return AlignProSFTConfig(
        output_dir=str(out),
        base_model=tiny_lm_dir,
        max_steps=max_steps,
        resume=resume,
        **{**TINY, "save_steps": 2},
    )


def _logged_steps(out) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_resume_skips_a_checkpoint_a_kill_cut_short(tiny_lm_dir, tmp_path, caplog):
    """A process killed while the Trainer saves leaves checkpoint-N without trainer_state.json (written last).
    Before: resume picked it and failed until someone deleted it; now it resumes from the last complete one."""
    pairs = [(p, "Be thorough.") for p in PROMPTS]
    out = tmp_path / "sft"
    AlignProSFTTrainer(_sft_config(tiny_lm_dir, out, 4), pairs=pairs).train()
    unbroken = _saved_tensors(out)
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # the kill came while checkpoint-4 was written
    with caplog.at_level(logging.WARNING, logger="trainers.common"):
        AlignProSFTTrainer(_sft_config(tiny_lm_dir, out, 4, resume=True), pairs=pairs).train()
    assert "skipping" in caplog.text and "checkpoint-4" in caplog.text  # the log says which one, and why
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert _logged_steps(out) == [1, 2, 3, 4]  # steps 3-4 ran again from checkpoint-2, each logged once
    _assert_same_tensors(unbroken, _saved_tensors(out))


def test_a_resumed_stage_logs_each_step_once(tiny_lm_dir, tmp_path):
    """Before: the metrics callback appended the rows of the steps a resumed run repeats a second time."""
    pairs = [(p, "Be thorough.") for p in PROMPTS]
    out = tmp_path / "sft"
    AlignProSFTTrainer(_sft_config(tiny_lm_dir, out, 3), pairs=pairs).train()
    shutil.rmtree(out / "checkpoint-3", ignore_errors=True)  # killed after logging step 3, before saving it
    assert _logged_steps(out) == [1, 2, 3] and (out / "checkpoint-2" / "trainer_state.json").exists()
    AlignProSFTTrainer(_sft_config(tiny_lm_dir, out, 4, resume=True), pairs=pairs).train()
    assert _logged_steps(out) == [1, 2, 3, 4]


def test_reward_shards_are_disjoint(tiny_encoder_dir, tmp_path):
    from alignpro_plugins.data import PreferencePair

    pairs = [PreferencePair(f"prompt {i}", "good", "bad") for i in range(60)]
    common = dict(base_model=tiny_encoder_dir, report_to="none")
    a = AlignProRewardTrainer(
        AlignProRewardConfig(output_dir=str(tmp_path / "a"), prompt_shard=0, **common), pairs=pairs
    )
    b = AlignProRewardTrainer(
        AlignProRewardConfig(output_dir=str(tmp_path / "b"), prompt_shard=1, split_seed=1, **common),
        pairs=pairs,
    )
    pa = {p.prompt for p in a.pairs}
    pb = {p.prompt for p in b.pairs}
    assert pa and pb and pa.isdisjoint(pb) and len(pa | pb) == 60
    assert all(prompt_shard_of(p, 2) == 0 for p in pa)


def test_reward_stage_never_trains_on_excluded_evaluation_prompts(tiny_encoder_dir, tmp_path):
    from alignpro_plugins.data import PreferencePair

    evaluation = tmp_path / "eval.json"
    evaluation.write_text(
        json.dumps(
            [
                {"instruction": "Summarise the text.", "context": "The  cat sat."},  # spacing differs
                {"instruction": "prompt 3", "context": ""},
            ]
        )
    )
    pairs = [PreferencePair(f"prompt {i}", "good", "bad") for i in range(10)]
    pairs.append(PreferencePair("Summarise the text.\n\nThe cat sat.", "good", "bad"))
    common = dict(base_model=tiny_encoder_dir, report_to="none", eval_fraction=0.2)
    trainer = AlignProRewardTrainer(
        AlignProRewardConfig(
            output_dir=str(tmp_path / "rm"), exclude_prompt_files=[str(evaluation)], **common
        ),
        pairs=pairs,
    )
    kept = {p.prompt for p in trainer.train_pairs + trainer.eval_pairs}
    assert trainer.n_excluded_pairs == 2
    assert kept == {f"prompt {i}" for i in range(10)} - {"prompt 3"}

    with pytest.raises(ValueError, match="exclude_prompt_files"):
        AlignProRewardTrainer(
            AlignProRewardConfig(
                output_dir=str(tmp_path / "x"), exclude_prompt_files=[str(evaluation)], **common
            ),
            pairs=[PreferencePair("prompt 3", "good", "bad")],
        )


def test_hh_dialogues_and_bad_rows(tmp_path):
    from alignpro_plugins.data import load_preferences

    good = tmp_path / "hh.jsonl"
    good.write_text(
        json.dumps(
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
                "rejected": "\n\nHuman: hi\n\nAssistant: go away",
            }
        )
        + "\n"
    )
    (pair,) = load_preferences(str(good))
    assert pair.prompt == "Human: hi" and pair.chosen == "hello there" and pair.rejected == "go away"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "y", "chosen": "", "rejected": "b"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, field 'chosen': empty text"):
        load_preferences(str(bad))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "a", "optimized_prompt": "b"}, {"instruction": "c"}]))
    from alignpro_plugins.data import load_prompt_pairs

    with pytest.raises(DataError, match=r"row 2, field 'optimized_prompt': missing field"):
        load_prompt_pairs(str(missing))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"prompt": 3}]))
    from alignpro_plugins.data import load_prompts

    with pytest.raises(DataError, match=r"row 1, field 'prompt': expected text, got int"):
        load_prompts(str(wrong))


@pytest.fixture
def sft_dir(tiny_lm_dir, tmp_path):
    cfg = AlignProSFTConfig(output_dir=str(tmp_path / "sft"), base_model=tiny_lm_dir, max_steps=2, **TINY)
    AlignProSFTTrainer(cfg, pairs=[(p, "Be thorough.") for p in PROMPTS]).train()
    return str(tmp_path / "sft")


def _rl_args(tmp_path, sft_dir, **kw) -> dict:
    """The prompter's RL stage on the tiny model: two samples of 6 tokens per prompt, a high learning rate."""
    return {"output_dir": str(tmp_path / "rl"), "sft_prompter": sft_dir, **TINY_RL, **TINY, **kw}


def _rl_config(tmp_path, sft_dir, **kw):
    return AlignProRLConfig(**_rl_args(tmp_path, sft_dir, **{"max_steps": 2, **kw}))


def _kl_config(tmp_path, sft_dir, **kw):
    return KLOptimumConfig(**_rl_args(tmp_path, sft_dir, **{"beta": 0.5, **kw}))


def test_rl_reward_is_r_of_x_and_target_of_rewrite(sft_dir, tmp_path):
    seen_target_inputs: list[str] = []
    seen_reward_prompts: list[str] = []

    def target(x: str) -> str:
        seen_target_inputs.append(x)
        return "ANSWER:" + x

    def reward(prompts, answers):
        seen_reward_prompts.extend(prompts)
        return [float(len(a)) for a in answers]

    trainer = AlignProRLTrainer(
        _rl_config(tmp_path, sft_dir), prompts=PROMPTS[:4], target=target, reward=reward
    )
    sft_weights = _lora_weights(trainer.prompter.model)
    trainer.train()
    assert set(seen_reward_prompts) <= set(PROMPTS[:4])  # scored against the ORIGINAL x
    # the target answered x' = x + guidance (augment mode) or x itself on fallback, never the bare query template
    assert all(any(t.startswith(x) for x in PROMPTS[:4]) for t in seen_target_inputs)
    moved = _lora_weights(trainer.prompter.model)
    assert any(not torch.equal(sft_weights[n], moved[n]) for n in sft_weights)


def test_rl_reference_is_the_sft_prompter(sft_dir, tmp_path):
    from transformers import TrainerCallback

    captured: dict[str, torch.Tensor] = {}

    class CaptureRef(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            captured.update({n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n})

    trainer = AlignProRLTrainer(
        _rl_config(tmp_path, sft_dir, beta=0.1),
        prompts=PROMPTS[:4],
        target=lambda x: x,
        reward=length_reward,
        callbacks=[CaptureRef()],
    )
    sft_weights = _lora_weights(trainer.prompter.model)
    trainer.train()
    assert captured, "GRPO kept no frozen 'ref' adapter"
    moved = _lora_weights(trainer.prompter.model)
    for name, ref in captured.items():
        key = name.replace(".ref.", ".default.")
        assert torch.equal(ref, sft_weights[key])  # the KL anchor is the SFT prompter ...
    assert any(not torch.equal(moved[k], sft_weights[k]) for k in sft_weights)  # ... while the policy moved


def test_rl_rejects_zero_beta(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        AlignProRLConfig(output_dir=str(tmp_path), beta=0.0, report_to="none")


def test_rl_resume_continues_step_count(sft_dir, tmp_path):
    cfg = _rl_config(tmp_path, sft_dir, max_steps=2, save_steps=2)
    AlignProRLTrainer(cfg, prompts=PROMPTS[:4], target=lambda x: x, reward=length_reward).train()
    assert (tmp_path / "rl" / "checkpoint-2").exists()
    cfg2 = _rl_config(tmp_path, sft_dir, max_steps=3, save_steps=10, resume=True)
    t2 = AlignProRLTrainer(cfg2, prompts=PROMPTS[:4], target=lambda x: x, reward=length_reward)
    t2.train()
    assert t2.trainer.state.global_step == 3
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    ]
    assert 3 in steps and steps.count(1) == 1  # the resumed run did not redo step 1


def test_rl_artifact_loads_as_prompter(sft_dir, tmp_path):
    from alignpro_plugins.lora import applied_lora

    AlignProRLTrainer(
        _rl_config(tmp_path, sft_dir), prompts=PROMPTS[:4], target=lambda x: x, reward=length_reward
    ).train()
    p = Prompter.from_pretrained(tmp_path / "rl", similarity=None)
    stages = [s["stage"] for s in p.manifest.provenance["stages"]]
    assert stages == ["sft", "rl"]
    # peft would save the frozen `ref` adapter in a ref/ subfolder; the artifact holds the trained one only.
    assert applied_lora(p.model) is not None and not (tmp_path / "rl" / "ref").exists()
    assert isinstance(p.rewrite("write a poem about the sea"), str)


def test_grpo_trains_as_trl_does_and_logs_where_step_time_goes(sft_dir, tmp_path):
    """The RL trainer is TRL's GRPO plus public hooks (a callback, the reward function, ``log``): the same
    adapter as a plain GRPOTrainer on the same inputs, and per-step times that add up."""
    from trl import GRPOTrainer

    from trainers.common import seed_stage

    def reward(prompts, answers):
        return [float(sum(map(ord, a)) % 7) for a in answers]  # varied, so the policy really moves

    def make(out):
        cfg = _rl_config(tmp_path, sft_dir, beta=0.1, output_dir=str(tmp_path / out))
        return AlignProRLTrainer(cfg, prompts=PROMPTS[:4], target=lambda x: "A:" + x, reward=reward)

    ours = make("ours")
    ours.train()
    plain = make("plain")
    seed_stage(plain.config)
    model, _ = plain.policy()
    plain.prompter.tokenizer.padding_side = "left"

    def alignpro_reward(prompts, completions, original, **kw):
        return plain.reward_fn(prompts, completions, original, **kw)

    GRPOTrainer(
        model=model,
        reward_funcs=[alignpro_reward],
        args=plain.config,
        train_dataset=plain.dataset(),
        processing_class=plain.prompter.tokenizer,
    ).train()
    trained, reference = _lora_weights(ours.prompter.model), _lora_weights(model)
    assert trained.keys() == reference.keys() and all(torch.equal(trained[n], reference[n]) for n in trained)
    rows = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        parts = ("prompter_generation_s", "target_s", "reward_s", "update_s")
        assert all(r[f"time/{p}"] >= 0 for p in parts) and r["time/prompter_generation_s"] > 0
        assert sum(r[f"time/{p}"] for p in parts) == pytest.approx(r["time/step_s"], abs=1e-6)


def test_rl_requests_carry_the_original_and_the_prompt_context(sft_dir, tmp_path):
    """Training prompts may be TargetRequests: their context reaches the target and the reward with every
    rewrite, and the reward scores against the original x (what a framework target such as a DSPy program needs)."""
    from alignpro_plugins.rewards import RewardFunction
    from alignpro_plugins.targets import FrozenTarget, TargetRequest

    answered: list[TargetRequest] = []
    scored: list[TargetRequest] = []

    class Target(FrozenTarget):
        identity = "recording"

        def _answer(self, requests):
            answered.extend(requests)
            return ["A:" + r.prompt for r in requests]

        def _generate(self, prompts):
            raise AssertionError("the RL scorer sends requests")

    class Reward(RewardFunction):
        identity = "recording"

        def score(self, prompts, answers):
            raise AssertionError("the RL scorer scores requests")

        def score_requests(self, requests, answers):
            scored.extend(requests)
            return [float(len(a)) for a in answers]

    docs = {x: i for i, x in enumerate(PROMPTS[:4])}
    prompts = [TargetRequest(x, context={"doc": i}) for x, i in docs.items()]
    trainer = AlignProRLTrainer(
        _rl_config(tmp_path, sft_dir), prompts=prompts, target=Target(), reward=Reward()
    )
    assert trainer.prompts == PROMPTS[:4]
    trainer.train()
    assert answered and scored
    for r in answered + scored:
        assert r.context == {"doc": docs[r.original]} and r.prompt.startswith(r.original)  # x' = x + guidance
    assert {(r.prompt, r.original) for r in scored} == {(r.prompt, r.original) for r in answered}


def test_the_rl_command_and_recipes_choose_the_algorithm(tmp_path):
    """`algorithm: kl-optimum` (YAML or flag) picks kl-optimum's own config; its options lost the kl_ prefix, and
    an old key says which name it has now."""
    import yaml

    from alignpro_plugins.cli import parse_stage_config
    from trainers.oracle_config import KLOptimumOracleConfig, RLHFOracleConfig

    assert type(parse_stage_config("rl", [], {"output_dir": "o"})) is AlignProRLConfig
    kl = parse_stage_config("rl", ["--rounds", "3"], {"output_dir": "o", "algorithm": "kl-optimum"})
    assert type(kl) is KLOptimumConfig and kl.rounds == 3
    flag = parse_stage_config(
        "rl", ["--algorithm", "kl-optimum", "--output_dir", "o", "--keep_best", "false"]
    )
    assert type(flag) is KLOptimumConfig
    recipe = tmp_path / "rl.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": "o", "algorithm": "kl-optimum", "validation_prompts": 4}))
    assert parse_stage_config("rl", ["--config", str(recipe)]).validation_prompts == 4
    assert type(parse_stage_config("oracle", [], {"output_dir": "o"})) is RLHFOracleConfig
    oracle = parse_stage_config("oracle", ["--algorithm=kl-optimum", "--output_dir", "o"])
    assert type(oracle) is KLOptimumOracleConfig
    with pytest.raises(ValueError, match=r"unknown config keys \['kl_rounds'\] \(did you mean rounds\?\)"):
        parse_stage_config("rl", [], {"output_dir": "o", "algorithm": "kl-optimum", "kl_rounds": 2})
    with pytest.raises(
        ValueError, match=r"unrecognized arguments: --kl_keep_best.*did you mean --keep_best\?"
    ):
        parse_stage_config("rl", ["--algorithm", "kl-optimum", "--output_dir", "o", "--kl_keep_best"])


def _oracle_args(tmp_path, target, **kw) -> dict:
    """The RLHF oracle on the tiny model: two answers of 6 tokens per prompt, a high learning rate."""
    tiny = {k: v for k, v in TINY.items() if k != "target_max_new_tokens"}  # the oracle has no frozen target
    return {"output_dir": str(tmp_path / "oracle"), "target": target, **TINY_RL, **tiny, **kw}


def test_oracle_tunes_the_target_itself(tiny_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.oracle_config import RLHFOracleConfig
    from trainers.oracle_trainer import train_oracle

    out = train_oracle(
        RLHFOracleConfig(**_oracle_args(tmp_path, tiny_lm_dir, max_steps=2, save_steps=1000)),
        prompts=PROMPTS[:2],
        reward=length_reward,
    )
    meta = json.loads((tmp_path / "oracle" / "alignpro_oracle.json").read_text())
    assert meta["steps"] == 2
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), out)
    assert any(torch.any(p != 0) for n, p in tuned.named_parameters() if "lora_B" in n)


def test_oracle_kl_optimum_distils_its_best_answers(tiny_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.oracle_config import KLOptimumOracleConfig
    from trainers.oracle_trainer import train_oracle

    seen: list[list[str]] = []

    def reward(prompts, answers):
        seen.append(list(prompts))
        return length_reward(prompts, answers)

    out = train_oracle(
        KLOptimumOracleConfig(
            **_oracle_args(
                tmp_path, tiny_lm_dir, rounds=2, num_generations=3, per_device_train_batch_size=3, beta=0.5
            )
        ),
        prompts=PROMPTS[:3],
        reward=reward,
    )
    meta = json.loads((tmp_path / "oracle" / "alignpro_oracle.json").read_text())
    assert meta["algorithm"] == "kl-optimum" and meta["steps"] == 2 * 3  # 9 draws / batch 3, two rounds
    # Each round scores K sampled answers + the greedy answer per prompt against the prompt itself.
    assert seen == [[x for x in PROMPTS[:3] for _ in range(3 + 1)]] * 2
    rows = [json.loads(line) for line in (tmp_path / "oracle" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # A random tiny model runs into the 6-token cap: those answers are distilled without EOS.
    assert all(r["cut_share"] > 0.5 for r in rows)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), out)
    assert any(torch.any(p != 0) for n, p in tuned.named_parameters() if "lora_B" in n)


def test_distillation_rows_end_their_turn_only_where_the_answer_ended(tiny_lm_dir):
    from transformers import AutoTokenizer

    from trainers.kl_optimum import tokenize_rows

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    chat = [{"role": "user", "content": "Name a fruit."}]
    rows = tokenize_rows(
        tok,
        [
            {"prompt": chat, "completion": [{"role": "assistant", "content": "A pear."}], "ended": True},
            {"prompt": chat, "completion": [{"role": "assistant", "content": "A pear, and"}], "ended": False},
            {"prompt": "Rewrite: tea", "completion": "Explain tea."},  # no flag: a finished completion
        ],
    )

    def text(ids):
        return tok.decode(ids, skip_special_tokens=False)

    def completion(row):
        return [i for i, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m]

    # A finished chat answer is exactly the chat template's rendering of the conversation, end of turn included.
    reply = [{"role": "assistant", "content": "A pear."}]
    assert text(rows[0]["input_ids"]) == tok.apply_chat_template([*chat, *reply], tokenize=False)
    assert tok.eos_token_id in completion(rows[0])
    # A cut answer stops where its text stops: no end of turn to learn.
    assert text(completion(rows[1])) == "A pear, and" and tok.eos_token_id not in completion(rows[1])
    assert completion(rows[2])[-1] == tok.eos_token_id and text(completion(rows[2])[:-1]) == "Explain tea."
    prompt_ids = tok(
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    for row in rows[:2]:  # the loss covers the completion only
        assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * (
            len(row["input_ids"]) - len(prompt_ids)
        )
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids


def test_kl_optimum_weights_and_kl():
    from trainers.kl_optimum import kl_to_proposal, sir_weights

    w = sir_weights([0.0, 1.0, 2.0], lam=1.0)
    assert w[2] > w[1] > w[0] and abs(sum(w) - 1) < 1e-9
    assert sir_weights([1.0, 1.0], lam=0.1) == [0.5, 0.5]  # no signal: the proposal itself
    assert kl_to_proposal([0.5, 0.5]) == pytest.approx(0.0)
    sharp = sir_weights([0.0, 1.0, 2.0], lam=0.01)
    assert sharp[2] == pytest.approx(1.0) and kl_to_proposal(sharp) == pytest.approx(math.log(3), rel=1e-3)


def test_kl_optimum_rl_distils_high_reward_rewrites(sft_dir, tmp_path):
    cfg = _kl_config(
        tmp_path,
        sft_dir,
        rounds=2,
        num_generations=3,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
    )
    trainer = KLOptimumTrainer(cfg, prompts=PROMPTS[:3], target=lambda x: x, reward=length_reward)
    sft_weights = _lora_weights(trainer.prompter.model)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["samples"] == 3 * (3 + 1)  # K samples + the deployed rewrite per prompt
        assert r["reward_resampled"] >= r["reward"] - 1e-9  # resampling favours high r
        assert math.isfinite(r["loss"]) and r["kl"] >= 0
    moved = _lora_weights(trainer.prompter.model)
    assert any(not torch.equal(sft_weights[n], moved[n]) for n in sft_weights)
    p = Prompter.from_pretrained(tmp_path / "rl", similarity=None)
    assert p.manifest.provenance["stages"][-1]["algorithm"] == "kl-optimum"
    # resume: both rounds done, nothing left to run
    again = KLOptimumTrainer(
        _kl_config(
            tmp_path,
            sft_dir,
            rounds=2,
            resume=True,
            num_generations=3,
            per_device_train_batch_size=3,
        ),
        prompts=PROMPTS[:3],
        target=lambda x: x,
        reward=length_reward,
    )
    again.train()
    assert again.target.stats.calls == 0  # both rounds were done: nothing ran again
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_kl_optimum_anchors_join_every_group(sft_dir, tmp_path):
    long_guidance = (
        "Please answer with many concrete details and examples, explain the reasoning behind "
        "each point, compare the main options, and finish with a short summary of the key ideas."
    )
    seen: list[str] = []

    def target(x):  # a callable target answers one prompt
        seen.append(x)
        return x

    cfg = _kl_config(
        tmp_path,
        sft_dir,
        beta=0.05,
        anchors=["", long_guidance],
    )
    KLOptimumTrainer(cfg, prompts=PROMPTS[:3], target=target, reward=length_reward).train()
    row = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["samples"] == 3 * (2 + 1 + 2)  # K samples + the deployed rewrite + 2 anchors per prompt
    for x in PROMPTS[:3]:  # each anchor reached the target composed with x; "" is x unchanged
        assert f"{x}\n\n{long_guidance}" in seen and x in seen
    assert row["anchor_share"] > 0.5  # the longest answer wins under a length reward at small λ


def test_kl_optimum_scores_the_deployed_rewrite_beside_the_samples(sft_dir, tmp_path, monkeypatch):
    import random

    from alignpro_plugins.manifest import GenerationDefaults
    from trainers import kl_optimum

    deployed = "Explain each point in detail with concrete examples and a short summary at the end."

    def generate(queries, settings, num_return_sequences=1):  # sampled: short; deployed: long
        texts = ["Be brief.", "Short."] if settings.do_sample else [deployed]
        return [[Generation(t, True, 1, 1) for t in texts[:num_return_sequences]] for _ in queries]

    cfg = _kl_config(tmp_path, sft_dir)
    trainer = KLOptimumTrainer(cfg, prompts=PROMPTS[:3], target=lambda x: x, reward=length_reward)
    monkeypatch.setattr(trainer.prompter.engine, "generate", generate)
    sampled = GenerationDefaults(max_new_tokens=6, do_sample=True)
    kw = dict(k=2, lam=0.05, settings=sampled, mode="augment", rng=random.Random(0))
    pairs, stats = kl_optimum.run_round(trainer.scorer, PROMPTS[:3], greedy=GenerationDefaults(), **kw)
    # The deployed rewrite was scored beside the 2 samples and, longest under a length reward, is what is distilled.
    assert stats["samples"] == 3 * (2 + 1) and stats["greedy_share"] > 0.9
    assert [y for _, y in pairs].count(deployed) == len(pairs) == 3 * 2
    assert stats["reward_greedy"] > stats["reward"]
    pairs, stats = kl_optimum.run_round(trainer.scorer, PROMPTS[:3], **kw)  # off: samples only
    assert stats["samples"] == 3 * 2 and "greedy_share" not in stats and deployed not in [y for _, y in pairs]
    cfg_off = _kl_config(tmp_path, sft_dir, include_greedy=False)
    assert cfg_off.include_greedy is False and cfg.include_greedy is True  # on by default


def test_kl_optimum_length_control_picks_better_answers_not_longer_ones(sft_dir, tmp_path, monkeypatch):
    import random

    from alignpro_plugins.manifest import GenerationDefaults
    from trainers import kl_optimum

    padded = "Please write at length, with many words, covering every side of it in turn, at great length."
    exact = "Be exact."
    samples = ["Add detail and more detail.", "Go.", "Expand on this a lot, please."]

    def generate(queries, settings, num_return_sequences=1):
        texts = (samples + [exact, padded])[:num_return_sequences]
        return [[Generation(t, True, 1, 1) for t in texts] for _ in queries]

    def reward(prompts, answers):  # a judge that counts words, plus a real bonus for exactness
        return [len(a.split()) + 8.0 * ("exact" in a) for a in answers]

    cfg = _kl_config(tmp_path, sft_dir, num_generations=5)
    trainer = KLOptimumTrainer(cfg, prompts=PROMPTS[:3], target=lambda x: x, reward=reward)
    monkeypatch.setattr(trainer.prompter.engine, "generate", generate)
    kw = dict(k=5, lam=0.05, settings=GenerationDefaults(max_new_tokens=6, do_sample=True), mode="augment")
    raw, stats = kl_optimum.run_round(trainer.scorer, PROMPTS[:3], rng=random.Random(0), **kw)
    assert [y for _, y in raw].count(padded) > 0.8 * len(raw)  # raw reward: the longest guidance wins
    assert stats["length_slope"] == pytest.approx(1.0, abs=0.3)
    lc, lc_stats = kl_optimum.run_round(
        trainer.scorer, PROMPTS[:3], rng=random.Random(0), length_control=1.0, **kw
    )
    assert [y for _, y in lc].count(exact) > 0.8 * len(lc)  # at equal length, the exact answer wins
    assert lc_stats["reward"] == stats["reward"]  # the logged reward stays the raw one
    with pytest.raises(ValueError, match="length_control is the share of the length effect removed: 0..1"):
        _kl_config(tmp_path, sft_dir, length_control=1.5)


def test_kl_optimum_validation_holds_prompts_out_and_keeps_the_best_round(sft_dir, tmp_path, monkeypatch):
    from trainers import kl_optimum

    originals, reward = recording_reward()
    cfg = _kl_config(tmp_path, sft_dir, rounds=2, prompts_per_round=2, validation_prompts=2, keep_best=True)
    trainer = KLOptimumTrainer(cfg, prompts=PROMPTS[:6], target=lambda x: x, reward=reward)
    assert trainer.prompts == PROMPTS[:4] and trainer.val_prompts == PROMPTS[4:6]  # the last n, held out
    sft_weights = _lora_weights(trainer.prompter.model)
    real = kl_optimum.deployed_reward
    scores = iter([0.5, 0.1, 0.3])  # SFT, round 1, round 2: the SFT prompter validates best

    def validate(scorer, prompts, settings, mode, **kw):
        assert list(prompts) == PROMPTS[4:6] and not settings.do_sample  # deployed rewrites of held-out x
        real(scorer, prompts, settings, mode, **kw)  # really scored, against the held-out prompts
        return next(scores)

    monkeypatch.setattr(kl_optimum, "deployed_reward", validate)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_reward"]) for r in rows] == [(0, 0.5), (1, 0.1), (2, 0.3)]
    # Rounds trained on prompts 0-3 only (K + deployed per prompt); validation scored prompts 4-5 three times.
    assert [x for x in originals if x not in PROMPTS[4:6]] == [x for x in PROMPTS[:4] for _ in range(3)]
    assert originals.count(PROMPTS[4]) == 3
    kept = _lora_weights(trainer.prompter.model)
    assert all(torch.equal(sft_weights[n], kept[n]) for n in sft_weights)  # round 0 = the SFT adapter
    p = Prompter.from_pretrained(tmp_path / "rl", similarity=None)
    assert p.manifest.provenance["stages"][-1]["selected_round"] == 0


def test_kl_optimum_validation_options_are_checked(sft_dir, tmp_path):
    with pytest.raises(ValueError, match="keep_best picks .* set validation_prompts > 0"):
        _kl_config(tmp_path, sft_dir, keep_best=True)
    cfg = _kl_config(tmp_path, sft_dir, validation_prompts=6)
    with pytest.raises(ValueError, match="validation_prompts=6 .* only 6"):
        KLOptimumTrainer(cfg, prompts=PROMPTS[:6], target=lambda x: x, reward=length_reward)


def test_kl_optimum_anchors_need_augment_mode(sft_dir, tmp_path):
    cfg = _kl_config(tmp_path, sft_dir, anchors=["Be thorough."], mode="rewrite")
    with pytest.raises(ValueError, match="anchors .* mode='augment'"):
        KLOptimumTrainer(cfg, prompts=PROMPTS[:2], target=lambda x: x, reward=length_reward).train()


def test_kl_optimum_rounds_take_fresh_prompts(sft_dir, tmp_path):
    originals, reward = recording_reward()
    cfg = _kl_config(tmp_path, sft_dir, rounds=2, prompts_per_round=2)
    KLOptimumTrainer(cfg, prompts=PROMPTS[:4], target=lambda x: x, reward=reward).train()
    # Round 1 scored prompts 0-1 and round 2 prompts 2-3, each K + 1 times, against the original prompt.
    assert originals == [x for x in PROMPTS[:4] for _ in range(2 + 1)]


def test_kl_optimum_too_few_prompts_for_fresh_rounds(sft_dir, tmp_path):
    cfg = _kl_config(tmp_path, sft_dir, rounds=3, prompts_per_round=2)
    with pytest.raises(ValueError, match=r"prompts_per_round=2 x rounds=3 needs 6 .* got 4"):
        KLOptimumTrainer(cfg, prompts=PROMPTS[:4], target=lambda x: x, reward=length_reward)


def test_kl_optimum_accepts_any_group_size_grpo_does_not(sft_dir, tmp_path):
    # GRPO needs the generation batch divisible by its group; kl-optimum samples K in its own batches.
    cfg = _kl_config(tmp_path, sft_dir, num_generations=3, per_device_train_batch_size=8)
    assert cfg.num_generations == 3
    for batch in (1, 3):  # odd batches, batch 1 included
        cfg = _kl_config(tmp_path, sft_dir, num_generations=4, per_device_train_batch_size=batch)
        assert (cfg.num_generations, cfg.per_device_train_batch_size) == (4, batch)
    with pytest.raises(ValueError, match="divisible by num_generations"):
        _rl_config(tmp_path, sft_dir, num_generations=3, per_device_train_batch_size=8)


def test_oracle_kl_optimum_resumes_after_its_last_round(tiny_lm_dir, tmp_path):
    from trainers.oracle_config import KLOptimumOracleConfig
    from trainers.oracle_trainer import train_oracle

    seen, reward = recording_reward()

    def cfg(rounds, resume):
        return KLOptimumOracleConfig(
            **_oracle_args(
                tmp_path,
                tiny_lm_dir,
                rounds=rounds,
                prompts_per_round=2,
                max_completion_length=4,
                beta=0.5,
                resume=resume,
                learning_rate=3e-5,
            )
        )

    train_oracle(cfg(1, False), prompts=PROMPTS[:4], reward=reward)
    assert (tmp_path / "oracle" / "round-1" / "adapter_model.safetensors").exists()
    seen.clear()
    train_oracle(cfg(2, True), prompts=PROMPTS[:4], reward=reward)
    assert seen == [x for x in PROMPTS[2:4] for _ in range(2 + 1)]  # only round 2 ran, on fresh prompts


# ---------------------------------------------------------------------------------------------- input checks
def test_each_algorithm_has_its_own_config_and_names_the_other():
    """GRPO and kl-optimum are two config classes (as TRL pairs its algorithms); each refuses the other's name
    with the way to get it, and neither carries the other's options."""
    from trainers.oracle_config import KLOptimumOracleConfig, RLHFOracleConfig

    pairs = [(AlignProRLConfig, KLOptimumConfig, "rl"), (RLHFOracleConfig, KLOptimumOracleConfig, "oracle")]
    for grpo, kl, command in pairs:
        with pytest.raises(
            ValueError,
            match=rf"algorithm='kl-optimum' has a config class of its own.*"
            rf"`alignpro {command} --algorithm kl-optimum --help`",
        ):
            grpo(output_dir="o", report_to="none", algorithm="kl-optimum")
        with pytest.raises(ValueError, match=r"algorithm='grpo' has a config class of its own"):
            kl(output_dir="o", report_to="none", algorithm="grpo")
        for cls in (grpo, kl):
            with pytest.raises(ValueError, match="algorithm must be 'grpo' or 'kl-optimum', got 'ppo'"):
                cls(output_dir="o", report_to="none", algorithm="ppo")
        grpo_fields = {f.name for f in dataclasses.fields(grpo)}
        kl_fields = {f.name for f in dataclasses.fields(kl)}
        assert not {"rounds", "prompts_per_round", "include_greedy"} & grpo_fields
        assert not {f for f in grpo_fields | kl_fields if f.startswith("kl_")}
        assert not {"loss_type", "epsilon", "scale_rewards"} & kl_fields  # GRPO's own options stay GRPO's
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        KLOptimumConfig(output_dir="o", report_to="none", rounds=0)
    with pytest.raises(ValueError, match="prompts_per_round must be >= 1 or None"):
        KLOptimumOracleConfig(output_dir="o", report_to="none", prompts_per_round=0)
    with pytest.raises(ValueError, match="num_generations .* must be >= 1"):
        KLOptimumConfig(output_dir="o", report_to="none", num_generations=0)


@pytest.mark.parametrize("enabled", [False, True])
def test_configs_set_checkpointing_without_the_deprecation_warning(enabled, tmp_path):
    """transformers 5 warns on every config that sets `gradient_checkpointing`; ours carry it over silently."""
    import warnings

    from trainers.oracle_config import KLOptimumOracleConfig, RLHFOracleConfig

    configs = (AlignProSFTConfig, AlignProRLConfig, KLOptimumConfig, AlignProRewardConfig, RLHFOracleConfig)
    for cls in (*configs, KLOptimumOracleConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cfg = cls(
                output_dir=str(tmp_path),
                report_to="none",
                gradient_checkpointing=enabled,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        assert cfg.gradient_checkpointing is enabled, cls.__name__
        assert getattr(cfg, "activation_checkpointing", enabled) is enabled, cls.__name__
        assert cfg.dataloader_pin_memory is torch.cuda.is_available(), cls.__name__  # torch warns on CPU


def test_oracle_beta_error_says_why_and_what_to_set(tmp_path):
    from trainers.oracle_config import RLHFOracleConfig

    with pytest.raises(
        ValueError, match=r"beta must be > 0, got 0.0: it is the KL penalty .* \(default 0.05\)"
    ):
        RLHFOracleConfig(output_dir=str(tmp_path), report_to="none", beta=0.0)


def test_target_url_without_model_name_is_refused_by_the_config(tmp_path):
    for cls in (AlignProRLConfig, AlignProSFTConfig):
        with pytest.raises(ValueError, match="target_base_url is set .* set `target_model_name`"):
            cls(output_dir=str(tmp_path), report_to="none", target_base_url="http://127.0.0.1:9/v1")
    cfg = AlignProRLConfig(
        output_dir=str(tmp_path),
        report_to="none",
        target_base_url="http://127.0.0.1:9/v1",
        target_model_name="served",
    )
    assert cfg.target_model_name == "served"


def test_trainers_name_a_missing_reward_before_loading_models(tmp_path):
    from trainers.oracle_config import RLHFOracleConfig
    from trainers.oracle_trainer import RLHFOracleTrainer

    nowhere = str(tmp_path / "nowhere")  # loading any model from here would fail differently
    rl = AlignProRLConfig(output_dir=str(tmp_path / "rl"), report_to="none", sft_prompter=nowhere)
    with pytest.raises(ValueError, match=r"RL needs a reward: set `reward_model` .* or pass reward="):
        AlignProRLTrainer(rl, prompts=PROMPTS)
    sft = AlignProSFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", base_model=nowhere)
    with pytest.raises(
        ValueError, match=r"SFT bootstrap \(no pairs_data\) needs a reward: set `reward_model`"
    ):
        AlignProSFTTrainer(sft, prompts=PROMPTS)
    with pytest.raises(ValueError, match="SFT needs pairs_data .* or prompts_data"):
        AlignProSFTTrainer(sft)
    oracle = RLHFOracleConfig(output_dir=str(tmp_path / "o"), report_to="none", target=nowhere)
    with pytest.raises(ValueError, match="the RLHF oracle needs a reward: set `reward_model`"):
        RLHFOracleTrainer(oracle, prompts=PROMPTS)


def _trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def test_freeze_layers_freezes_the_lower_layers_of_an_encoder(tiny_encoder_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_dir, num_labels=1)
    AlignProRewardTrainer._freeze(model, 1)
    layers = model.bert.encoder.layer
    assert not _trainable(model.bert.embeddings) and not _trainable(layers[0])
    assert _trainable(layers[1]) and _trainable(model.classifier)


def test_freeze_layers_on_a_decoder_keeps_its_upper_layers_and_head(tiny_lm_dir):
    """A decoder has no `.embeddings`: the whole model used to be frozen, so nothing trained."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_lm_dir, num_labels=1)
    AlignProRewardTrainer._freeze(model, 1)
    assert not _trainable(model.get_input_embeddings()) and not _trainable(model.model.layers[0])
    assert _trainable(model.model.layers[1]) and _trainable(model.score)
    with pytest.raises(
        ValueError, match=r"freeze_layers=3, but LlamaForSequenceClassification has 2 layers: use 0..2"
    ):
        AlignProRewardTrainer._freeze(model, 3)


def test_freeze_layers_refuses_a_model_it_cannot_freeze():
    class Flat(torch.nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1))

        def get_input_embeddings(self):
            return self.body[0]

    with pytest.raises(
        ValueError, match="freeze_layers=1: found no input embeddings and layer stack .* freeze_layers=0"
    ):
        AlignProRewardTrainer._freeze(Flat(), 1)

    class AllLayers(Flat):
        def __init__(self):
            super().__init__()
            self.body.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
            self.body[1].requires_grad_(False)  # as if the head were frozen already

    with pytest.raises(ValueError, match="freeze_layers=1 left nothing trainable"):
        AlignProRewardTrainer._freeze(AllLayers(), 1)


def test_lora_all_linear_from_the_cli_is_the_peft_keyword():
    from trainers.common import lora_config

    # The CLI turns `--lora_target_modules all-linear` into a one-item list; peft only expands the plain string.
    assert lora_config(8, 16, 0.0, ["all-linear"]).target_modules == "all-linear"
    assert set(lora_config(8, 16, 0.0, ["q_proj", "v_proj"]).target_modules) == {"q_proj", "v_proj"}


def test_training_target_sends_no_openai_key_to_another_host(monkeypatch, tmp_path):
    from trainers.common import build_target

    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-a-local-server")
    monkeypatch.setenv("MY_ENDPOINT_KEY", "local-key")
    base = dict(output_dir=str(tmp_path), target_base_url="http://127.0.0.1:9/v1", target_model_name="m")
    default = build_target(AlignProRLConfig(**base), str(tmp_path))
    named = build_target(AlignProRLConfig(**base, target_api_key_env="MY_ENDPOINT_KEY"), str(tmp_path))
    assert default.target._api_key == ""
    assert named.target._api_key == "local-key"


def test_neighbour_smoothing_recovers_what_suits_each_kind_of_prompt():
    from trainers import bootstrap_labels

    # Two kinds of prompt (embeddings along two axes); kind A is served best by candidate 0, kind B by 1. One
    # prompt of kind A has a noisy single answer that makes candidate 1 its own argmax.
    emb = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.05 * i] for i in range(8)] + [[0.05 * i, 1.0] for i in range(8)]), dim=-1
    ).double()
    rewards = torch.tensor([[1.0, 0.0]] * 8 + [[0.0, 1.0]] * 8, dtype=torch.float64)
    rewards[2] = torch.tensor([0.0, 1.5])
    order = bootstrap_labels.neighbour_order(emb)
    assert sorted(order[0].tolist()) == list(range(1, 16))  # every other prompt, never itself
    assert order[0, :7].tolist() == list(range(1, 8))  # its own kind first
    assert bootstrap_labels.smoothed_picks(rewards, order, 3) == [0] * 8 + [1] * 8
    # No smoothing keeps the noise; smoothing over everyone forgets the kinds.
    assert bootstrap_labels.smoothed_picks(rewards, order, 0)[2] == 1
    assert len(set(bootstrap_labels.smoothed_picks(rewards, order, 15))) == 1
    best, scores = bootstrap_labels.choose_neighbours(rewards, order, grid=(1, 3, 7, 15))
    # 3 and 7 tie at the top (the larger is kept); "all" loses by far more than its standard error.
    assert best == 7 and scores[3] == scores[7] > scores[15] and set(scores) == {1, 3, 7, 15}
    # Leave-one-out scores a pick with the reward of the prompt that did not make it.
    assert scores[3] == pytest.approx((7 * 1.0 + 0.0 + 8 * 1.0) / 16)


def test_leave_one_out_prefers_the_largest_neighbourhood_within_one_standard_error():
    from trainers import bootstrap_labels

    # No kinds at all: candidate 0 is better on average, every reward is noise around that. By chance N=2 scores
    # best by leave-one-out; its margin over "all" is inside the noise, so the larger neighbourhood is kept.
    g = torch.Generator().manual_seed(2)
    emb = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1).double()
    rewards = torch.randn(40, 3, generator=g, dtype=torch.float64)
    rewards[:, 0] += 0.3
    order = bootstrap_labels.neighbour_order(emb)
    chosen, scores = bootstrap_labels.choose_neighbours(rewards, order)
    assert max(scores, key=lambda k: scores[k]) == 2 and scores[2] > scores[39]
    diff = bootstrap_labels.leave_one_out_rewards(rewards, order, 2) - bootstrap_labels.leave_one_out_rewards(
        rewards, order, 39
    )
    assert scores[2] - scores[39] < float(diff.std()) / 40**0.5  # within one standard error
    assert chosen == 39


def test_sft_bootstrap_smoothed_targets_follow_the_neighbourhood_not_one_answer(
    tiny_lm_dir, tiny_encoder_dir, tmp_path
):
    from alignpro_plugins.guidance import GUIDANCE_LIBRARY

    favoured, noisy = GUIDANCE_LIBRARY[3], GUIDANCE_LIBRARY[4]

    def reward(prompts, answers):
        # The echoing target shows x + guidance: one text helps every prompt; another "wins" on one prompt only.
        return [
            2.0 if (noisy in a and p == PROMPTS[3]) else 1.0 if favoured in a else 0.0
            for p, a in zip(prompts, answers, strict=True)
        ]

    def targets(neighbours: int) -> tuple[list[str], dict]:
        cfg = AlignProSFTConfig(
            output_dir=str(tmp_path / f"boot{neighbours}"),
            base_model=tiny_lm_dir,
            num_candidates=0,
            bootstrap_neighbours=neighbours,
            bootstrap_embedding_model=tiny_encoder_dir,
            max_steps=1,
            **TINY,
        )
        trainer = AlignProSFTTrainer(cfg, prompts=PROMPTS, target=lambda x: x, reward=reward)
        return [y for _, y in trainer.sft_pairs()], trainer.bootstrap_stats

    own, stats = targets(0)
    assert own[3] == noisy and "neighbours" not in stats
    smoothed, stats = targets(len(PROMPTS) - 1)
    assert smoothed == [favoured] * len(PROMPTS)
    assert stats["neighbours"] == len(PROMPTS) - 1 and stats["neighbours_chosen_by"] == "config"
    chosen, stats = targets(-1)
    assert stats["neighbours_chosen_by"] == "leave-one-out"
    loo = stats["leave_one_out_reward"]
    assert loo[str(stats["neighbours"])] == max(loo.values())
    assert chosen == [favoured] * len(PROMPTS)  # only the noisy prompt's own answer pointed elsewhere


def test_bootstrap_neighbours_are_checked(tiny_lm_dir, tmp_path):
    with pytest.raises(
        ValueError, match="bootstrap_neighbours is 0 .off., a neighbourhood size N > 0, or -1"
    ):
        AlignProSFTConfig(output_dir=str(tmp_path / "x"), bootstrap_neighbours=-2, **TINY)
    cfg = AlignProSFTConfig(
        output_dir=str(tmp_path / "y"),
        base_model=tiny_lm_dir,
        num_candidates=0,
        include_templates=False,
        bootstrap_neighbours=2,
        max_steps=1,
        **TINY,
    )
    trainer = AlignProSFTTrainer(cfg, prompts=PROMPTS, target=lambda x: x, reward=length_reward)
    with pytest.raises(ValueError, match="needs at\\s+least two"):
        trainer.sft_pairs()


def test_sft_fit_check_reports_reproduction_and_warns_when_underfit(tiny_lm_dir, tmp_path, caplog):
    cfg = AlignProSFTConfig(
        output_dir=str(tmp_path / "under"),
        base_model=tiny_lm_dir,
        max_steps=1,
        learning_rate=1e-5,
        fit_check_prompts=4,
        **TINY,
    )
    with caplog.at_level("WARNING", logger="trainers.sft_trainer"):
        AlignProSFTTrainer(cfg, pairs=[(p, "Answer in detail.") for p in PROMPTS]).train()
    fit = json.loads((tmp_path / "under" / "alignpro.json").read_text())["provenance"]["stages"][-1][
        "fit_check"
    ]
    assert fit["prompts"] == 4 and fit["top_target_share"] == 1.0
    assert fit["reproduced"] == fit["top_target_reproduced"] == 0.0
    assert "emits it on only 0 of the 4 checked prompts" in caplog.text and "num_train_epochs" in caplog.text


T = "Answer in detail, with examples."


@pytest.mark.parametrize(
    ("targets", "emitted", "reproduced", "top_reproduced", "warns"),
    [
        # one text for every prompt, emitted on 3 of 4 checked prompts: below 80%, so it warns
        ([T] * 6, [T, T, T, "Answer briefly."], 0.75, 0.75, True),
        ([T] * 6, [f" {T} "] * 4, 1.0, 1.0, False),  # surrounding whitespace does not count against a match
        # diverse targets (BPO-style rewrites) are not expected verbatim: reported, no warning
        ([f"Rewrite number {i}." for i in range(6)], ["Something else."] * 4, 0.0, 0.0, False),
        # mostly one text plus one-off targets: the repeated text is reproduced, the one-offs are not; no warning
        ([T, "Give one example.", T, T, "Use a table.", T], [T, "Other.", T, "Other."], 0.5, 1.0, False),
    ],
)
def test_sft_fit_check_counts_exact_reproductions(
    tiny_lm_dir, tmp_path, caplog, targets, emitted, reproduced, top_reproduced, warns
):
    cfg = AlignProSFTConfig(
        output_dir=str(tmp_path / "fit"), base_model=tiny_lm_dir, fit_check_prompts=4, **TINY
    )
    pairs = list(zip(PROMPTS, targets, strict=True))
    trainer = AlignProSFTTrainer(cfg, pairs=pairs)
    seen: list[str] = []

    def deployed(queries, settings, n=1):
        assert settings.do_sample is False  # greedy, at the deployed length cap
        assert settings.max_new_tokens == trainer.prompter.manifest.generation.max_new_tokens
        seen.extend(queries)
        return [[Generation(emitted[len(seen) - len(queries) + i], True, 1, 1)] for i in range(len(queries))]

    trainer.prompter.engine.generate = deployed
    with caplog.at_level("WARNING", logger="trainers.sft_trainer"):
        fit = trainer.fit_check(pairs)
    assert fit["reproduced"] == reproduced and fit["top_target_reproduced"] == top_reproduced
    assert fit["prompts"] == 4 and fit["hit_max_new_tokens"] == 0.0
    # the checked prompts are spread over the training pairs, each formatted as the prompter sees it
    assert seen == [trainer.prompter.format_query(PROMPTS[i], cfg.mode) for i in (0, 1, 3, 4)]
    assert ("fit check" in caplog.text) is warns


def test_sft_fit_check_counts_guard_fallbacks_and_the_length_cap(tiny_lm_dir, tmp_path, caplog):
    cfg = AlignProSFTConfig(
        output_dir=str(tmp_path / "fit"), base_model=tiny_lm_dir, fit_check_prompts=2, **TINY
    )
    pairs = [(p, T) for p in PROMPTS[:4]]
    trainer = AlignProSFTTrainer(cfg, pairs=pairs)
    # Output cut mid-sentence at the token limit: the guard falls back (the prompt passes through): no match.
    trainer.prompter.engine.generate = lambda queries, settings, n=1: [
        [Generation("Answer in detail, with", False, 1, 1)] for _ in queries
    ]
    with caplog.at_level("WARNING", logger="trainers.sft_trainer"):
        fit = trainer.fit_check(pairs)
    assert fit["hit_max_new_tokens"] == 1.0 and fit["reproduced"] == 0.0
    assert "2 of 2 hit max_new_tokens" in caplog.text
    assert trainer.fit_check([]) is None


def test_sft_fit_check_can_be_skipped_and_rejects_negative_counts(tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="fit_check_prompts is a number of prompts >= 0"):
        AlignProSFTConfig(
            output_dir=str(tmp_path / "x"), base_model=tiny_lm_dir, fit_check_prompts=-1, **TINY
        )
    cfg = AlignProSFTConfig(
        output_dir=str(tmp_path / "skip"), base_model=tiny_lm_dir, max_steps=1, fit_check_prompts=0, **TINY
    )
    AlignProSFTTrainer(cfg, pairs=[(p, "Answer in detail.") for p in PROMPTS]).train()
    stage = json.loads((tmp_path / "skip" / "alignpro.json").read_text())["provenance"]["stages"][-1]
    assert stage["fit_check"] is None


def test_kl_optimum_early_stopping_ends_rounds_without_a_validation_gain(sft_dir, tmp_path, monkeypatch):
    from trainers import kl_optimum

    cfg = _kl_config(
        tmp_path,
        sft_dir,
        rounds=4,
        prompts_per_round=None,  # every round reuses the 4 training prompts
        validation_prompts=2,
        early_stopping_patience=2,
    )
    trainer = KLOptimumTrainer(cfg, prompts=PROMPTS[:6], target=lambda x: x, reward=length_reward)
    # SFT 0.5; round 1 gains (0.6); rounds 2 and 3 do not beat 0.6 (a tie is no gain): stop before round 4.
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.9])
    monkeypatch.setattr(kl_optimum, "deployed_reward", lambda *a, **kw: next(scores))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_reward"]) for r in rows] == [(0, 0.5), (1, 0.6), (2, 0.6), (3, 0.55)]
    assert (tmp_path / "rl" / "round-3").exists() and not (tmp_path / "rl" / "round-4").exists()
    stage = json.loads((tmp_path / "rl" / "alignpro.json").read_text())["provenance"]["stages"][-1]
    assert stage["early_stopped_after_round"] == 3 and stage["steps"] == 3


def test_kl_optimum_early_stopping_needs_validation(sft_dir, tmp_path):
    with pytest.raises(ValueError, match="early_stopping_patience stops on the validation reward"):
        _kl_config(tmp_path, sft_dir, early_stopping_patience=1)
    with pytest.raises(ValueError, match="early_stopping_patience is a number of rounds >= 0"):
        _kl_config(tmp_path, sft_dir, validation_prompts=2, early_stopping_patience=-1)
