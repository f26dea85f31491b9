"""Rewards r(x, y): a sequence-classification reward model, callables, and input validation."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from alignpro_plugins.manifest import weights_hash
from alignpro_plugins.rewards import (
    REWARD_MANIFEST,
    CallableReward,
    RewardModel,
    as_reward,
    encode_pairs,
)

PROMPTS = ["what is green tea", "write a python function", "list three examples", "explain the sea"]
ANSWERS = ["green tea is a tea .", "def f ( ) : return 1", "one , two , three", "the sea is long and good"]


@pytest.fixture(scope="module")
def reward_model(tiny_encoder_dir):
    return RewardModel(tiny_encoder_dir)


def manual_scores(rm: RewardModel, prompts, answers) -> list[float]:
    """One unpadded forward pass per pair, straight through the model."""
    out = []
    for ids in encode_pairs(
        rm.tokenizer, prompts, answers, max_length=rm.max_length, max_prompt_length=rm.max_prompt_length
    ):
        with torch.inference_mode():
            out.append(rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return out


def test_reward_model_scores_each_pair(reward_model):
    scores = reward_model(PROMPTS, ANSWERS)
    assert len(scores) == len(PROMPTS) and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scores == pytest.approx(manual_scores(reward_model, PROMPTS, ANSWERS), abs=1e-6)
    assert len(set(scores)) == len(scores)  # the tiny random head still tells the pairs apart
    weights = weights_hash(reward_model.path).removeprefix("sha256:")[:12]
    assert reward_model.identity == f"reward-model:{reward_model.path}@{weights}"


def test_reward_model_scores_do_not_depend_on_batching_or_order(tiny_encoder_dir, reward_model):
    one_by_one = RewardModel(tiny_encoder_dir, batch_size=1)
    assert one_by_one(PROMPTS, ANSWERS) == pytest.approx(reward_model(PROMPTS, ANSWERS), abs=1e-6)
    order = [2, 0, 3, 1]
    permuted = reward_model([PROMPTS[i] for i in order], [ANSWERS[i] for i in order])
    assert permuted == pytest.approx([reward_model(PROMPTS, ANSWERS)[i] for i in order], abs=1e-6)


def test_reward_model_batches_similar_lengths_and_keeps_input_order(tiny_encoder_dir):
    rm = RewardModel(tiny_encoder_dir, batch_size=2)
    answers = ["the sea is long and good and the sea is green", "yes", "one two three four five six", "no ."]
    widths: list[tuple[int, int]] = []
    hook = rm.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        scores = rm(PROMPTS, answers)
    finally:
        hook.remove()
    assert scores == pytest.approx(manual_scores(rm, PROMPTS, answers), abs=1e-6)
    lengths = sorted(
        len(x)
        for x in encode_pairs(rm.tokenizer, PROMPTS, answers, max_length=rm.max_length, max_prompt_length=96)
    )
    # The two short pairs share a batch and the two long ones the other: padding only to their own length.
    assert widths == [(2, lengths[1]), (2, lengths[3])]


def test_reward_model_reads_its_manifest_and_truncates(tiny_encoder_dir, tmp_path):
    folder = tmp_path / "reward"
    shutil.copytree(tiny_encoder_dir, folder)
    (folder / REWARD_MANIFEST).write_text(json.dumps({"max_length": 16, "max_prompt_length": 4}))
    rm = RewardModel(str(folder))
    assert (rm.max_length, rm.max_prompt_length) == (16, 4)
    assert RewardModel(str(folder), max_length=32).max_length == 32  # explicit arguments win
    long_prompt = "what is the health benefit of green tea for you and me"
    long_answer = " ".join(["good"] * 40)
    ids = encode_pairs(rm.tokenizer, [long_prompt], [long_answer], max_length=16, max_prompt_length=4)[0]
    assert len(ids) == 16
    # Only what survives truncation counts: a longer tail of the same answer scores the same.
    assert rm([long_prompt], [long_answer]) == pytest.approx(
        rm([long_prompt], [long_answer + " bad bad"]), abs=1e-6
    )
    # ... but the answer's head does.
    assert rm([long_prompt], ["bad " + long_answer]) != pytest.approx(
        rm([long_prompt], [long_answer]), abs=1e-6
    )


def test_reward_model_handles_inputs_longer_than_the_encoder(reward_model):
    huge = "tea " * 2000  # far beyond max_position_embeddings=512
    scores = reward_model([huge, "short"], [huge, ""])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


@pytest.mark.parametrize(("n_prompts", "n_answers"), [(2, 1), (1, 2), (0, 1)])
def test_length_mismatch_is_an_error(reward_model, n_prompts, n_answers):
    with pytest.raises(ValueError, match=f"{n_prompts} prompts but {n_answers} answers"):
        reward_model(PROMPTS[:n_prompts], ANSWERS[:n_answers])
    with pytest.raises(ValueError):
        reward_model.score(PROMPTS[:n_prompts], ANSWERS[:n_answers])
    fn = CallableReward(lambda ps, ys: [0.0] * len(ps))
    with pytest.raises(ValueError, match="prompts but"):
        fn(PROMPTS[:n_prompts], ANSWERS[:n_answers])


def test_empty_batch_scores_nothing(reward_model):
    assert reward_model([], []) == []
    assert CallableReward(lambda p, y: 1.0, batched=False)([], []) == []


def test_callable_reward_batched_and_per_pair():
    batched = CallableReward(
        lambda ps, ys: [len(y) - len(p) for p, y in zip(ps, ys, strict=True)], name="len"
    )
    assert batched(["ab", "a"], ["abcd", "a"]) == [2.0, 0.0]
    assert batched.identity == "callable:len"
    seen = []

    def per_pair(p, y):
        seen.append((p, y))
        return y.count("tea")

    single = CallableReward(per_pair, batched=False)
    assert single(["q1", "q2"], ["tea tea", "coffee"]) == [2.0, 0.0]
    assert seen == [("q1", "tea tea"), ("q2", "coffee")]  # scored against the original prompt x


def test_callable_reward_must_return_one_score_per_answer():
    with pytest.raises(ValueError, match="returned 1 scores for 2 answers"):
        CallableReward(lambda ps, ys: [1.0])(["a", "b"], ["c", "d"])
    with pytest.raises((TypeError, ValueError)):
        CallableReward(lambda ps, ys: ["not a number", 1.0])(["a", "b"], ["c", "d"])


def test_as_reward_coercion(tiny_encoder_dir, reward_model):
    assert as_reward(reward_model) is reward_model
    assert isinstance(as_reward(lambda ps, ys: [0.0] * len(ps)), CallableReward)
    from pathlib import Path

    assert isinstance(as_reward(Path(tiny_encoder_dir), batch_size=2), RewardModel)
    with pytest.raises(TypeError, match="reward"):
        as_reward(3.0)


@pytest.mark.real_models
def test_packaged_minilm_reward_model_loads_and_scores():
    rm = RewardModel("all-minilm-l6-v2")
    scores = rm(["Explain green tea."] * 2, ["Green tea is a lightly oxidised tea.", "I like trucks."])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]


# ---------------------------------------------------------------------------------------------- typed requests
def test_a_reward_scores_a_request_against_its_original_prompt(reward_model):
    """The target saw x' (a rewrite); the reward judges the answer against the user's x."""
    from alignpro_plugins.rewards import RewardFunction
    from alignpro_plugins.targets import TargetRequest

    requests = [TargetRequest(f"{x}\n\nAnswer in detail.", original=x) for x in PROMPTS]
    assert reward_model(requests, ANSWERS) == reward_model(PROMPTS, ANSWERS)
    seen = []
    fn = CallableReward(lambda prompts, answers: seen.extend(prompts) or [0.0] * len(prompts))
    fn([requests[0], "plain prompt"], ["a", "b"])
    assert seen == [PROMPTS[0], "plain prompt"]  # a plain string is its own original

    class NeedsContext(RewardFunction):  # a framework reward reads the context its requests carry
        identity = "needs-context"

        def score(self, prompts, answers):
            raise AssertionError("score_requests is the typed path")

        def score_requests(self, requests, answers):
            return [float(r.context["weight"]) for r in requests]

    assert NeedsContext()([TargetRequest("x'", original="x", context={"weight": 2})], ["y"]) == [2.0]
    with pytest.raises(TypeError, match="a target input is a str or a TargetRequest, got int"):
        reward_model([3], ["y"])


def test_targets_take_requests_beside_strings_and_answer_what_they_see(tmp_path):
    import asyncio

    from alignpro_plugins.targets import CallableTarget, FrozenTarget, TargetRequest

    echo = CallableTarget(lambda p: f"A:{p}", name="echo")
    rewrite = TargetRequest("x, in detail", original="x", context={"k": 1})
    assert echo.generate(["x", rewrite]) == ["A:x", "A:x, in detail"]
    assert asyncio.run(echo.agenerate([rewrite])) == ["A:x, in detail"]
    assert echo.stats.calls == 3

    class Typed(FrozenTarget):  # a target that reads the request, sync only: async runs it in a thread
        identity = "typed"

        def _answer(self, requests):
            return [f"{r.original}|{r.prompt}|{(r.context or {}).get('k')}" for r in requests]

        def _generate(self, prompts):
            raise AssertionError("a typed target answers requests")

    assert Typed().generate([rewrite, "y"]) == ["x|x, in detail|1", "y|y|None"]
    assert asyncio.run(Typed().agenerate([rewrite])) == ["x|x, in detail|1"]
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        echo.generate("x")
    with pytest.raises(TypeError, match="TargetRequest.prompt must be a str, got NoneType"):
        TargetRequest(None)  # type: ignore[arg-type]


def test_the_cache_keeps_a_plain_prompt_key_and_keys_context_apart(tmp_path):
    """Existing cache files stay valid: a plain prompt (or a request without context) has the key it always had."""
    import hashlib

    from alignpro_plugins.targets import CachedTarget, CallableTarget, TargetRequest

    calls = []
    inner = CallableTarget(lambda p: calls.append(p) or f"A:{p}", name="echo")
    cache = CachedTarget(inner, tmp_path / "cache.jsonl")
    old_key = hashlib.sha256(json.dumps(["callable:echo", {}, "x"], sort_keys=True).encode()).hexdigest()
    assert cache.key("x") == old_key == cache.key(TargetRequest("x", original="the user's x"))
    a, b = TargetRequest("x", context={"doc": 1}), TargetRequest("x", context={"doc": 2})
    assert len({cache.key("x"), cache.key(a), cache.key(b)}) == 3
    assert cache.generate(["x", TargetRequest("x", original="y"), a, b, a]) == ["A:x"] * 5
    assert calls == ["x", "x", "x"]  # x (with or without an original), then one call per context
    reread = CachedTarget(CallableTarget(lambda p: "new", name="echo"), tmp_path / "cache.jsonl")
    assert reread.generate(["x", a]) == ["A:x", "A:x"] and reread.stats.cache_hits == 2
