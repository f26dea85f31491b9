"""Rewards r(x, y): a sequence-classification reward model (encoder or decoder), ensembles, length control,
callables, and input validation."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from alignpro_plugins.manifest import weights_hash
from alignpro_plugins.reward_ensemble import RewardEnsemble
from alignpro_plugins.rewards import (
    ENSEMBLE_KIND,
    REWARD_MANIFEST,
    CallableReward,
    RewardModel,
    as_reward,
    encode_pairs,
    load_reward,
    prompt_digest,
    prompts_trained_on,
)
from alignpro_plugins.testing import build_tiny_encoder, build_tiny_llama_classifier

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


# ---------------------------------------------------------------------------------------------- ensembles
def fixed(name: str, table: dict[str, float], calls: list[str] | None = None) -> CallableReward:
    """A member whose score of each answer is known in advance (and that counts its calls)."""

    def fn(prompts, answers):
        if calls is not None:
            calls.append(name)
        return [table[a] for a in answers]

    return CallableReward(fn, name=name)


KNOWN = {  # answer -> the three members' scores
    "y1": (1.0, 3.0, 2.0),  # mean 2, population std sqrt(2/3)
    "y2": (4.0, 0.0, 2.0),  # mean 2, population std sqrt(8/3)
    "y3": (5.0, 5.0, 5.0),  # all agree
}


def known_members(calls: list[str] | None = None) -> list[CallableReward]:
    return [fixed(f"m{j}", {a: s[j] for a, s in KNOWN.items()}, calls) for j in range(3)]


@pytest.mark.parametrize(
    ("combine", "k", "expected"),
    [
        ("mean", 1.0, [2.0, 2.0, 5.0]),
        ("min", 1.0, [1.0, 0.0, 5.0]),
        ("mean-minus-std", 1.0, [2 - math.sqrt(2 / 3), 2 - math.sqrt(8 / 3), 5.0]),
        ("mean-minus-std", 0.5, [2 - 0.5 * math.sqrt(2 / 3), 2 - 0.5 * math.sqrt(8 / 3), 5.0]),
    ],
)
def test_ensemble_combines_members_per_answer(combine, k, expected):
    ensemble = RewardEnsemble(known_members(), combine, k)
    answers = ["y1", "y2", "y3"]
    assert ensemble(["x"] * 3, answers) == pytest.approx(expected)
    assert ensemble.disagreement(["x"] * 3, answers) == pytest.approx(
        [math.sqrt(2 / 3), math.sqrt(8 / 3), 0.0]
    )
    assert ensemble.member_scores(["x"] * 3, answers) == [[1.0, 4.0, 5.0], [3.0, 0.0, 5.0], [2.0, 2.0, 5.0]]


def test_score_with_spread_scores_each_member_once_and_agrees_with_the_separate_calls():
    calls: list[str] = []
    ensemble = RewardEnsemble(known_members(calls), "mean-minus-std")
    both = ensemble.score_with_spread(["x", "x"], ["y2", "y1"])
    assert calls == ["m0", "m1", "m2"]  # one pass, members in order
    assert both.scores == pytest.approx(ensemble(["x", "x"], ["y2", "y1"]))
    assert both.disagreement == pytest.approx(ensemble.disagreement(["x", "x"], ["y2", "y1"]))
    assert both.member_scores == [[4.0, 1.0], [0.0, 3.0], [2.0, 2.0]]
    assert ensemble.score_with_spread([], []).scores == []
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        ensemble.score_with_spread(["x", "x"], ["y1"])


def test_ensemble_members_may_be_plain_callables_and_get_the_requests():
    from alignpro_plugins.targets import TargetRequest

    seen = []
    ensemble = RewardEnsemble(
        [lambda ps, ys: seen.extend(ps) or [len(y) for y in ys], lambda ps, ys: [1.0] * len(ys)], "min"
    )
    assert ensemble([TargetRequest("x, rewritten", original="x"), "z"], ["abc", ""]) == [1.0, 0.0]
    assert seen == ["x", "z"]  # scored against the original prompt


def test_member_scale_standardises_before_the_rule():
    # Member 1 is member 0 shifted by +10: raw "min" would always follow member 0; on z-scores they agree.
    members = [
        fixed("a", {"y1": 1.0, "y2": 3.0}),
        fixed("b", {"y1": 11.0, "y2": 13.0}),
    ]
    raw = RewardEnsemble(members, "mean-minus-std")
    assert raw.disagreement(["x", "x"], ["y1", "y2"]) == pytest.approx(
        [5.0, 5.0]
    )  # the offset, not a disagreement
    scale = raw.fit_member_scale(["x", "x"], ["y1", "y2"])
    assert scale == [{"mean": 2.0, "std": 1.0}, {"mean": 12.0, "std": 1.0}]
    scaled = RewardEnsemble(members, "mean-minus-std", member_scale=scale)
    assert scaled.member_scores(["x", "x"], ["y1", "y2"]) == [[-1.0, 1.0], [-1.0, 1.0]]
    assert scaled.disagreement(["x", "x"], ["y1", "y2"]) == [0.0, 0.0]
    assert scaled(["x", "x"], ["y1", "y2"]) == [-1.0, 1.0]
    assert scaled.identity != raw.identity
    with pytest.raises(ValueError, match="same score"):
        RewardEnsemble([fixed("c", {"y": 1.0})]).fit_member_scale(["x", "x"], ["y", "y"])


@pytest.mark.parametrize(
    ("scale", "k", "message"),
    [
        (
            [{"mean": 0.0, "std": 1.0}],
            1.0,
            r"member_scale must be one \{\"mean\": m, \"std\": s > 0\} per member \(3\)",
        ),
        ([{"mean": 0.0, "std": 0.0}] * 3, 1.0, "member_scale must be"),
        ([{"mean": "0", "std": 1.0}] * 3, 1.0, "member_scale must be"),
        (None, -1.0, "combine_k must be a finite number >= 0, got -1.0"),
        (None, float("nan"), "combine_k must be a finite number"),
    ],
)
def test_ensemble_settings_are_checked(scale, k, message):
    with pytest.raises(ValueError, match=message):
        RewardEnsemble(known_members(), "mean-minus-std", k, member_scale=scale)


def test_ensemble_rules_and_members_are_checked():
    with pytest.raises(
        ValueError, match="combine='median' is unknown; accepted: 'mean', 'min', 'mean-minus-std'"
    ):
        RewardEnsemble(known_members(), "median")
    with pytest.raises(ValueError, match="non-empty list of member rewards"):
        RewardEnsemble([])
    with pytest.raises(TypeError, match="A reward must be"):
        RewardEnsemble([3.0])


def test_ensemble_identity_is_its_members_and_rule():
    def ident(members, combine="mean", k=1.0):
        return RewardEnsemble(members, combine, k).identity

    a, b = known_members()[:2]
    assert ident([a, b]) == "reward-ensemble:mean[callable:m0,callable:m1]"
    assert (
        ident([a, b], "mean-minus-std", 0.5)
        == "reward-ensemble:mean-minus-std(k=0.5)[callable:m0,callable:m1]"
    )
    identities = {
        ident([a, b]),
        ident([b, a]),
        ident([a]),
        ident([a, b], "min"),
        ident([a, b], "mean-minus-std"),
        ident([a, b], "mean-minus-std", 2.0),
    }
    assert len(identities) == 6
    assert ident([a, b], "mean", 2.0) == ident([a, b])  # k is no part of the mean


def save_ensemble(root, members: dict[str, str], **manifest) -> str:
    """An ensemble folder: copies of the given reward-model folders and an alignpro_reward.json."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in members.items():
        shutil.copytree(source, root / name)
    (root / REWARD_MANIFEST).write_text(
        json.dumps({"kind": ENSEMBLE_KIND, "members": list(members), "combine": "mean", **manifest})
    )
    return str(root)


