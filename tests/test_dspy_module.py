"""AlignProModule, LocalTransformersLM and SimpleFieldAdapter (DummyLM and tiny models; seconds)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignpro_plugins.dspy import (
    AlignProModule,
    LocalTransformersLM,
    PrompterMismatchError,
    SimpleFieldAdapter,
    TransformersEngine,
    default_answer_field,
    default_fields,
    get_gate,
    get_rewrites,
    manifest_sha256,
)
from alignpro_plugins.gate import RetryGate
from alignpro_plugins.manifest import MANIFEST_NAME, Manifest
from alignpro_plugins.prompter import RewriteResult

HINT = "Answer in one word."
ROOT = Path(__file__).resolve().parents[1]


class AppendPrompter:
    """A deterministic prompter: augments every prompt with HINT, except prompts containing SKIP (fallback)."""

    def __init__(self, hint: str = HINT) -> None:
        self.hint = hint
        self.manifest = Manifest(base_model="stub-prompter")
        self.calls: list[list[str]] = []

    def rewrite_results(self, prompts: list[str]) -> list[RewriteResult]:
        self.calls.append(list(prompts))
        return [
            RewriteResult(p, p, "augment", None, "no_change")
            if "SKIP" in p
            else RewriteResult(p, f"{p}\n\n{self.hint}", "augment", self.hint, None)
            for p in prompts
        ]

    async def arewrite_results(self, prompts: list[str]) -> list[RewriteResult]:
        return self.rewrite_results(prompts)

    def save_pretrained(self, folder) -> Path:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.manifest.save(folder)
        return Path(folder)


def hint_lm() -> DummyLM:
    """Answers 'Paris' only when the request carries the prompter's hint."""
    return DummyLM({HINT: {"answer": "Paris"}, "": {"answer": "I am not sure."}})


# ---------------------------------------------------------------------------------------------- rewriting
def test_rewrites_the_question_before_predict_runs():
    prompter = AppendPrompter()
    module = AlignProModule(dspy.Predict("question -> answer"), prompter)
    lm = hint_lm()
    with dspy.context(lm=lm):
        pred = module(question="What is the capital of France?")
    assert pred.answer == "Paris"
    assert prompter.calls == [["What is the capital of France?"]]
    sent = lm.history[-1]["messages"][-1]["content"]
    assert "What is the capital of France?" in sent and HINT in sent
    (rec,) = get_rewrites(pred)
    assert rec.field == "question" and rec.original == "What is the capital of France?"
    assert rec.rewritten == f"What is the capital of France?\n\n{HINT}" and rec.changed
    assert rec.fallback_reason is None and rec.generated == HINT
    assert list(module.rewrite_history) == [rec] and module.last_rewrites == [rec]
    assert "_alignpro_rewrites" not in pred.keys() and set(pred.keys()) == {"answer"}


def test_fallback_is_recorded_and_the_original_is_sent():
    module = AlignProModule(dspy.Predict("question -> answer"), AppendPrompter())
    lm = hint_lm()
    with dspy.context(lm=lm):
        pred = module(question="SKIP this one")
    assert pred.answer == "I am not sure."
    (rec,) = get_rewrites(pred)
    assert rec.rewritten == rec.original == "SKIP this one"
    assert rec.fallback_reason == "no_change" and not rec.changed
    assert HINT not in lm.history[-1]["messages"][-1]["content"]


def test_default_fields_are_the_str_inputs_of_the_first_predictor():
    assert default_fields(dspy.Predict("context: str, question: str, k: int -> answer")) == [
        "context",
        "question",
    ]
    assert default_fields(dspy.ChainOfThought("question -> answer")) == ["question"]

    class TwoStep(dspy.Module):
        def __init__(self):
            super().__init__()
            self.draft = dspy.Predict("topic -> draft")
            self.polish = dspy.Predict("draft -> text")

        def forward(self, topic):
            return self.polish(draft=self.draft(topic=topic).draft)

    assert default_fields(TwoStep()) == ["topic"]
    with pytest.raises(ValueError, match="no str input field"):
        default_fields(dspy.Predict("k: int -> answer"))

    class NoPredictors(dspy.Module):
        def forward(self, x):
            return dspy.Prediction(y=x)

    with pytest.raises(ValueError, match="fields="):
        AlignProModule(NoPredictors(), AppendPrompter())
    assert AlignProModule(NoPredictors(), AppendPrompter(), fields="x")(x="hi").y == f"hi\n\n{HINT}"


