"""Frozen targets: local transformers batching, caching, callables, and a real OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from alignpro_plugins.manifest import weights_hash
from alignpro_plugins.targets import (
    CachedTarget,
    CallableTarget,
    FrozenTarget,
    OpenAICompatibleTarget,
    TargetError,
    TransformersTarget,
    as_target,
    public_url,
)
from alignpro_plugins.targets.remote import retry_after
from tests.openai_server import OpenAIServer, transformers_responder
from tests.test_prompter import varied_lm

# Different lengths, so the length-sorted batches differ from the input order.
PROMPTS = [
    f"{'long ' * (i * 7 % 10)}request {i} about {'tea sea code json list math'.split()[i % 6]}?"
    for i in range(10)
]


@pytest.fixture(scope="module")
def varied():
    return varied_lm()


def spy_generate(monkeypatch, model, fail_on_call: int | None = None) -> list[int]:
    sizes: list[int] = []
    real = model.generate

    def generate(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if fail_on_call is not None and len(sizes) == fail_on_call:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return sizes


# ---------------------------------------------------------------------------------------------- transformers
def test_transformers_target_batches_and_keeps_order(varied, monkeypatch):
    model, tok = varied
    target = TransformersTarget(model, tok, max_new_tokens=8, batch_size=3, name="varied")
    singles = [target.generate([p])[0] for p in PROMPTS]
    assert len(set(singles)) >= 5  # answers really depend on the prompt
    sizes = spy_generate(monkeypatch, model)
    assert target.generate(PROMPTS) == singles
    # Similar lengths: the fewest calls of at most batch_size rows (which rows share a call follows padding).
    assert sum(sizes) == len(PROMPTS) and max(sizes) == 3 and len(sizes) == 4
    assert target.stats.calls == 2 * len(PROMPTS) and target.stats.failures == 0
    assert target.identity == "transformers:varied"
    assert target.settings == {"max_new_tokens": 8, "temperature": 0.0, "system": None}


def test_transformers_target_gives_a_long_prompt_its_own_call(varied, monkeypatch):
    model, tok = varied
    target = TransformersTarget(model, tok, max_new_tokens=2, batch_size=8, name="varied")
    short = [f"request {i} about tea?" for i in range(4)]  # equal lengths: one call pads none of them
    long = "long " * 60 + "request?"  # padding the short ones to this costs more than a second decode loop
    prompts = [short[0], long, *short[1:]]
    singles = [target.generate([p])[0] for p in prompts]
    sizes = spy_generate(monkeypatch, model)
    assert target.generate(prompts) == singles  # order restored
    assert sorted(sizes) == [1, 4]
    assert target.generate([]) == [] and len(sizes) == 2  # nothing to answer: no call


def test_transformers_target_counts_a_failed_batch_and_keeps_going(varied, monkeypatch, caplog):
    model, tok = varied
    target = TransformersTarget(model, tok, max_new_tokens=8, batch_size=3, name="varied")
    singles = [target.generate([p])[0] for p in PROMPTS]
    sizes = spy_generate(monkeypatch, model, fail_on_call=2)
    answers = target.generate(PROMPTS)
    failed = [i for i, a in enumerate(answers) if a != singles[i]]
    assert len(sizes) == 4 and sum(sizes) == len(PROMPTS)  # every call ran, the failed one too
    assert len(failed) == sizes[1] and all(answers[i] == "" for i in failed)  # only the second call's rows
    assert target.stats.failures == sizes[1]
    assert target.stats.last_error == "RuntimeError: out of memory"
    assert "failed on a prompt" in caplog.text


async def test_transformers_target_async_matches_sync(varied):
    model, tok = varied
    target = TransformersTarget(model, tok, max_new_tokens=6, batch_size=4, system_prompt="Be brief.")
    assert await target.agenerate(PROMPTS[:5]) == target.generate(PROMPTS[:5])
    assert target.format("hi").startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_transformers_target_from_a_folder(tiny_lm_dir):
    target = as_target(tiny_lm_dir, max_new_tokens=4, device="cpu")
    assert isinstance(target, TransformersTarget)
    weights = weights_hash(tiny_lm_dir).removeprefix("sha256:")[:12]
    assert target.identity == f"transformers:{tiny_lm_dir}@{weights}"
    answers = target(["hello", "world"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_target_folder_changed_in_place_does_not_answer_from_the_old_cache(tiny_lm_dir, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "target"
    shutil.copytree(tiny_lm_dir, folder)
    cache = tmp_path / "cache.jsonl"
    before = CachedTarget(TransformersTarget(str(folder), max_new_tokens=4, device="cpu"), cache)
    before(["hello"])
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    model.save_pretrained(str(folder))  # e.g. a target fine-tuned and saved over its folder
    after = CachedTarget(TransformersTarget(str(folder), max_new_tokens=4, device="cpu"), cache)
    assert after.identity != before.identity
    after(["hello"])
    assert after.stats.cache_hits == 0 and after.stats.calls == 1  # answered, not read from the cache


def test_transformers_target_dtype_loads_the_model_so_and_keys_the_cache(tiny_lm_dir, tmp_path):
    import torch

    from trainers.arguments import TargetArguments
    from trainers.common import build_target

    fp32 = TransformersTarget(tiny_lm_dir, max_new_tokens=4, device="cpu", dtype="float32")
    bf16 = TransformersTarget(tiny_lm_dir, max_new_tokens=4, device="cpu", dtype="bfloat16")
    assert fp32.model.dtype == torch.float32 and bf16.model.dtype == torch.bfloat16
    assert "dtype" not in fp32.settings  # fp32 keeps the key caches were written under
    assert bf16.settings == fp32.settings | {"dtype": "bfloat16"}
    cache = tmp_path / "cache.jsonl"
    CachedTarget(fp32, cache)(["hello"])
    cached_bf16 = CachedTarget(bf16, cache)
    assert len(cached_bf16(["hello"])) == 1
    assert cached_bf16.stats.cache_hits == 0  # an fp32 answer is not a bf16 one
    with pytest.raises(ValueError, match=r"dtype must be 'auto' or one of .*'bfloat16'.*got 'bf16'"):
        TransformersTarget(tiny_lm_dir, device="cpu", dtype="bf16")

    args = TargetArguments(target=tiny_lm_dir, target_dtype="bfloat16")
    assert build_target(args, str(tmp_path)).target.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="target_dtype must be 'auto' or one of"):
        TargetArguments(target=tiny_lm_dir, target_dtype="half")


def test_transformers_target_says_which_answers_were_cut_at_the_cap(varied):
    model, tok = varied
    target = TransformersTarget(model, tok, max_new_tokens=4, batch_size=4, name="varied")

    def generated_ids(prompt: str) -> list[int]:
        enc = tok(target.format(prompt), return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[0, enc["input_ids"].shape[1] :].tolist()

    plain = target.generate(PROMPTS[:6])
    rows = target.generate_ended(PROMPTS[:6])
    assert [a for a, _ in rows] == plain
    assert not any(ended for _, ended in rows)  # this model emits no EOS in 4 tokens: every answer is cut
    # Declare the first token of prompt 0's answer an EOS: that answer now ends on its own, in a batch with others.
    first = generated_ids(PROMPTS[0])[0]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first]
    try:
        expected = [first in generated_ids(p) for p in PROMPTS[:6]]
        rows = target.generate_ended(PROMPTS[:6])
    finally:
        model.generation_config.eos_token_id = old
    assert expected[0] and not all(expected) and [ended for _, ended in rows] == expected
    assert target.stats.calls == 18


def test_transformers_target_needs_a_tokenizer_with_a_model(varied):
    with pytest.raises(TypeError, match="tokenizer"):
        TransformersTarget(varied[0])


# ---------------------------------------------------------------------------------------------- cache
class Counting(FrozenTarget):
    """Answers ``<name>:<prompt>`` and records every prompt it is asked."""

    def __init__(self, name: str = "a", temperature: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.temperature = temperature
        self.asked: list[str] = []

    @property
    def identity(self) -> str:
        return f"counting:{self.name}"

    @property
    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def _generate(self, prompts: list[str]) -> list[str]:
        self.asked += prompts
        return [f"{self.name}:{p}:{self.temperature}" for p in prompts]


def test_cache_hits_by_target_settings_and_prompt():
    inner = Counting()
    cached = CachedTarget(inner)
    assert cached.generate(["x", "y", "x"]) == ["a:x:0.0", "a:y:0.0", "a:x:0.0"]
    assert inner.asked == ["x", "y"]  # duplicates inside one call are asked once
    assert cached.generate(["y", "x"]) == ["a:y:0.0", "a:x:0.0"]
    assert inner.asked == ["x", "y"]
    assert cached.stats.cache_hits == 2
    inner.temperature = 0.7  # other settings, other answers
    assert cached.generate(["x"]) == ["a:x:0.7"]
    assert inner.asked == ["x", "y", "x"]
    assert cached.identity == inner.identity and cached.settings == inner.settings


def test_cache_persists_as_jsonl_per_target(tmp_path):
    path = tmp_path / "cache" / "answers.jsonl"
    first = CachedTarget(Counting("a"), path)
    first.generate(["x", "y"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["a:x:0.0", "a:y:0.0"]
    assert all(len(r["key"]) == 64 for r in rows)

    again = Counting("a")
    assert CachedTarget(again, path).generate(["y", "x"]) == ["a:y:0.0", "a:x:0.0"]
    assert again.asked == []  # served from disk
    other = Counting("b")  # a different target never sees another target's answers
    assert CachedTarget(other, path).generate(["x"]) == ["b:x:0.0"]
    assert other.asked == ["x"]
    assert len(path.read_text().splitlines()) == 3


def test_cached_peeks_without_generating(tmp_path):
    path = tmp_path / "answers.jsonl"
    CachedTarget(Counting("a"), path).generate(["x"])
    inner = Counting("a")
    peek = CachedTarget(inner, path)
    assert peek.cached("x") == "a:x:0.0"
    assert peek.cached("y") is None
    inner.temperature = 0.7  # other settings: not the stored answer
    assert peek.cached("x") is None
    assert inner.asked == [] and peek.stats.calls == 0


def test_failed_answers_are_not_cached():
    calls = {"n": 0}

    def flaky(prompt: str) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("reset")
        return prompt.upper()

    cached = CachedTarget(CallableTarget(flaky))
    assert cached.generate(["abc"]) == [""]
    assert cached.generate(["abc"]) == ["ABC"]
    assert cached.generate(["abc"]) == ["ABC"]
    assert calls["n"] == 2 and cached.stats.failures == 1


def test_cache_survives_a_line_cut_off_by_an_interrupted_run(tmp_path, caplog):
    path = tmp_path / "answers.jsonl"
    CachedTarget(Counting("a"), path).generate(["x", "y"])
    with open(path, "ab") as fh:  # killed mid-write: half a row, cut inside a multi-byte character
        fh.write('{"key": "0123", "answer": "caf\u00e9'.encode()[:-1])
    again = Counting("a")
    resumed = CachedTarget(again, path)  # used to raise a bare JSONDecodeError
    assert f"{path}:3: skipping a malformed line" in caplog.text
    assert resumed.generate(["y", "x", "z"]) == ["a:y:0.0", "a:x:0.0", "a:z:0.0"]
    assert again.asked == ["z"]  # the complete rows were served from disk
    # The new row went on a line of its own, not glued to the broken one: a third run reads it.
    third = Counting("a")
    assert CachedTarget(third, path).generate(["z"]) == ["a:z:0.0"] and third.asked == []
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["answer"] == "a:z:0.0"


async def test_cache_async():
    inner = Counting()
    cached = CachedTarget(inner)
    assert await cached.agenerate(["p", "q"]) == ["a:p:0.0", "a:q:0.0"]
    assert await cached.agenerate(["q"]) == ["a:q:0.0"]
    assert inner.asked == ["p", "q"]


# ---------------------------------------------------------------------------------------------- callables
def test_callable_failures_are_counted_not_raised(caplog):
    def fn(prompt: str) -> str:
        if "bad" in prompt:
            raise ValueError(f"cannot answer {prompt}")
        return prompt[::-1]

    target = CallableTarget(fn, name="reverse")
    assert target.generate(["abc", "bad one", "xyz", "bad two"]) == ["cba", "", "zyx", ""]
    assert target.stats.failures == 2 and target.stats.calls == 4
    assert target.stats.last_error == "ValueError: cannot answer bad two"
    assert target.identity == "callable:reverse"
    assert caplog.text.count("failed on a prompt") == 2


@pytest.mark.parametrize(
    "fn",
    [lambda ps: [p.upper() for p in ps][:-1], lambda ps: 1 / 0],
    ids=["wrong-length", "raises"],
)
def test_batched_callable_failures(fn):
    target = CallableTarget(fn, batched=True)
    assert target.generate(["a", "b", "c"]) == ["", "", ""]
    assert target.stats.failures == 3


def test_batched_callable_and_coercion():
    target = as_target(lambda ps: [p * 2 for p in ps], batched=True)
    assert isinstance(target, CallableTarget)
    assert target(["ab", "c"]) == ["abab", "cc"]
    assert as_target(target) is target
    with pytest.raises(TypeError, match="frozen target"):
        as_target(42)


# ---------------------------------------------------------------------------------------------- OpenAI-compatible
KEY = "sk-test-7f3a9c1e5b2d4f60"


def openai_target(server: OpenAIServer, **kw) -> OpenAICompatibleTarget:
    kw.setdefault("backoff", 0.01)
    return OpenAICompatibleTarget(server.base_url, "tiny", **kw)


def no_answer(call) -> TargetError:
    """The TargetError a call raises (a failure is never an empty answer)."""
    with pytest.raises(TargetError) as err:
        call()
    return err.value


@pytest.mark.server
def test_openai_target_answers_in_order_and_sends_the_request():
    with OpenAIServer(api_key=KEY) as server:
        target = openai_target(server, api_key=KEY, max_tokens=17, temperature=0.3, system_prompt="Be brief.")
        prompts = [f"prompt {i}" for i in range(6)]
        assert target.generate(prompts) == [f"echo: prompt {i}" for i in range(6)]
    assert target.stats.calls == 6 and target.stats.failures == 0
    assert server.statuses() == [200] * 6
    req = next(r for r in server.requests if r.body["messages"][-1]["content"] == "prompt 3")
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body == {
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "prompt 3"}],
        "max_tokens": 17,
        "temperature": 0.3,
    }


@pytest.mark.server
def test_openai_target_sends_the_sampling_fields_and_extra_body():
    with OpenAIServer() as server:
        target = openai_target(
            server, top_p=0.9, seed=7, stop=["\n\n", "END"], extra_body={"top_k": 20, "min_p": 0.05}
        )
        assert target.generate(["hi"]) == ["echo: hi"]
        assert asyncio.run(target.agenerate(["ho"])) == ["echo: ho"]
    for req in server.requests:
        assert {k: req.body[k] for k in ("top_p", "seed", "stop", "top_k", "min_p")} == {
            "top_p": 0.9,
            "seed": 7,
            "stop": ["\n\n", "END"],
            "top_k": 20,
            "min_p": 0.05,
        }
    # They change answers, so they are part of the cache key; unset, the key is what it always was.
    assert target.settings == {
        "max_tokens": 128,
        "temperature": 0.0,
        "system": None,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n", "END"],
        "extra_body": {"top_k": 20, "min_p": 0.05},
    }
    assert OpenAICompatibleTarget("http://127.0.0.1:9/v1", "m", stop="END").stop == ["END"]
    assert OpenAICompatibleTarget("http://127.0.0.1:9/v1", "m").settings == {
        "max_tokens": 128,
        "temperature": 0.0,
        "system": None,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0}, r"top_p must be None or a number in \(0, 1\], got 0"),
        ({"top_p": 1.5}, r"top_p must be None or a number in \(0, 1\]"),
        ({"seed": "7"}, "seed must be None or an integer, got '7'"),
        ({"seed": True}, "seed must be None or an integer"),
        ({"stop": []}, "stop must be None, a non-empty string or a non-empty list"),
        ({"stop": ["ok", 3]}, "stop must be None"),
        ({"extra_body": {"temperature": 1.0, "top_k": 5}}, r"extra_body may not set \['temperature'\]"),
        ({"extra_body": {"messages": []}}, r"extra_body may not set \['messages'\]"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1, got 0"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0, got -1"),
        ({"timeout": 0}, "timeout must be a number of seconds > 0, got 0"),
    ],
)
def test_openai_target_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OpenAICompatibleTarget("http://127.0.0.1:9/v1", "m", **kwargs)


@pytest.mark.server
@pytest.mark.parametrize("statuses", [[500, 503], [429], [502, 429, 500], [408, 409]])
def test_openai_target_retries_transient_errors(statuses):
    with OpenAIServer(failures=statuses) as server:
        target = openai_target(server, max_retries=3)
        assert target.generate(["hello"]) == ["echo: hello"]
    assert server.statuses() == [*statuses, 200]
    assert target.stats.failures == 0


@pytest.mark.server
def test_openai_target_backs_off_exponentially(monkeypatch):
    import alignpro_plugins.targets.remote as targets_mod

    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(seconds: float, *a, **k):
        sleeps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(targets_mod.asyncio, "sleep", recording_sleep)
    with OpenAIServer(failures=[500, 500, 500]) as server:
        target = openai_target(server, max_retries=3, backoff=0.1)
        assert asyncio.run(target.agenerate(["hello"])) == ["echo: hello"]
    # Sleeps of 0.1, 0.2 and 0.4 s, each scaled by a jitter in [0.5, 1.5).
    assert len(sleeps) == 3
    for k, slept in enumerate(sleeps):
        assert 0.1 * 2**k * 0.5 <= slept < 0.1 * 2**k * 1.5


@pytest.mark.server
@pytest.mark.parametrize("path", ["sync", "async"])
def test_openai_target_waits_what_retry_after_asks(path):
    # Before: the 429's Retry-After was ignored and the request retried after the backoff alone.
    with OpenAIServer(failures=[(429, {"Retry-After": "3"})]) as server:
        target = openai_target(server, max_retries=2, backoff=0.01)
        start = time.perf_counter()
        call = target.generate if path == "sync" else lambda ps: asyncio.run(target.agenerate(ps))
        assert call(["hello"]) == ["echo: hello"]
        waited = time.perf_counter() - start
    assert server.statuses() == [429, 200]
    assert 2.9 <= waited < 4.5


@pytest.mark.server
def test_openai_target_does_not_wait_minutes_for_a_retry_after():
    with OpenAIServer(failures=[(503, {"Retry-After": "3600"})]) as server:
        target = openai_target(server, max_retries=3)
        start = time.perf_counter()
        err = no_answer(lambda: target.generate(["x"]))
        assert time.perf_counter() - start < 2
    assert server.statuses() == [503] and err.answers == [None]
    assert "asks to retry after 3600 s, more than the 120 s this target waits" in target.stats.last_error


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "tomorrow-ish"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_milliseconds_and_dates(headers, seconds):
    assert retry_after(headers) == seconds


def test_retry_after_reads_an_http_date():
    from email.utils import format_datetime

    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 28 <= retry_after({"retry-after": format_datetime(when, usegmt=True)}) <= 30


@pytest.mark.server
@pytest.mark.parametrize("path", ["sync", "async"])
def test_openai_target_raises_after_exhausted_retries_and_counts_them(path, caplog):
    # Before: the failed prompt came back as "" (an answer no caller could tell from a real empty one).
    with OpenAIServer(failures=[500] * 5) as server:
        target = openai_target(server, max_retries=2)
        call = target.generate if path == "sync" else lambda ps: asyncio.run(target.agenerate(ps))
        err = no_answer(lambda: call(["a"]))
        assert len(server.requests) == 3
        # The next prompt gets a fresh budget and (after the scripted failures) succeeds.
        target.max_retries = 10
        assert call(["b"]) == ["echo: b"]
        base_url = server.base_url
    assert err.answers == [None] and "1 of 1 prompts got no answer" in str(err)
    assert target.stats.failures == 1
    assert target.stats.last_error == f"RuntimeError: HTTP 500 from {base_url}"
    assert "failed on a prompt" in caplog.text


@pytest.mark.server
@pytest.mark.parametrize("concurrency", [1, 8])
def test_a_server_failing_20_percent_never_yields_an_empty_answer(concurrency):
    # Before (max_retries=1): 5 of 50 answers came back as "" with no error.
    prompts = [f"p{i}" for i in range(50)]
    # Seed 3: with requests in order (concurrency 1), 3 prompts fail twice in a row; no run of 7 failures in the
    # first 300 requests, so 6 retries always suffice.
    with OpenAIServer(fail_rate=0.2, seed=3) as server:
        target = openai_target(server, max_retries=1, concurrency=concurrency)
        try:
            answers: list[str | None] = list(target.generate(prompts))
        except TargetError as err:
            answers = err.answers
    assert 500 in server.statuses()
    missing = [i for i, a in enumerate(answers) if a is None]
    assert len(missing) == target.stats.failures and (concurrency > 1 or len(missing) == 3)
    assert all(a == f"echo: {p}" for p, a in zip(prompts, answers, strict=True) if a is not None)
    # With enough retries every prompt is answered, each with its own answer.
    with OpenAIServer(fail_rate=0.2, seed=3) as server:
        patient = openai_target(server, max_retries=6, concurrency=concurrency)
        assert patient.generate(prompts) == [f"echo: {p}" for p in prompts]
        assert asyncio.run(patient.agenerate(prompts)) == [f"echo: {p}" for p in prompts]
    assert server.statuses().count(500) > 0 and patient.stats.failures == 0


@pytest.mark.server
def test_cached_target_keeps_what_arrived_and_asks_again_only_for_the_rest():
    down = {"b"}

    def respond(messages, body):
        text = messages[-1]["content"]
        if text in down:
            raise RuntimeError(f"{text} is down")
        return f"echo: {text}"

    with OpenAIServer(responder=respond) as server:
        cached = CachedTarget(openai_target(server, max_retries=0, concurrency=1))
        err = no_answer(lambda: cached.generate(["a", "b", "a"]))
        assert err.answers == ["echo: a", None, "echo: a"]  # lined up with the caller's prompts
        assert "calling again asks only for the rest" in str(err)
        assert cached.cached("a") == "echo: a" and cached.cached("b") is None
        down.clear()
        assert cached.generate(["a", "b"]) == ["echo: a", "echo: b"]
        asked = [r.body["messages"][-1]["content"] for r in server.requests]
    assert asked == ["a", "b", "b"]


def test_training_scores_a_missing_answer_as_empty_and_counts_it():
    from trainers.scoring import RewriteScorer

    class Flaky(OpenAICompatibleTarget):
        def _ask(self, prompt: str) -> str | BaseException:
            return RuntimeError("HTTP 500 from here") if "bad" in prompt else f"answer to {prompt}"

    target = Flaky("http://127.0.0.1:9/v1", "m")
    scorer = RewriteScorer(None, target, lambda xs, answers: [float(len(a)) for a in answers])  # type: ignore[arg-type]
    rewards, answers, _ = scorer.score_texts(["x1", "x2"], ["good one", "bad one"])
    assert answers == ["answer to good one", ""] and rewards == [18.0, 0.0]
    assert target.stats.failures == 1 and target.stats.last_error == "RuntimeError: HTTP 500 from here"


@pytest.mark.server
def test_openai_target_reuses_one_client_and_its_connections():
    # Before: a new HTTP client (and connection) per generate call.
    with OpenAIServer() as server:
        target = openai_target(server, concurrency=1)
        for i in range(3):
            assert target.generate([f"s{i}"]) == [f"echo: s{i}"]
        client = target._client()
        assert target.generate(["s3"]) == ["echo: s3"] and target._client() is client

        async def twice() -> list[str]:
            return (await target.agenerate(["a0"])) + (await target.agenerate(["a1"]))

        assert asyncio.run(twice()) == ["echo: a0", "echo: a1"]
        assert asyncio.run(target.agenerate(["a2"])) == ["echo: a2"]  # another event loop: its own client
        target.close()  # the connections go; a later call opens new ones
        assert target.generate(["s4"]) == ["echo: s4"] and target._client() is not client
    peers = [r.peer for r in server.requests]
    assert len(set(peers[:4])) == 1  # four sync calls, one keep-alive connection
    assert peers[4] == peers[5] and len(set(peers)) == 4


@pytest.mark.server
def test_openai_target_does_not_retry_a_rejected_key():
    with OpenAIServer(api_key=KEY) as server:
        target = openai_target(server, api_key="sk-wrong", max_retries=3, backoff=0.5)
        assert no_answer(lambda: target.generate(["a"])).answers == [None]
        base_url = server.base_url
    assert server.statuses() == [401]  # one request: a rejected key is not retried
    assert target.stats.failures == 1
    # The server's own message says what was wrong.
    assert target.stats.last_error == (
        f"RuntimeError: HTTP 401 from {base_url} (not retried): "
        '{"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": null}}'
    )


@pytest.mark.server
def test_openai_target_404_says_what_the_server_said_without_secrets(caplog):
    with OpenAIServer() as server:
        # A wrong path, and a key in the query string: the path is extended before the query.
        target = OpenAICompatibleTarget(f"{server.base_url}/v2?key=SECRET123", "tiny", backoff=0.01)
        no_answer(lambda: target.generate(["a"]))
        base_url = server.base_url
    assert target.stats.last_error == (
        f"RuntimeError: HTTP 404 from {base_url}/v2 (not retried): "
        '{"error": {"message": "no route /v1/v2/chat/completions?***", "type": "not_found", "code": null}}'
    )
    assert "SECRET123" not in caplog.text + repr(target) + target.identity


def test_openai_target_error_excerpt_is_short_and_redacted():
    target = OpenAICompatibleTarget(
        "http://user:pw-77@127.0.0.1:9/v1?api_key=q-secret-9", "tiny", api_key=KEY
    )
    excerpt = target._excerpt(f"bad key {KEY}\n  " + "x" * 1000)
    assert excerpt.startswith("bad key *** xxx") and KEY not in excerpt
    assert len(excerpt) == 300 + 1 and excerpt.endswith("…")
    assert target._excerpt("") == ""
    assert target._excerpt("user pw-77 rejected") == "user *** rejected"
    basic = target._headers()["Authorization"]
    assert basic == "Basic dXNlcjpwdy03Nw=="  # user:pw-77
    assert target._excerpt(f"you sent Authorization: {basic}") == "you sent Authorization: ***"
    assert target._excerpt("got dXNlcjpwdy03Nw== and q-secret-9") == "got *** and ***"


def test_identity_and_repr_never_hold_url_credentials():
    plain = OpenAICompatibleTarget("http://127.0.0.1:8000/v1/", "m")
    assert plain.identity == "openai:http://127.0.0.1:8000/v1:m"  # unchanged: cache keys stay valid
    secret = OpenAICompatibleTarget("https://bob:hunter2@llm.example.com:8443/v1?api_key=abc123", "m")
    assert secret.identity == "openai:https://llm.example.com:8443/v1:m"
    assert "hunter2" not in repr(secret) and "abc123" not in repr(secret)
    # Still sent: the credentials as Basic auth, the query on each request.
    assert secret._headers() == {"Authorization": "Basic Ym9iOmh1bnRlcjI="}
    assert secret._query == "api_key=abc123"
    assert public_url("https://LLM.example.com/v1") == "https://LLM.example.com/v1"
    assert public_url("https://llm.example.com/v1#frag") == "https://llm.example.com/v1"


def test_openai_api_key_from_the_environment_goes_only_to_openai(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert OpenAICompatibleTarget("https://api.openai.com/v1", "m")._headers() == {
        "Authorization": f"Bearer {KEY}"
    }
    for url in (
        "http://127.0.0.1:8000/v1",
        "https://api.together.xyz/v1",
        "https://api.openai.com.attacker.example/v1",
        "http://api.openai.com/v1",  # not over plain HTTP either
    ):
        assert OpenAICompatibleTarget(url, "m")._headers() == {}, url
    assert "not sending $OPENAI_API_KEY to http://127.0.0.1:8000/v1" in caplog.text
    assert KEY not in caplog.text
    # Explicit choices still work for any host.
    assert OpenAICompatibleTarget("http://127.0.0.1:8000/v1", "m", api_key="k1")._headers() == {
        "Authorization": "Bearer k1"
    }
    monkeypatch.setenv("MY_ENDPOINT_KEY", "k2")
    named = OpenAICompatibleTarget("http://127.0.0.1:8000/v1", "m", api_key_env="MY_ENDPOINT_KEY")
    assert named._headers() == {"Authorization": "Bearer k2"}
    with pytest.raises(ValueError, match="not both"):
        OpenAICompatibleTarget("http://127.0.0.1:8000/v1", "m", api_key="k1", api_key_env="MY_ENDPOINT_KEY")
    missing = OpenAICompatibleTarget("http://127.0.0.1:8000/v1", "m", api_key_env="NO_SUCH_ALIGNPRO_VAR")
    assert missing._headers() == {} and "'NO_SUCH_ALIGNPRO_VAR' is not set" in caplog.text


@pytest.mark.server
def test_openai_target_sends_no_openai_key_or_organisation_to_a_local_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-private")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-private")
    with OpenAIServer() as server:
        assert openai_target(server).generate(["x"]) == ["echo: x"]
        assert asyncio.run(openai_target(server).agenerate(["y"])) == ["echo: y"]
    for req in server.requests:
        assert "authorization" not in req.headers
        assert not {"openai-organization", "openai-project"} & set(req.headers)


@pytest.mark.server
def test_openai_target_runs_requests_concurrently_up_to_its_limit():
    with OpenAIServer(delay=0.2) as server:
        target = openai_target(server, concurrency=4)
        answers = target.generate([f"p{i}" for i in range(12)])
        assert server.max_in_flight == 4  # concurrent, and never past the limit
        server.max_in_flight = 0
        assert asyncio.run(target.agenerate([f"q{i}" for i in range(12)])) == [
            f"echo: q{i}" for i in range(12)
        ]
    assert answers == [f"echo: p{i}" for i in range(12)]
    assert server.max_in_flight == 4


def _all_logging_at_debug(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "alignpro_plugins"):
        caplog.set_level(logging.DEBUG, logger=name)


@pytest.mark.server
@pytest.mark.parametrize("path", ["sync", "async"])
def test_no_log_line_holds_a_secret_with_verbose_logging(caplog, path):
    # Before: httpx's INFO line printed the full URL, query key and user:password included, and an error
    # body echoing the Basic-auth header was shown as it was.
    _all_logging_at_debug(caplog)
    query_key, password = "qk-3c9d81aa07", "pw-5e21f0c6bb"
    with OpenAIServer(failures=[500, (429, {"Retry-After": "0"}), 401], echo_secrets=True) as server:
        url = server.base_url.replace("http://", f"http://alice:{password}@") + f"?api_key={query_key}"
        target = OpenAICompatibleTarget(url, "tiny", max_retries=1, backoff=0.01, concurrency=1)
        call = target.generate if path == "sync" else lambda ps: asyncio.run(target.agenerate(ps))
        errors = []
        try:
            call(["first", "second"])  # 500 then 429: first fails; 401: second fails
        except TargetError as exc:
            errors.append(str(exc))
        assert call(["third"]) == ["echo: third"]
        basic = server.requests[0].headers["authorization"]
    # The secrets were sent ...
    assert basic.startswith("Basic ") and all(r.query == f"api_key={query_key}" for r in server.requests)
    assert "HTTP Request: POST" in caplog.text  # ... the transport's INFO line was logged ...
    shown = (
        caplog.text + "".join(errors) + repr(target) + target.identity + json.dumps(target.stats.as_dict())
    )
    for secret in (query_key, password, basic, basic.split()[1]):  # ... but never shown
        assert secret not in shown, secret
    assert "received Authorization: ***; query: ***" in (target.stats.last_error or "")  # the echo, redacted


@pytest.mark.server
def test_openai_target_never_reveals_the_api_key(monkeypatch, caplog):
    _all_logging_at_debug(caplog)
    monkeypatch.setenv("ALIGNPRO_TEST_TARGET_KEY", KEY)
    with OpenAIServer(api_key=KEY, failures=[500, 500], echo_secrets=True) as server:
        target = openai_target(server, max_retries=0, api_key_env="ALIGNPRO_TEST_TARGET_KEY", concurrency=1)
        wrong = openai_target(server, api_key=KEY[::-1], max_retries=0)
        errors = []
        for call in (lambda: target.generate(["x", "y", "z"]), lambda: wrong.generate(["x"])):
            try:
                call()
            except TargetError as exc:
                errors.append(str(exc))
        assert server.requests[2].headers["authorization"] == f"Bearer {KEY}"
    shown = [
        repr(target),
        str(target),
        *errors,
        target.identity,
        json.dumps(target.settings),
        json.dumps(target.stats.as_dict()),
        json.dumps(wrong.stats.as_dict()),
        caplog.text,
    ]
    assert "HTTP 500" in caplog.text  # failures were logged ...
    for text in shown:
        assert KEY not in text and KEY[::-1] not in text  # ... but never the key
    assert "received Authorization: Bearer ***" in (wrong.stats.last_error or "")  # the echo, redacted


@pytest.mark.server
async def test_openai_target_async_and_sync_inside_a_running_loop():
    with OpenAIServer() as server:
        target = openai_target(server)
        assert await target.agenerate(["a", "b"]) == ["echo: a", "echo: b"]
        # Sync generate from inside a running event loop works too (its requests run on worker threads).
        assert target.generate(["c"]) == ["echo: c"]
        cached = CachedTarget(target)
        assert await cached.agenerate(["a", "d"]) == ["echo: a", "echo: d"]
        assert await cached.agenerate(["d", "a"]) == ["echo: d", "echo: a"]
        assert len(server.requests) == 5  # a, b, c, then a and d once each
    assert target.stats.calls == 5


@pytest.mark.server
def test_openai_target_served_by_a_tiny_transformers_model(varied):
    model, tok = varied
    local = TransformersTarget(model, tok, max_new_tokens=8, system_prompt="Answer briefly.")
    expected = local.generate(PROMPTS[:4])
    with OpenAIServer(responder=transformers_responder(model, tok)) as server:
        remote = openai_target(server, max_tokens=8, system_prompt="Answer briefly.", concurrency=4)
        assert remote.generate(PROMPTS[:4]) == expected
    assert remote.stats.failures == 0


@pytest.mark.server
def test_server_reports_broken_responder_as_500_and_target_survives():
    def broken(messages, body):
        raise RuntimeError("model crashed")

    with OpenAIServer(responder=broken) as server:
        target = openai_target(server, max_retries=1)
        err = no_answer(lambda: asyncio.run(target.agenerate(["a"])))
    assert err.answers == [None] and server.statuses() == [500, 500] and target.stats.failures == 1


@pytest.mark.server
def test_concurrent_callers_share_one_target_safely():
    with OpenAIServer(delay=0.02) as server:
        target = openai_target(server, concurrency=2)
        results: dict[int, list[str]] = {}

        def call(i: int) -> None:
            results[i] = target.generate([f"t{i}-a", f"t{i}-b"])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {i: [f"echo: t{i}-a", f"echo: t{i}-b"] for i in range(6)}


def test_dspy_target_uses_supported_call_paths(tiny_lm_dir, recwarn):
    """DSPy 3.4 deprecates messages= calls (gone in 3.5): a DSPy target must not make them."""
    from dspy.utils import DummyLM

    import alignpro_plugins.dspy as adspy
    from alignpro_plugins.targets import DSPyTarget, as_target

    dummy = DSPyTarget(DummyLM([{"answer": "forty-two"}]))
    assert "forty-two" in dummy.generate(["what is six times seven?"])[0]
    local = as_target(adspy.LocalTransformersLM(tiny_lm_dir, max_tokens=4))
    assert isinstance(local, DSPyTarget)
    assert len(local.generate(["a", "b"])) == 2 and local.stats.failures == 0
    assert dummy.stats.failures == 0
    assert not [w for w in recwarn if "deprecated" in str(w.message).lower() and "messages" in str(w.message)]