def sharp_encoder(folder, seed: int) -> str:
    """A tiny encoder whose head is scaled up: its scores of different answers differ by far more than float noise."""
    from transformers import AutoModelForSequenceClassification

    build_tiny_encoder(folder, seed=seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
    with torch.no_grad():
        model.classifier.weight.mul_(1000.0)
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def member_dirs(tmp_path_factory):
    return [sharp_encoder(tmp_path_factory.mktemp(f"sharp-encoder-{seed}"), seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, member_dirs):
    root = tmp_path_factory.mktemp("ensemble") / "reward"
    folder = save_ensemble(
        root, {"member-0": member_dirs[0], "member-1": member_dirs[1]}, combine="min", metrics={"a": 1}
    )
    for j, digests in enumerate([[prompt_digest(PROMPTS[0])], [prompt_digest(PROMPTS[1])]]):
        (root / f"member-{j}" / REWARD_MANIFEST).write_text(json.dumps({"train_prompt_digests": digests}))
    return folder


def test_load_reward_opens_an_ensemble_folder_and_combines_its_members(ensemble_dir):
    from pathlib import Path

    ensemble = load_reward(ensemble_dir)
    assert isinstance(ensemble, RewardEnsemble) and isinstance(as_reward(Path(ensemble_dir)), RewardEnsemble)
    assert (ensemble.combine, ensemble.path, ensemble.meta["metrics"]) == ("min", ensemble_dir, {"a": 1})
    members = [RewardModel(f"{ensemble_dir}/member-{j}") for j in range(2)]
    rows = [m(PROMPTS, ANSWERS) for m in members]
    assert rows[0] != pytest.approx(rows[1], abs=1e-6)  # two different reward models
    assert ensemble(PROMPTS, ANSWERS) == pytest.approx([min(c) for c in zip(*rows, strict=True)], abs=1e-6)
    for row, expected in zip(ensemble.member_scores(PROMPTS, ANSWERS), rows, strict=True):
        assert row == pytest.approx(expected, abs=1e-6)
    assert ensemble.identity == f"reward-ensemble:min[{members[0].identity},{members[1].identity}]"
    # A folder without an ensemble manifest is one reward model, as before.
    assert isinstance(load_reward(f"{ensemble_dir}/member-0"), RewardModel)
    # The ensemble has seen a prompt when any member trained on it.
    assert prompts_trained_on(ensemble, PROMPTS) == 2
    assert prompts_trained_on(RewardEnsemble(known_members()), PROMPTS) is None


def test_an_ensemble_with_a_member_that_records_no_digests_has_seen_unknown_prompts():
    seen, unknown = known_members()[:2]
    seen.meta = {"train_prompt_digests": [prompt_digest(PROMPTS[0])]}  # type: ignore[attr-defined]
    assert (
        prompts_trained_on(RewardEnsemble([seen, unknown]), PROMPTS) is None
    )  # not "1": unknown's are unknown
    unknown.meta = {"train_prompt_digests": [prompt_digest(PROMPTS[1])]}  # type: ignore[attr-defined]
    assert prompts_trained_on(RewardEnsemble([seen, unknown]), PROMPTS) == 2


def test_keyword_arguments_reach_every_member(ensemble_dir):
    ensemble = load_reward(ensemble_dir, batch_size=3, max_length=12)
    assert [(m.batch_size, m.max_length) for m in ensemble.members] == [(3, 12), (3, 12)]  # type: ignore[attr-defined]


def test_retry_gate_takes_an_ensemble_folder(ensemble_dir):
    from alignpro_plugins.gate import RetryGate

    ensemble = load_reward(ensemble_dir)
    first = ensemble(PROMPTS, ANSWERS)
    gate = RetryGate.for_budget(ensemble_dir, PROMPTS, ANSWERS, 0.5)
    assert isinstance(gate.reward, RewardEnsemble) and gate.reward.identity == ensemble.identity
    assert sum(gate.wants_retry(s) for s in first) == 2  # the threshold sits on the ensemble's scores
    retried = ["the sea is long and good"] * len(PROMPTS)
    results = RetryGate(ensemble_dir, gate.threshold).choose(
        PROMPTS,
        PROMPTS,
        lambda inputs: ANSWERS if inputs == PROMPTS else retried[: len(inputs)],
        lambda positions: [["again"] for _ in positions],
    )
    assert [r.decision.first_score for r in results] == pytest.approx(first, abs=1e-4)
    second = ensemble(PROMPTS, retried)
    kept = [0 if a >= gate.threshold or a >= b else 1 for a, b in zip(first, second, strict=True)]
    assert [r.kept for r in results] == kept
    # Only the two answers the ensemble scores below the threshold were asked again.
    assert [len(r.candidates) == 2 for r in results] == [gate.wants_retry(a) for a in first]


def test_the_guidance_search_loads_an_ensemble_folder_as_its_reward(ensemble_dir, tmp_path):
    from statistics import fmean

    from trainers.guidance_search_config import GuidanceSearchConfig
    from trainers.guidance_search_trainer import GuidanceSearchTrainer

    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]
    config = GuidanceSearchConfig(
        output_dir=str(tmp_path / "search"),
        reward_model=ensemble_dir,
        seed_texts=["give examples .", "please be short ."],
        recombine=False,
        min_prompts=4,
        validation_prompts=0,
    )
    result = GuidanceSearchTrainer(config, prompts=prompts, target=lambda x: x).search()
    ensemble = load_reward(ensemble_dir)
    single = RewardModel(f"{ensemble_dir}/member-0")
    no_change = next(c for c in result.candidates if c["text"] == "")
    # The echoing target answers x itself: "no change" scored every prompt by the ensemble.
    assert no_change["mean"] == pytest.approx(fmean(ensemble(prompts, prompts)), abs=1e-6)
    assert no_change["mean"] != pytest.approx(fmean(single(prompts, prompts)), abs=1e-6)
    assert result.provenance["reward_model"] == ensemble_dir


def test_reward_entry_points_open_folders_through_as_reward_or_load_reward():
    """Every place that takes a reward path goes through load_reward, so an ensemble folder works anywhere."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("alignpro_plugins/**/*.py"), *root.glob("trainers/*.py")]
    direct = [
        f"{p.relative_to(root)}:{n}"
        for p in sources
        if p.name not in ("rewards.py", "reward_ensemble.py")  # the loaders themselves
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\bRewardModel\(", line)
    ]
    # The reward stage opens the one model it has just trained; nothing else builds a RewardModel directly.
    assert all(d.startswith("trainers/reward_") for d in direct), direct


@pytest.mark.parametrize(
    ("manifest", "members", "message"),
    [
        (
            {"combine": "median"},
            ["member-0"],
            "combine='median' is unknown; accepted: 'mean', 'min', 'mean-minus-std'",
        ),
        ({"members": []}, [], r"'members' must be a non-empty list of member folders relative to"),
        ({"members": None}, [], r"'members' must be a non-empty list"),
        ({"members": ["member-0", "gone"]}, ["member-0"], r"member folder\(s\) \['gone'\] missing under"),
        ({"members": ["member-0", "member-0"]}, ["member-0"], "names a folder twice"),
        ({"combine_k": -2}, ["member-0"], "combine_k must be a finite number >= 0"),
        ({"member_scale": [{"mean": 0}]}, ["member-0"], "member_scale must be"),
    ],
)
def test_a_bad_ensemble_manifest_is_a_clear_error(tmp_path, tiny_encoder_dir, manifest, members, message):
    folder = save_ensemble(tmp_path / "ens", {m: tiny_encoder_dir for m in members})
    meta = json.loads((tmp_path / "ens" / REWARD_MANIFEST).read_text())
    (tmp_path / "ens" / REWARD_MANIFEST).write_text(json.dumps({**meta, **manifest}))
    with pytest.raises(ValueError, match=message) as info:
        load_reward(folder)
    assert folder in str(info.value)  # names the folder


def test_ensemble_folder_errors_name_what_is_wrong(tmp_path, tiny_encoder_dir, ensemble_dir):
    inner = save_ensemble(tmp_path / "nested", {"member-0": tiny_encoder_dir})
    shutil.copytree(ensemble_dir, tmp_path / "nested" / "inner")
    (tmp_path / "nested" / REWARD_MANIFEST).write_text(
        json.dumps({"kind": ENSEMBLE_KIND, "members": ["member-0", "inner"]})
    )
    with pytest.raises(ValueError, match=r"member\(s\) \['inner'\] are ensembles themselves"):
        load_reward(inner)
    with pytest.raises(ValueError, match="is a reward ensemble .* open it with load_reward"):
        RewardModel(ensemble_dir)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / REWARD_MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/alignpro_reward.json is not valid JSON"):
        load_reward(str(tmp_path / "broken"))


# ---------------------------------------------------------------------------------------------- length control
def with_manifest(tmp_path, source: str, name: str, **manifest) -> str:
    folder = tmp_path / name
    shutil.copytree(source, folder)
    (folder / REWARD_MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


def test_a_length_penalty_subtracts_beta_per_answer_token(tmp_path, tiny_encoder_dir, reward_model):
    folder = with_manifest(
        tmp_path, tiny_encoder_dir, "controlled", length_control="penalty", length_penalty_per_token=0.25
    )
    controlled, raw = RewardModel(folder), RewardModel(folder, length_control=False)
    answers = ["green tea is a tea .", "", "one , two , three and four and five", "yes"]
    n = [len(reward_model.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert n == [6, 0, 9, 1]
    assert raw(PROMPTS, answers) == pytest.approx(reward_model(PROMPTS, answers), abs=1e-6)
    assert controlled(PROMPTS, answers) == pytest.approx(
        [s - 0.25 * k for s, k in zip(raw(PROMPTS, answers), n, strict=True)], abs=1e-6
    )
    # Untruncated: tokens beyond max_length still cost.
    long = " ".join(["good"] * 300)
    assert raw([PROMPTS[0]], [long])[0] - controlled([PROMPTS[0]], [long])[0] == pytest.approx(75.0, abs=1e-4)
    assert controlled.identity == f"{raw.identity}+length-penalty=0.25"
    none = with_manifest(
        tmp_path, tiny_encoder_dir, "none", length_control="none", length_penalty_per_token=0.25
    )
    assert RewardModel(none)(PROMPTS, answers) == pytest.approx(raw(PROMPTS, answers), abs=1e-6)
    assert raw.identity.split("@")[0] == f"reward-model:{folder}"


def test_length_control_passes_through_an_ensemble(tmp_path, member_dirs):
    members = {
        "member-0": with_manifest(
            tmp_path, member_dirs[0], "m0", length_control="penalty", length_penalty_per_token=1.0
        ),
        "member-1": member_dirs[1],
    }
    folder = save_ensemble(tmp_path / "ens", members)
    controlled, raw = load_reward(folder), load_reward(folder, length_control=False)
    answers = ["one two three", "yes"]
    gap = [r - c for r, c in zip(raw(PROMPTS[:2], answers), controlled(PROMPTS[:2], answers), strict=True)]
    assert gap == pytest.approx([3 / 2, 1 / 2], abs=1e-5)  # member 0 pays 1 per token; the mean halves it
    assert controlled.identity != raw.identity


def test_an_ensemble_standardises_raw_member_scores_by_member_scale_raw(tmp_path, member_dirs):
    members = {
        "member-0": with_manifest(
            tmp_path, member_dirs[0], "m0", length_control="penalty", length_penalty_per_token=1.0
        ),
        "member-1": member_dirs[1],
    }
    folder = save_ensemble(tmp_path / "ens", members, combine="min")
    fitted = {
        "member_scale": load_reward(folder).fit_member_scale(PROMPTS, ANSWERS),
        "member_scale_raw": load_reward(folder, length_control=False).fit_member_scale(PROMPTS, ANSWERS),
    }
    assert fitted["member_scale"][0] != fitted["member_scale_raw"][0]  # member 0 pays for length
    (tmp_path / "ens" / REWARD_MANIFEST).write_text(
        json.dumps({"kind": ENSEMBLE_KIND, "members": list(members), "combine": "min", **fitted})
    )
    for ensemble in (load_reward(folder), load_reward(folder, length_control=False)):
        for row in ensemble.member_scores(PROMPTS, ANSWERS):  # each member's own z-scores
            assert sum(row) / len(row) == pytest.approx(0.0, abs=1e-5)
            assert math.sqrt(sum(z * z for z in row) / len(row)) == pytest.approx(1.0, abs=1e-5)
    # An older folder without member_scale_raw cannot standardise its raw scores: it says so.
    del fitted["member_scale_raw"]
    (tmp_path / "ens" / REWARD_MANIFEST).write_text(
        json.dumps({"kind": ENSEMBLE_KIND, "members": list(members), "combine": "min", **fitted})
    )
    assert load_reward(folder).member_scale == fitted["member_scale"]
    with pytest.raises(
        ValueError, match=r"scores of \['member-0'\], and there is no member_scale_raw.*length_control=True"
    ):
        load_reward(folder, length_control=False)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (
            {"length_control": "input"},
            r"length_control='input' is unknown; accepted: 'none', 'penalty' \(or leave it out\)",
        ),
        ({"length_control": "penalty"}, "needs length_penalty_per_token, a finite number"),
        ({"length_control": "penalty", "length_penalty_per_token": "0.1"}, "got '0.1'"),
    ],
)
def test_a_bad_length_control_is_a_clear_error(tmp_path, tiny_encoder_dir, manifest, message):
    folder = with_manifest(tmp_path, tiny_encoder_dir, "bad", **manifest)
    with pytest.raises(ValueError, match=message):
        RewardModel(folder)
    assert RewardModel(folder, length_control=False).length_penalty is None  # raw scores need no beta


# ---------------------------------------------------------------------------------------------- encoding
def encode_pairs_before(tokenizer, prompts, answers, *, max_length, max_prompt_length):
    """encode_pairs as it was before decoder backbones (commit 250dfc8): existing artifacts rely on its ids."""

    def clip(text, max_tokens):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])

    enc = tokenizer(
        [clip(p, max_prompt_length) for p in prompts],
        list(answers),
        truncation="only_second",
        max_length=max_length,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


ENCODER_CASES = (
    ["what is green tea", "write a python function " * 20, "", "list three examples"],
    ["green tea is a tea .", "", "good " * 300, "one , two , three ? ! unknownword ü"],
)


def test_encoder_pairs_are_encoded_exactly_as_before(reward_model):
    for max_length, max_prompt_length in [(256, 96), (16, 4), (40, 8)]:
        kw = {"max_length": max_length, "max_prompt_length": max_prompt_length}
        assert encode_pairs(reward_model.tokenizer, *ENCODER_CASES, **kw) == encode_pairs_before(
            reward_model.tokenizer, *ENCODER_CASES, **kw
        )


@pytest.mark.real_models
def test_the_packaged_minilm_tokenizer_encodes_exactly_as_before():
    from transformers import AutoTokenizer

    from alignpro_plugins.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))
    prompts = ["Explain green tea.", "Write a poem about the sea. " * 30, "Ünïcödé? 東京 😀"]
    answers = ["Green tea is a lightly oxidised tea.", "The sea " * 400, ""]
    for kw in ({"max_length": 256, "max_prompt_length": 96}, {"max_length": 64, "max_prompt_length": 16}):
        assert encode_pairs(tokenizer, prompts, answers, **kw) == encode_pairs_before(
            tokenizer, prompts, answers, **kw
        )


def test_decoder_pairs_are_the_chat_template(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert tokenizer.chat_template and tokenizer.sep_token is None
    [ids] = encode_pairs(tokenizer, ["what is tea"], ["a drink"], max_length=256, max_prompt_length=96)
    assert (
        tokenizer.decode(ids)
        == "<|im_start|>user\nwhat is tea<|im_end|>\n<|im_start|>assistant\na drink<|im_end|>\n"
    )
    # The prompt is clipped to max_prompt_length tokens (bytes here), the answer cut before the closing tokens.
    [ids] = encode_pairs(tokenizer, ["what is tea?"], ["tea " * 50], max_length=40, max_prompt_length=4)
    assert len(ids) == 40
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nwhat<|im_end|>\n<|im_start|>assistant\ntea tea")
    assert text.endswith("<|im_end|>\n")
    with pytest.raises(ValueError, match="max_length=20 leaves no room for the answer"):
        encode_pairs(tokenizer, ["what is tea?"], ["tea"], max_length=20, max_prompt_length=4)


def test_a_decoder_tokenizer_without_a_chat_template_is_refused(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no sep_token .* and no chat_template: set tokenizer.chat_template"):
        encode_pairs(tokenizer, ["x"], ["y"], max_length=64, max_prompt_length=16)


@pytest.mark.real_models
def test_the_packaged_smollm2_tokenizer_encodes_chats(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = encode_pairs(
        tokenizer,
        ["What is green tea? " * 30, "hi"],
        ["It is a tea. " * 100, "hello"],
        max_length=128,
        max_prompt_length=32,
    )
    assert len(ids[0]) == 128
    assert all(tokenizer.decode(x).endswith("<|im_end|>\n") for x in ids)
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n" in tokenizer.decode(
        ids[1]
    )


@pytest.fixture(scope="module")
def tiny_decoder_reward_dir(tmp_path_factory):
    # Wider initial weights than the default: the four answers' scores differ by more than float noise.
    return build_tiny_llama_classifier(tmp_path_factory.mktemp("tiny-llama-reward"), initializer_range=0.2)


def test_a_decoder_reward_scores_a_batch_as_one_by_one(tiny_decoder_reward_dir):
    batched = RewardModel(tiny_decoder_reward_dir, batch_size=8, max_length=64, max_prompt_length=16)
    # It pads with, and pools before, the tokenizer's eos (TRL's RewardTrainer does the same).
    assert batched.tokenizer.pad_token == "<|im_end|>"
    assert batched.model.config.pad_token_id == batched.tokenizer.eos_token_id
    answers = ["green tea is a tea .", "no", "def f ( ) : return 1 " * 5, "the sea is long"]
    scores = batched(PROMPTS, answers)
    single = RewardModel(tiny_decoder_reward_dir, batch_size=1, max_length=64, max_prompt_length=16)
    assert scores == pytest.approx(single(PROMPTS, answers), abs=1e-5)
    assert scores == pytest.approx(manual_scores(batched, PROMPTS, answers), abs=1e-5)
    assert len({round(s, 5) for s in scores}) == 4
    lengths = {
        len(x) for x in encode_pairs(batched.tokenizer, PROMPTS, answers, max_length=64, max_prompt_length=16)
    }
    assert len(lengths) > 1  # the batch really was padded