def test_only_chosen_fields_are_rewritten_and_positional_args_work():
    class RAG(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict("context, question -> answer")

        def forward(self, context, question):
            return self.answer(context=context, question=question)

    module = AlignProModule(RAG(), AppendPrompter(), fields=["question"])
    lm = DummyLM({"": {"answer": "ok"}})
    with dspy.context(lm=lm):
        pred = module("Paris is in France.", question="Where is Paris?")
    assert [r.field for r in get_rewrites(pred)] == ["question"]
    sent = lm.history[-1]["messages"][-1]["content"]
    assert sent.count(HINT) == 1 and sent.index("Paris is in France.") < sent.index(HINT)


def test_chain_of_thought_and_async():
    module = AlignProModule(dspy.ChainOfThought("question -> answer"), AppendPrompter())
    lm = DummyLM({HINT: {"reasoning": "r", "answer": "Paris"}, "": {"reasoning": "r", "answer": "?"}})
    with dspy.context(lm=lm):
        pred = asyncio.run(module.acall(question="Capital of France?"))
    assert pred.answer == "Paris" and get_rewrites(pred)[0].changed


def test_deepcopy_copies_the_program_and_shares_the_prompter():
    prompter = AppendPrompter()
    module = AlignProModule(dspy.Predict("question -> answer"), prompter)
    with dspy.context(lm=hint_lm()):
        module(question="q")
    clone = module.deepcopy()
    assert clone.prompter is prompter and clone.program is not module.program
    assert len(clone.rewrite_history) == 0 and len(module.rewrite_history) == 1
    clone.program.demos.append(dspy.Example(question="a", answer="b"))
    assert module.program.demos == []


def test_missing_prompter_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no prompter"):
        AlignProModule(dspy.Predict("question -> answer"))(question="q")


def test_fields_that_are_not_inputs_of_the_program_are_refused():
    # Before: fields=["questoin"] rewrote nothing and said nothing.
    with pytest.raises(ValueError, match="questoin") as info:
        AlignProModule(dspy.Predict("question -> answer"), AppendPrompter(), fields=["questoin"])
    assert "'question'" in str(info.value)
    with pytest.raises(ValueError, match="'context', 'question'"):
        AlignProModule(dspy.ChainOfThought("context, question -> answer"), AppendPrompter(), fields="query")
    with pytest.raises(TypeError, match="field names"):
        AlignProModule(dspy.Predict("question -> answer"), AppendPrompter(), fields=[1])

    class Renamed(dspy.Module):  # a custom forward takes its own parameter names
        def __init__(self):
            super().__init__()
            self.qa = dspy.Predict("question -> answer")

        def forward(self, query):
            return self.qa(question=query)

    module = AlignProModule(Renamed(), AppendPrompter(), fields=["query"])
    with dspy.context(lm=hint_lm()):
        assert module(query="Capital of France?").answer == "Paris"
    with pytest.raises(ValueError, match=r"first predictor's str inputs \['question'\].*\['query'\]"):
        AlignProModule(Renamed(), AppendPrompter())  # the inferred field is not a forward() input

    class AnyInputs(dspy.Module):  # forward(**kwargs): its inputs cannot be known, nothing is refused
        def __init__(self):
            super().__init__()
            self.qa = dspy.Predict("question -> answer")

        def forward(self, **kwargs):
            return self.qa(question=kwargs["q"])

    assert AlignProModule(AnyInputs(), AppendPrompter(), fields=["q"]).fields == ["q"]


def test_a_local_folder_without_a_prompter_fails_at_construction(tmp_path, monkeypatch, tiny_lm_dir):
    # Before: it was taken as a base model name and failed inside transformers with a tokenizer error.
    program = dspy.Predict("question -> answer")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec, problem in (
        ("runs", "has no alignpro.json"),
        ("runs/prompter", "does not exist"),
        ("./prompter", "does not exist"),
        (tmp_path / "runs", "has no alignpro.json"),
    ):
        with pytest.raises(FileNotFoundError, match=problem) as info:
            AlignProModule(program, spec)
        assert "config.json" in str(info.value)  # says what a prompter (or base model) folder holds
    zero_shot = AlignProModule(program, tiny_lm_dir)  # a model folder: a zero-shot prompter on it
    assert zero_shot.prompter.manifest.base_model == tiny_lm_dir and zero_shot.prompter_path is None


# ---------------------------------------------------------------------------------------------- save / load
@pytest.fixture()
def artifact(tiny_lm_dir, tmp_path) -> Path:
    """A prompter artifact folder: a manifest naming the tiny LM as base (no adapter)."""
    folder = tmp_path / "prompter"
    folder.mkdir()
    Manifest(base_model=tiny_lm_dir, similarity_model=None).save(folder)
    return folder


def program_with_demo() -> dspy.Predict:
    prog = dspy.Predict("question -> answer")
    prog.demos = [dspy.Example(question="2+2?", answer="4")]
    return prog


def test_save_load_round_trip_checks_the_manifest_hash(artifact, tmp_path):
    module = AlignProModule(program_with_demo(), str(artifact))
    assert module.prompter.manifest.base_model == Manifest.load(artifact).base_model
    path = module.save(tmp_path / "program.json")
    state = json.loads(path.read_text())  # plain JSON: nothing is pickled
    info = state["alignpro"]
    assert info["prompter_path"] == str(artifact.resolve())
    assert (
        info["manifest_sha256"]
        == "sha256:" + hashlib.sha256((artifact / MANIFEST_NAME).read_bytes()).hexdigest()
    )
    assert info["manifest_sha256"] == manifest_sha256(artifact) and info["fields"] == ["question"]

    loaded = AlignProModule(dspy.Predict("question -> answer")).load(path)
    assert loaded.prompter is not None and loaded.prompter_path == str(artifact.resolve())
    assert loaded.prompter.manifest.base_model == module.prompter.manifest.base_model
    assert [d["answer"] for d in loaded.program.demos] == ["4"]
    assert loaded.fields == ["question"]
    # A module already holding the same prompter reuses it.
    again = AlignProModule(dspy.Predict("question -> answer"), loaded.prompter, prompter_path=artifact).load(
        path
    )
    assert again.prompter is loaded.prompter

    # The artifact changes after saving: loading refuses, naming both hashes.
    changed = Manifest.load(artifact)
    changed.mode = "rewrite"
    changed.save(artifact)
    fresh = AlignProModule(dspy.Predict("question -> answer"))
    with pytest.raises(PrompterMismatchError, match="changed since this program was saved") as err:
        fresh.load(path)
    assert info["manifest_sha256"] in str(err.value) and manifest_sha256(artifact) in str(err.value)
    assert fresh.prompter is None and fresh.program.demos == []  # nothing half-loaded


def test_load_refuses_a_module_holding_another_prompter(artifact, tmp_path):
    path = AlignProModule(program_with_demo(), str(artifact)).save(tmp_path / "p.json")
    other = AlignProModule(dspy.Predict("question -> answer"), AppendPrompter())
    with pytest.raises(PrompterMismatchError, match="not the one the state was saved with"):
        other.load(path)


def test_saved_folder_can_move_and_missing_artifact_is_reported(tmp_path):
    prompter = AppendPrompter()
    module = AlignProModule(program_with_demo(), prompter)
    src = tmp_path / "a"
    path = module.save(src / "program.json")
    # A prompter without a folder is written next to the state.
    assert (src / "program.prompter" / MANIFEST_NAME).exists()
    moved = tmp_path / "b"
    shutil.move(str(src), str(moved))
    loaded = AlignProModule(dspy.Predict("question -> answer"), prompter).load(moved / "program.json")
    assert loaded.prompter is prompter and loaded.prompter_path == str((moved / "program.prompter").resolve())
    shutil.rmtree(moved / "program.prompter")
    with pytest.raises(FileNotFoundError, match="prompter artifact this program was saved with is missing"):
        AlignProModule(dspy.Predict("question -> answer")).load(moved / "program.json")
    assert path.name == "program.json"


def test_never_pickles(tmp_path):
    module = AlignProModule(dspy.Predict("question -> answer"), AppendPrompter())
    for kwargs in ({"path": tmp_path / "p.pkl"}, {"path": tmp_path / "dir", "save_program": True}):
        with pytest.raises(ValueError, match="never pickle"):
            module.save(**kwargs)
    (tmp_path / "p.pkl").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles"):
        module.load(tmp_path / "p.pkl", allow_pickle=True)
    with pytest.raises(ValueError, match="not an AlignProModule state"):
        module.load_state(dspy.Predict("question -> answer").dump_state())


# ---------------------------------------------------------------------------------------------- retry gate
class KnowsParis:
    """A reward that likes answers naming Paris and records what it scored (prompts are the originals)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, prompts: list[str], answers: list[str]) -> list[float]:
        self.seen += list(zip(prompts, answers, strict=True))
        return [1.0 if "Paris" in a else 0.0 for a in answers]


def test_gate_keeps_a_good_first_answer_without_asking_the_prompter():
    prompter, reward = AppendPrompter(), KnowsParis()
    lm = DummyLM({"": {"answer": "Paris, of course."}})
    module = AlignProModule(dspy.Predict("question -> answer"), prompter, retry_gate=RetryGate(reward, 0.5))
    with dspy.context(lm=lm):
        pred = module(question="Capital of France?")
    assert pred.answer == "Paris, of course." and prompter.calls == [] and len(lm.history) == 1
    assert get_gate(pred) == {"first_score": 1.0, "threshold": 0.5, "retried": False, "kept": "first"}
    (rec,) = get_rewrites(pred)
    assert rec.rewritten == rec.original == "Capital of France?" and not rec.changed
    assert rec.fallback_reason.startswith("retry gate: the answer to the original input scored +1.000")
    assert module.last_gate == get_gate(pred) and set(pred.keys()) == {"answer"}


def test_gate_retries_a_poor_answer_with_the_rewrite_and_keeps_the_better_one():
    prompter, reward = AppendPrompter(), KnowsParis()
    lm = hint_lm()
    module = AlignProModule(dspy.Predict("question -> answer"), prompter, retry_gate=RetryGate(reward, 0.5))
    with dspy.context(lm=lm):
        pred = module(question="Capital of France?")
    assert pred.answer == "Paris" and prompter.calls == [["Capital of France?"]] and len(lm.history) == 2
    assert HINT not in lm.history[0]["messages"][-1]["content"]  # the original went first
    assert HINT in lm.history[1]["messages"][-1]["content"]
    assert get_gate(pred) == {
        "first_score": 0.0,
        "threshold": 0.5,
        "retried": True,
        "retry_score": 1.0,
        "kept": "retry",
    }
    (rec,) = get_rewrites(pred)
    assert rec.changed and rec.rewritten == f"Capital of France?\n\n{HINT}"
    # Both answers were scored against the original prompt, never the rewrite.
    assert reward.seen == [("Capital of France?", "I am not sure."), ("Capital of France?", "Paris")]


def test_gate_keeps_the_first_answer_when_the_retry_scores_lower():
    lm = hint_lm()
    shorter_is_worse = RetryGate(lambda prompts, answers: [float(len(a)) for a in answers], threshold=100.0)
    module = AlignProModule(dspy.Predict("question -> answer"), AppendPrompter(), retry_gate=shorter_is_worse)
    with dspy.context(lm=lm):
        pred = module(question="Capital of France?")
    assert pred.answer == "I am not sure." and len(lm.history) == 2
    gate = get_gate(pred)
    assert gate["retried"] and gate["kept"] == "first" and gate["retry_score"] < gate["first_score"]
    (rec,) = get_rewrites(pred)
    assert (
        rec.rewritten == rec.original and rec.generated == HINT
    )  # what the prompter wrote is still on record
    assert "the answer to the original input scored higher" in rec.fallback_reason


def test_gate_makes_no_second_call_when_the_prompter_keeps_x():
    lm = hint_lm()
    module = AlignProModule(
        dspy.Predict("question -> answer"), AppendPrompter(), retry_gate=RetryGate(KnowsParis(), 0.5)
    )
    with dspy.context(lm=lm):
        pred = module(question="SKIP this one")
    assert len(lm.history) == 1 and pred.answer == "I am not sure."
    gate = get_gate(pred)
    assert gate["retried"] is False and gate["reason"] == "the prompter kept x"
    assert get_rewrites(pred)[0].fallback_reason == "no_change"


def test_gate_async_with_chain_of_thought_scores_the_answer_not_the_reasoning():
    reward = KnowsParis()
    lm = DummyLM(
        {
            HINT: {"reasoning": "Paris is the capital", "answer": "Paris"},
            "": {"reasoning": "Paris?", "answer": "?"},
        }
    )
    program = dspy.ChainOfThought("question -> answer")
    assert default_answer_field(program) == "answer"
    module = AlignProModule(program, AppendPrompter(), retry_gate=RetryGate(reward, 0.5))
    with dspy.context(lm=lm):
        pred = asyncio.run(module.acall(question="Capital of France?"))
    assert pred.answer == "Paris" and get_gate(pred)["kept"] == "retry"
    assert [a for _, a in reward.seen] == ["?", "Paris"]


def test_gate_arguments_are_checked_at_construction():
    with pytest.raises(TypeError, match="retry_gate must be a RetryGate"):
        AlignProModule(dspy.Predict("question -> answer"), AppendPrompter(), retry_gate=KnowsParis())
    with pytest.raises(ValueError, match="pass answer_field"):
        AlignProModule(
            dspy.Predict("question -> n: int"), AppendPrompter(), retry_gate=RetryGate(KnowsParis(), 0.5)
        )
    module = AlignProModule(
        dspy.Predict("question -> n: int, note"),
        AppendPrompter(),
        retry_gate=RetryGate(KnowsParis(), 0.5),
        answer_field="note",
    )
    assert module.answer_field == "note"


def test_gate_is_shared_by_copies_and_survives_save_and_load(tmp_path, tiny_encoder_dir):
    gate = RetryGate(tiny_encoder_dir, threshold=0.25)
    prompter = AppendPrompter()
    module = AlignProModule(program_with_demo(), prompter, retry_gate=gate)
    assert module.deepcopy().retry_gate is gate
    path = module.save(tmp_path / "program.json")
    saved = json.loads(path.read_text())["alignpro"]["retry_gate"]
    assert saved["threshold"] == 0.25 and saved["answer_field"] == "answer"
    assert saved["reward_path"] == str(Path(tiny_encoder_dir).resolve())

    loaded = AlignProModule(dspy.Predict("question -> answer"), prompter).load(path)
    assert isinstance(loaded.retry_gate, RetryGate) and loaded.retry_gate.threshold == 0.25
    assert loaded.answer_field == "answer"
    # The caller's gate wins over the saved one.
    mine = RetryGate(KnowsParis(), 0.9)
    assert (
        AlignProModule(dspy.Predict("question -> answer"), prompter, retry_gate=mine).load(path).retry_gate
        is mine
    )


def test_a_saved_rerank_gate_is_valid_json_and_loads_back_as_rerank(tmp_path, tiny_encoder_dir):
    module = AlignProModule(
        program_with_demo(), AppendPrompter(), retry_gate=RetryGate.rerank(tiny_encoder_dir)
    )
    path = module.save(tmp_path / "program.json")
    text = path.read_text()
    assert "Infinity" not in text  # strict JSON readers reject it
    assert json.loads(text)["alignpro"]["retry_gate"]["threshold"] == "inf"
    loaded = AlignProModule(dspy.Predict("question -> answer"), AppendPrompter()).load(path)
    assert loaded.retry_gate.threshold == float("inf") and loaded.retry_gate.wants_retry(1e300)


def test_a_saved_always_gate_loads_back_as_always(tmp_path):
    module = AlignProModule(program_with_demo(), AppendPrompter(), retry_gate=RetryGate.always())
    path = module.save(tmp_path / "program.json")
    assert json.loads(path.read_text())["alignpro"]["retry_gate"]["reward"] is None
    loaded = AlignProModule(dspy.Predict("question -> answer"), AppendPrompter()).load(path)
    gate = loaded.retry_gate
    assert gate is not None and gate.reward is None and gate.threshold == float("inf")
    assert loaded.answer_field == "answer"


def test_a_saved_gate_over_a_callable_must_be_given_again(tmp_path):
    prompter = AppendPrompter()
    module = AlignProModule(
        dspy.Predict("question -> answer"), prompter, retry_gate=RetryGate(KnowsParis(), 0.5)
    )
    path = module.save(tmp_path / "program.json")
    with pytest.raises(FileNotFoundError, match="pass retry_gate=RetryGate"):
        AlignProModule(dspy.Predict("question -> answer"), prompter).load(path)
    again = AlignProModule(
        dspy.Predict("question -> answer"), prompter, retry_gate=RetryGate(KnowsParis(), 0.5)
    ).load(path)
    assert again.retry_gate is not None


# ---------------------------------------------------------------------------------------------- local LM
@pytest.fixture(scope="module")
def tiny_engine(tiny_lm_dir) -> TransformersEngine:
    return TransformersEngine(tiny_lm_dir, max_new_tokens=8)


def test_engine_matches_plain_transformers_greedy_generation(tiny_engine):
    import torch
    from dspy.lm15 import Config, Message, Request

    lm = LocalTransformersLM(tiny_engine, max_tokens=6, cache=False)
    resp = lm(Request(model=lm.model, messages=(Message.user("hello world"),), config=Config(max_tokens=6)))
    tok, model = tiny_engine.tokenizer, tiny_engine.model
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert resp.text == expected
    assert resp.usage.input_tokens == ids.shape[1] and 1 <= resp.usage.output_tokens <= 6
    assert lm.model.startswith("local/") and "@" in lm.model  # weights hash in the cache key


def test_local_lm_runs_predict_with_the_simple_adapter(tiny_engine):
    lm = LocalTransformersLM(tiny_engine, max_tokens=5, cache=False)  # fresh calls: usage is reported
    with dspy.context(lm=lm, adapter=SimpleFieldAdapter()):
        pred = dspy.Predict("question -> answer")(question="What is 2+2?")
        cot = dspy.ChainOfThought("question -> answer")(question="Why?")
        apred = asyncio.run(dspy.Predict("question -> answer").acall(question="async?"))
    assert isinstance(pred.answer, str) and isinstance(apred.answer, str)
    assert cot.reasoning == "" and isinstance(cot.answer, str)
    # Plain prompts: no DSPy markers, no system message for DSPy's generic instructions.
    messages = lm.history[0]["messages"]
    assert messages == [{"role": "user", "content": "What is 2+2?"}]
    assert lm.history[0]["usage"]["completion_tokens"] <= 5


def test_local_lm_state_round_trip_and_copies_share_the_engine(tiny_engine):
    lm = LocalTransformersLM(tiny_engine, max_tokens=4)
    assert copy.deepcopy(lm)._engine_spec is tiny_engine
    prog = dspy.Predict("question -> answer")
    prog.set_lm(lm)
    state = prog.dump_state()
    assert state["lm"]["engine"]["class"] == "alignpro_plugins.dspy.lm:TransformersEngine"
    restored = dspy.Predict("question -> answer")
    with pytest.raises(ValueError, match="allow_unsafe_lm_state"):
        restored.load_state(state)
    restored.load_state(state, allow_unsafe_lm_state=True)
    assert restored.lm.model == lm.model
    assert restored.lm._engine_spec is restored.lm._async_engine_spec.sync  # loaded once, shared


def test_simple_adapter_parse():
    adapter = SimpleFieldAdapter()
    qa = dspy.Signature("question -> answer")
    assert adapter.parse(qa, "  Paris.\n") == {"answer": "Paris."}
    assert adapter.parse(qa, "[[ ## answer ## ]]\nLyon\n\n[[ ## completed ## ]]") == {"answer": "Lyon"}
    assert adapter.parse(qa, "[[ ## other ## ]]\nx") == {"answer": "[[ ## other ## ]]\nx"}
    assert adapter.parse(dspy.Signature("question -> reasoning, answer"), "42") == {
        "reasoning": "",
        "answer": "42",
    }
    assert adapter.parse(dspy.Signature("question -> n: int"), " 7 ") == {"n": 7}
    assert adapter.use_json_adapter_fallback is False
    instructed = dspy.Signature("question -> answer", "Answer briefly.")
    msgs = adapter.format(instructed, [], {"question": "Why?"})
    assert msgs == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why?"}]
    two = adapter.format(dspy.Signature("context, question -> answer"), [], {"context": "c", "question": "q"})
    assert two[-1]["content"] == "context: c\n\nquestion: q"
    assert (
        "[[ ## question ## ]]"
        in SimpleFieldAdapter(plain=False).format(qa, [], {"question": "q"})[-1]["content"]
    )


# ---------------------------------------------------------------------------------------------- packaging
def test_import_without_dspy_gives_the_install_command():
    code = (
        "import sys; sys.modules['dspy'] = None\n"
        "import alignpro_plugins, alignpro_plugins.prompter\n"
        "try:\n    import alignpro_plugins.dspy\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install 'alignpro-plugins[dspy]'" in out.stdout


def test_import_changes_no_environment_variable_whatever_the_import_order(tmp_path):
    # Issue 37 item 5: the import used to set LITELLM_LOCAL_MODEL_COST_MAP and DSPY_CACHEDIR, so where DSPy kept
    # its cache depended on which package was imported first.
    env = {k: v for k, v in os.environ.items() if k not in ("LITELLM_LOCAL_MODEL_COST_MAP", "DSPY_CACHEDIR")}
    env |= {"ALIGNPRO_CACHE": str(tmp_path / "alignpro"), "HOME": str(tmp_path / "home")}
    code = (
        "import os\n"
        "before = dict(os.environ)\n"
        "import {first}, {second}\n"
        "from dspy.utils.caching import default_cache_dir\n"
        "print(dict(os.environ) == before, default_cache_dir())\n"
    )
    for first, second in (("alignpro_plugins.dspy", "dspy"), ("dspy", "alignpro_plugins.dspy")):
        out = subprocess.run(
            [sys.executable, "-c", code.format(first=first, second=second)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", str(tmp_path / "home" / ".dspy_cache")]  # DSPy's own default


# ---------------------------------------------------------------------------------------------- property
# Any code point, control characters and lone surrogates included.
ANY_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=80),
    st.text(st.characters(categories=["Cc", "Cs", "Zs", "Po"]), max_size=12),
)
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Echo(dspy.Module):
    """Answers with the question it received; records every call's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, Any]] = []

    def forward(self, question, context=None):
        self.seen.append((question, context))
        return dspy.Prediction(answer=question if isinstance(question, str) else repr(question))

    async def aforward(self, question, context=None):
        return self.forward(question, context)


@pytest.fixture(scope="module")
def real_prompter(tiny_lm_dir):
    """A real Prompter (batcher, guard, composition) whose model output is fixed."""
    from tests.test_langchain_adapter import StubPrompter

    return StubPrompter.build(tiny_lm_dir)


@PROPERTY
@given(text=ANY_TEXT, context=ANY_TEXT, gated=st.booleans())
def test_any_text_reaches_the_program_as_the_prompters_result(real_prompter, text, context, gated):
    (result,) = real_prompter.rewrite_results([text])
    assert result.text.startswith(text.rstrip())  # augment mode keeps the user's text in front
    echo = Echo()
    # This gate scores every answer -1, below its threshold: the program runs on x, then on the rewrite.
    gate = RetryGate(lambda ps, ans: [-1.0] * len(ans), 0.0) if gated else None
    module = AlignProModule(echo, real_prompter, fields=["question"], retry_gate=gate, answer_field="answer")
    pred = module(text, context=context)
    assert echo.seen[-1] == (result.text, context)  # the context field is not rewritten
    if gated:
        assert echo.seen[0] == (text, context) and get_gate(pred)["first_score"] == -1.0
    else:
        (record,) = get_rewrites(pred)
        assert record.original == text and record.rewritten == result.text
    assert asyncio.run(module.acall(question=text, context=context)).answer == pred.answer


@PROPERTY
@given(value=st.one_of(st.none(), st.integers(), st.binary(max_size=6), st.lists(ANY_TEXT, max_size=2)))
def test_a_field_that_is_not_text_reaches_the_program_unchanged(real_prompter, value):
    echo = Echo()
    pred = AlignProModule(echo, real_prompter, fields=["question"])(question=value)
    assert echo.seen == [(value, None)] and get_rewrites(pred) == []
