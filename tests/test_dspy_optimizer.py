"""AlignProOptimizer: the bridge (target = program, reward = metric), compile's contract, and real RL runs."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import dspy
import pytest
from dspy.utils import DummyLM

from alignpro_plugins.dspy import (
    AlignProModule,
    AlignProOptimizer,
    SimpleFieldAdapter,
    get_rewrites,
    metric_score,
)
from alignpro_plugins.dspy.optimizer import _ProgramBridge, _ProgramTarget
from alignpro_plugins.manifest import Manifest
from alignpro_plugins.targets import CachedTarget, TargetRequest
from tests.test_dspy_module import HINT, AppendPrompter

TINY_RL = dict(
    max_steps=1,
    per_device_train_batch_size=2,
    num_generations=2,
    max_completion_length=4,
    report_to="none",
    save_steps=1000,
)


def qa(question: str, answer: str) -> dspy.Example:
    return dspy.Example(question=question, answer=answer).with_inputs("question")


def exact(example, pred, trace=None) -> bool:
    return pred.answer == example.answer


TRAIN = [qa("Capital of France?", "Paris"), qa("Largest city of France?", "Paris")]
VAL = [qa("France's capital city?", "Paris"), qa("Seat of the French government?", "Paris")]


# ---------------------------------------------------------------------------------------------- the bridge
def test_metric_score_accepts_bool_float_prediction_and_two_arg_metrics():
    ex, pred = qa("q", "a"), dspy.Prediction(answer="a")
    assert metric_score(exact, ex, pred) == 1.0
    assert metric_score(lambda e, p: 0.25, ex, pred) == 0.25
    assert metric_score(lambda e, p, trace=None: dspy.Prediction(score=0.5, feedback="x"), ex, pred) == 0.5
    assert metric_score(lambda e, p: None, ex, pred) == 0.0
    assert metric_score(lambda e, p: float("nan"), ex, pred) == 0.0


def test_target_runs_the_program_and_reward_is_the_metric_on_its_prediction(tmp_path):
    seen = []

    def metric(example, pred, trace=None):
        seen.append((example.question, pred))
        return 1.0 if pred.answer == example.answer else 0.0

    program = dspy.Predict("question -> answer")
    bridge = _ProgramBridge(program, "question", TRAIN, metric, ["question"])
    first, second = bridge.prompts()
    assert (first.prompt, second.prompt) == ("Capital of France?", "Largest city of France?")
    assert first.context == {
        "inputs": {"question": "Capital of France?"}
    }  # the example's inputs travel along
    lm = DummyLM({HINT: {"answer": "Paris"}, "": {"answer": "Lyon"}})
    with dspy.context(lm=lm):
        good = bridge.answer(
            dataclasses.replace(first, prompt=f"Capital of France?\n\n{HINT}")
        )  # x' (augment)
        bad = bridge.answer(second)  # fallback: the original itself
    assert json.loads(good) == {"answer": "Paris"}  # the answer text: the prediction's fields
    rewards = bridge.reward(
        ["Capital of France?", "Largest city of France?", "Capital of France?"], [good, bad, ""]
    )
    assert rewards == [1.0, 0.0, 0.0]  # an empty answer (a failed target call) scores 0 without the metric
    assert [q for q, _ in seen] == ["Capital of France?", "Largest city of France?"]
    assert seen[0][1] is good.prediction  # the metric got the live Prediction object
    # Read back from an on-disk answer cache (the text alone): rebuilt from the JSON fields.
    cache = CachedTarget(_ProgramTarget(bridge), tmp_path / "cache.jsonl")
    request = dataclasses.replace(first, prompt=f"Capital of France?\n\n{HINT}")
    with dspy.context(lm=lm):
        cache.generate([request])
    (from_disk,) = CachedTarget(_ProgramTarget(bridge), tmp_path / "cache.jsonl").generate([request])
    assert type(from_disk) is str and from_disk == good
    assert bridge.reward(["Capital of France?"], [from_disk]) == [1.0]
    assert bridge.reward(["unknown prompt"], [good]) == [0.0]


def test_the_request_context_gives_the_program_its_other_inputs_in_rewrite_mode():
    trainset = [
        dspy.Example(context="Paris is the capital.", question="Capital?", answer="Paris").with_inputs(
            "context", "question"
        )
    ]
    program = dspy.Predict("context, question -> answer")
    bridge = _ProgramBridge(program, "question", trainset, exact, ["context", "question"])
    target = _ProgramTarget(bridge)
    (x,) = bridge.prompts()
    lm = DummyLM({"": {"answer": "Paris"}})
    with dspy.context(lm=lm):
        # A bare string carries no example: a counted failure, not a guess by prefix.
        assert target.generate(["Which city is the capital?"]) == [""]
        assert target.stats.failures == 1 and lm.history == []
        rewrite = TargetRequest("Which city is the capital?", original=x.original, context=x.context)
        (answer,) = target.generate([rewrite])
    sent = lm.history[-1]["messages"][-1]["content"]
    assert "Paris is the capital." in sent and "Which city is the capital?" in sent
    assert bridge.reward(["Capital?"], [answer]) == [1.0]


def test_bridge_validates_the_trainset(caplog):
    with pytest.raises(ValueError, match="no str field 'question'"):
        _ProgramBridge(
            dspy.Predict("question -> answer"), "question", [dspy.Example(q="x")], exact, ["question"]
        )
    with caplog.at_level(logging.WARNING):
        bridge = _ProgramBridge(dspy.Predict("question -> answer"), "question", TRAIN + TRAIN[:1], exact, [])
    assert len(bridge.prompts()) == 2 and "repeat the text" in caplog.text


# ---------------------------------------------------------------------------------------------- compile contract
class StubTrainOptimizer(AlignProOptimizer):
    """Replaces only the RL run: scores every prompt once through the real target and reward, returns a stub."""

    def _train(self, bridge, config):
        target = _ProgramTarget(bridge)
        requests = bridge.prompts()
        prompts = [r.original for r in requests]
        rewritten = [r.text for r in AppendPrompter().rewrite_results(prompts)]
        sent = [dataclasses.replace(r, prompt=x2) for r, x2 in zip(requests, rewritten, strict=True)]
        self.train_rewards = bridge.reward(prompts, target.generate(sent))
        self._target = target
        return AppendPrompter()


def test_compile_returns_a_new_program_reports_scores_and_leaves_the_student_alone(tmp_path, caplog):
    student = dspy.Predict("question -> answer")
    student.demos = [dspy.Example(question="Capital of Spain?", answer="Madrid")]
    before_state = json.dumps(student.dump_state(), sort_keys=True, default=str)
    opt = StubTrainOptimizer(exact, output_dir=str(tmp_path / "run"))
    lm = DummyLM({HINT: {"answer": "Paris"}, "": {"answer": "Lyon"}})
    with dspy.context(lm=lm), caplog.at_level(logging.INFO, logger="alignpro_plugins.dspy.optimizer"):
        program = opt.compile(student, trainset=TRAIN, valset=VAL)

    assert isinstance(program, AlignProModule) and program is not student and program.program is not student
    assert program._compiled and program.fields == ["question"]
    assert json.dumps(student.dump_state(), sort_keys=True, default=str) == before_state
    assert student.history == [] and not isinstance(student, AlignProModule)
    assert opt.train_rewards == [1.0, 1.0]  # the metric on the program's predictions for the rewrites
    assert (opt.valset_score_before, opt.valset_score_after) == (0.0, 1.0)
    report = json.loads((tmp_path / "run" / "dspy_compile.json").read_text())
    assert report["metric_before"] == 0.0 and report["metric_after"] == 1.0 and report["valset_size"] == 2
    assert opt.results["metric_after"] == 1.0 and opt.results["target_calls"] == 2
    assert "valset metric 0.0000 -> 1.0000" in caplog.text
    with dspy.context(lm=lm):
        pred = program(question="Capital of France?")
    assert pred.answer == "Paris" and get_rewrites(pred)[0].changed


def test_compile_needs_a_metric_and_a_trainset():
    with pytest.raises(ValueError, match="needs a metric"):
        AlignProOptimizer().compile(dspy.Predict("question -> answer"), trainset=TRAIN)
    with pytest.raises(ValueError, match="non-empty trainset"):
        AlignProOptimizer(exact).compile(dspy.Predict("question -> answer"), trainset=[])


def counting_metric(calls: list):
    def metric(example, pred, trace=None):
        calls.append(example)
        return 1.0

    return metric


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"rl_config": {"max_step": 1}}, ValueError, "'max_step' \\(did you mean 'max_steps'\\?\\)"),
        ({"rl_config": {"algorithm": "ppo"}}, ValueError, "algorithm must be"),
        # kl-optimum has its own config: its options are checked against it (the kl_ prefix is gone).
        (
            {"rl_config": {"algorithm": "kl-optimum", "kl_rounds": 2}},
            ValueError,
            "'kl_rounds' \\(did you mean 'rounds'\\?\\).* KLOptimumConfig fields",
        ),
        ({"field": "questoin"}, ValueError, "questoin"),
    ],
)
def test_bad_options_fail_before_any_program_call(tmp_path, options, error, message):
    # Before: a typo in rl_config failed only after the whole valset had been evaluated.
    calls: list = []
    lm = DummyLM({"": {"answer": "Paris"}})
    opt = AlignProOptimizer(counting_metric(calls), output_dir=str(tmp_path / "run"), **options)
    with dspy.context(lm=lm), pytest.raises(error, match=message):
        opt.compile(dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL)
    assert calls == [] and lm.history == []


def test_bad_constructor_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        AlignProOptimizer(exact, mode="paraphrase")
    with pytest.raises(TypeError, match="rl_config is a dict"):
        AlignProOptimizer(exact, rl_config=[("max_steps", 1)])
    (tmp_path / "sft").mkdir()
    with pytest.raises(FileNotFoundError, match="has no alignpro.json"):
        AlignProOptimizer(exact, prompter=str(tmp_path / "sft"))  # e.g. an SFT run that did not finish
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AlignProOptimizer(exact, prompter=tmp_path / "missing")


def test_compile_accepts_and_ignores_other_teleprompter_kwargs(tmp_path, caplog):
    opt = StubTrainOptimizer(exact, output_dir=str(tmp_path / "run"))
    with dspy.context(lm=DummyLM({"": {"answer": "Paris"}})), caplog.at_level(logging.WARNING):
        program = opt.compile(
            dspy.Predict("question -> answer"), trainset=TRAIN, requires_permission_to_run=False, seed=3
        )
    assert isinstance(program, AlignProModule)
    assert "ignores requires_permission_to_run=, seed=" in caplog.text


# ---------------------------------------------------------------------------------------------- real RL runs
def test_compile_trains_a_tiny_prompter_with_the_metric_as_reward(tiny_lm_dir, tmp_path):
    calls = []

    def metric(example, pred, trace=None):
        calls.append((example.question, pred.answer))
        return pred.answer == example.answer

    student = dspy.Predict("question -> answer")
    trainset = TRAIN + [qa("Where is the Louvre?", "Paris"), qa("2+2?", "4")]
    opt = AlignProOptimizer(metric, prompter=tiny_lm_dir, output_dir=str(tmp_path / "rl"), rl_config=TINY_RL)
    with dspy.context(lm=DummyLM({"": {"answer": "Paris"}})):
        program = opt.compile(student, trainset=trainset, valset=VAL + [qa("2+3?", "5")])

    out = tmp_path / "rl"
    stages = Manifest.load(out).provenance["stages"]
    assert stages[-1]["stage"] == "rl" and stages[-1]["steps"] == 1
    assert stages[-1]["target"].startswith("dspy-program:")
    assert (out / "adapter_model.safetensors").exists() and (out / "dspy_compile.json").exists()
    assert program.prompter_path == str(out.resolve()) and program.prompter is not None
    # Every target call carried its example's inputs (a request without them would be a counted failure).
    assert opt._target.stats.calls > 0 and opt._target.stats.failures == 0
    assert opt.valset_score_before == pytest.approx(2 / 3) and opt.valset_score_after == pytest.approx(2 / 3)
    # valset (before) + 2 training rewards (one prompt x num_generations) + valset (after)
    train_calls = calls[3:-3]
    assert len(calls) == 8 and len(train_calls) == 2
    assert all(q in {e.question for e in trainset} and a == "Paris" for q, a in train_calls)
    assert stages[-1]["reward_first"] == pytest.approx(
        sum(a == next(e.answer for e in trainset if e.question == q) for q, a in train_calls) / 2
    )
    # The compiled program saves and loads (hash of the trained artifact checked).
    saved = program.save(tmp_path / "compiled.json")
    loaded = AlignProModule(dspy.Predict("question -> answer")).load(saved)
    assert loaded.prompter_path == str(out.resolve()) and student.demos == []


@pytest.mark.real_models
def test_smollm2_end_to_end(tmp_path):
    from alignpro_plugins.dspy import LocalTransformersLM
    from alignpro_plugins.prompter import Prompter

    calls = []

    def contains(example, pred, trace=None):
        calls.append((example.question, pred.answer))
        return example.answer.lower() in pred.answer.lower()

    lm = LocalTransformersLM("smollm2-135m-instruct", max_tokens=20, cache=False)
    prompter = Prompter.from_base("smollm2-135m-instruct", similarity=None)
    prompter.manifest.generation.max_new_tokens = 24  # keep the test short
    trainset = [qa("What is the capital of France?", "Paris"), qa("Name the largest planet.", "Jupiter")]
    valset = [
        qa("Which planet is called the Red Planet?", "Mars"),
        qa("What is the capital of Italy?", "Rome"),
    ]
    rl = {**TINY_RL, "max_completion_length": 12}
    opt = AlignProOptimizer(contains, prompter=prompter, output_dir=str(tmp_path / "rl"), rl_config=rl)
    with dspy.context(lm=lm, adapter=SimpleFieldAdapter()):
        program = opt.compile(dspy.Predict("question -> answer"), trainset=trainset, valset=valset)
        pred = program(question="What is the capital of Italy?")

    before, after = calls[:2], calls[-2:]
    assert (
        opt.valset_score_before
        == sum(v.answer.lower() in a.lower() for v, (_, a) in zip(valset, before, strict=True)) / 2
    )
    assert (
        opt.valset_score_after
        == sum(v.answer.lower() in a.lower() for v, (_, a) in zip(valset, after, strict=True)) / 2
    )
    assert all(a.strip() for _, a in calls)  # SmolLM2 really answered
    (rec,) = get_rewrites(pred)
    assert rec.original == "What is the capital of Italy?" and rec.rewritten.startswith(rec.original)
    assert Manifest.load(tmp_path / "rl").provenance["stages"][-1]["stage"] == "rl"
    assert Path(program.prompter_path, "adapter_model.safetensors").exists()
