"""GenerationEngine: the one place that calls transformers' ``generate`` (formatting, planned batches, greedy and
sampled decoding, stop strings, the ended flag, streaming, thread safety)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alignpro_plugins.engine import (
    Generation,
    GenerationEngine,
    GenerationSettings,
    merge_roles,
    plain_chat_text,
    select_device,
    select_dtype,
)
from alignpro_plugins.manifest import GenerationDefaults
from alignpro_plugins.testing import tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
# Different lengths, so length-planned calls differ from the input order.
PROMPTS = [
    f"{'long ' * (i * 7 % 10)}request {i} about {'tea sea code json list math'.split()[i % 6]}?"
    for i in range(8)
]
GREEDY = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def engine():
    model, tok = tiny_causal_lm(0, varied=True)
    eng = GenerationEngine(model.eval(), tok)
    yield eng
    eng.close()


def texts(engine: GenerationEngine, prompts=PROMPTS) -> list[str]:
    return [engine.format_chat([{"role": "user", "content": p}]) for p in prompts]


def plain_generate(engine: GenerationEngine, text: str, max_new_tokens: int) -> list[int]:
    """transformers alone, one prompt, greedy: the reference the engine must match token for token."""
    tok = engine.tokenizer
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = engine.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def spy_generate(monkeypatch, model, fail_on_call: int | None = None) -> list[dict]:
    calls: list[dict] = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs)
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


# ---------------------------------------------------------------------------------------------- loading helpers
def test_select_device_and_dtype():
    assert select_device("cpu") == "cpu" and select_device("cuda:1") == "cuda:1"
    assert select_device("auto") == select_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (
        select_dtype("auto", "cpu") is select_dtype(None, "cpu") is torch.float32
    )  # bf16 is emulated on CPU
    assert (
        select_dtype("bfloat16", "cpu") is torch.bfloat16
        and select_dtype(torch.float16, "cpu") is torch.float16
    )
    with pytest.raises(
        ValueError, match=r"dtype must be 'auto' or one of \['float32', 'bfloat16', 'float16'\]"
    ):
        select_dtype("bf16", "cpu")


def test_settings_from_a_manifest_and_what_reaches_generate():
    greedy = GenerationSettings.from_defaults(GenerationDefaults(max_new_tokens=9))
    assert greedy == GenerationSettings(max_new_tokens=9, repetition_penalty=1.05)  # sampling knobs unused
    assert greedy.generate_kwargs() == {
        "max_new_tokens": 9,
        "do_sample": False,
        "temperature": None,  # unset, so the model's sampling defaults neither apply nor warn
        "top_p": None,
        "top_k": None,
        "repetition_penalty": 1.05,
    }
    sampled = GenerationSettings.from_defaults(GenerationDefaults(do_sample=True, temperature=1.2, top_p=0.9))
    # top_k is not passed: the model's generation config decides it, as it always did for the prompter.
    assert sampled.generate_kwargs() == {
        "max_new_tokens": 64,
        "do_sample": True,
        "temperature": 1.2,
        "top_p": 0.9,
        "repetition_penalty": 1.05,
    }
    off = GenerationSettings(
        max_new_tokens=3, do_sample=True, temperature=0.5, top_p=1.0, top_k=0, max_time=2.0
    )
    assert off.generate_kwargs() == dict(
        max_new_tokens=3, do_sample=True, temperature=0.5, top_p=1.0, top_k=0, max_time=2.0
    )


# ---------------------------------------------------------------------------------------------- formatting
def test_format_chat_uses_the_template_else_plain_text_and_merges_roles_for_a_strict_template(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert engine.format_chat(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    template = engine.tokenizer.chat_template
    try:
        engine.tokenizer.chat_template = None
        assert (
            engine.format_chat(messages)
            == plain_chat_text(messages)
            == "System: Be brief.\nUser: hi\nAssistant:"
        )
        assert engine.format_chat(messages, plain=lambda m: "custom") == "custom"
        # A template that refuses system messages gets them folded into the first user turn.
        engine.tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
            "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        )
        assert engine.format_chat(messages) == "[user] Be brief.\n\nhi\n"
    finally:
        engine.tokenizer.chat_template = template
    assert merge_roles([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]) == [
        {"role": "user", "content": "a\n\nb"}
    ]


# ---------------------------------------------------------------------------------------------- greedy
def test_greedy_generation_matches_transformers_token_for_token(engine):
    queries = texts(engine)
    rows = engine.generate(queries, GREEDY)
    assert [len(row) for row in rows] == [1] * len(queries)
    for query, (gen,) in zip(queries, rows, strict=True):
        ids = plain_generate(engine, query, 6)
        assert gen.text == engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert gen.input_tokens == len(engine.token_ids([query])[0]) and gen.output_tokens == len(ids)
        assert gen.ended is (engine.tokenizer.eos_token_id in ids)
    assert len({g.text for (g,) in rows}) >= 5  # answers really depend on the prompt
    assert rows == [engine.generate([q], GREEDY)[0] for q in queries]  # batched as alone


def test_ended_says_whether_a_sequence_stopped_on_its_own(engine):
    queries = texts(engine)[:4]
    assert not any(
        g.ended for (g,) in engine.generate(queries, GREEDY)
    )  # no EOS in 6 tokens: every row is cut
    # Declare the first token of the first answer an EOS: that answer ends there, in a batch with others.
    first = plain_generate(engine, queries[0], 1)[0]
    config = engine.model.generation_config
    old = config.eos_token_id
    config.eos_token_id = [first]
    try:
        expected = [first in plain_generate(engine, q, 6) for q in queries]
        rows = engine.generate(queries, GREEDY)
    finally:
        config.eos_token_id = old
    assert expected[0] and not all(expected) and [g.ended for (g,) in rows] == expected
    assert rows[0][0].output_tokens == 1  # counted up to and including the EOS


def test_stop_strings_cut_each_row_and_end_it(engine, monkeypatch):
    queries = texts(engine)[:4]
    free = [g for (g,) in engine.generate(queries, replace(GREEDY, max_new_tokens=12))]
    stop = free[0].text[2]  # a character the first answer produces early
    calls = spy_generate(monkeypatch, engine.model)
    rows = engine.generate(queries, replace(GREEDY, max_new_tokens=12, stop=(stop, "")))
    assert "stopping_criteria" in calls[0]  # stopped during generation, not only cut afterwards
    for f, (g,) in zip(free, rows, strict=True):
        if stop in f.text:
            assert g.text == f.text[: f.text.index(stop)] and g.ended
        else:
            assert g == f
    assert rows[0][0].output_tokens < free[0].output_tokens


# ---------------------------------------------------------------------------------------------- planning, sampling
def test_a_long_query_gets_its_own_generate_call_and_order_is_kept(engine, monkeypatch):
    short = texts(engine, [f"request {i} about tea?" for i in range(4)])
    long = texts(engine, ["long " * 60 + "request?"])[0]
    queries = [short[0], long, *short[1:]]
    settings = replace(GREEDY, max_new_tokens=2)
    singles = [engine.generate([q], settings)[0] for q in queries]
    calls = spy_generate(monkeypatch, engine.model)
    # Padding the four short queries to the long one costs more than a second decode loop.
    assert engine.generate(queries, settings) == singles
    assert sorted(c["input_ids"].shape[0] for c in calls) == [1, 4]
    # Sampled: each query's sequences stay together and in its place.
    sampled = engine.generate(queries, replace(settings, do_sample=True, temperature=1.0), 3)
    assert [len(row) for row in sampled] == [3] * 5
    assert sorted(c["input_ids"].shape[0] for c in calls[2:]) == [1, 4]  # queries per call
    assert all(c["num_return_sequences"] == 3 for c in calls[2:])
    assert engine.generate(queries, settings, max_rows=2) == singles
    assert engine.generate([], settings) == []


def test_k_sampled_sequences_per_prompt_and_a_seed_repeats_them(engine):
    queries = texts(engine)[:3]
    settings = GenerationSettings(
        max_new_tokens=8, do_sample=True, temperature=1.5, top_p=1.0, top_k=0, seed=7
    )
    rows = engine.generate(queries, settings, 4)
    assert [len(row) for row in rows] == [4, 4, 4]
    assert all(len({g.text for g in row}) > 1 for row in rows)  # sampled, not one answer repeated
    assert engine.generate(queries, settings, 4) == rows  # seeded: the same draws again
    assert engine.generate(queries, replace(settings, seed=8), 4) != rows


def test_a_failing_call_fails_only_its_own_texts_when_asked(engine, monkeypatch):
    queries = texts(engine)[:3]
    expected = engine.generate(queries, GREEDY)
    spy_generate(monkeypatch, engine.model, fail_on_call=2)
    rows = engine.generate(queries, GREEDY, max_rows=1, return_exceptions=True)
    assert [type(r) for r in rows].count(RuntimeError) == 1
    assert [r for r in rows if not isinstance(r, Exception)] == [
        e for e, r in zip(expected, rows, strict=True) if not isinstance(r, Exception)
    ]
    with pytest.raises(RuntimeError, match="out of memory"):
        spy_generate(monkeypatch, engine.model, fail_on_call=1)
        engine.generate(queries, GREEDY)
    monkeypatch.undo()
    monkeypatch.setattr(engine, "token_ids", lambda texts: 1 / 0)  # even planning fails: every text fails
    assert [type(r) for r in engine.generate(queries, GREEDY, return_exceptions=True)] == [
        ZeroDivisionError
    ] * 3


def test_the_model_can_be_swapped_and_training_mode_is_restored(engine):
    query = texts(engine)[:1]
    before = engine.generate(query, GREEDY)
    other, _ = tiny_causal_lm(1, varied=True)
    original = engine.model
    try:
        engine.model = other.train()  # e.g. a trainer's model mid-training
        swapped = engine.generate(query, GREEDY)
        assert swapped != before and other.training  # generated in eval mode, handed back in training mode
        assert swapped[0][0].text == engine.tokenizer.decode(
            plain_generate(engine, query[0], 6), skip_special_tokens=True
        )
    finally:
        engine.model = original


# ---------------------------------------------------------------------------------------------- streaming
def test_streaming_yields_the_same_text_then_the_counts(engine):
    query = texts(engine)[0]
    (whole,) = engine.generate([query], replace(GREEDY, max_new_tokens=10))[0]
    items = list(engine.stream(query, replace(GREEDY, max_new_tokens=10)))
    pieces, last = items[:-1], items[-1]
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == whole.text and last == whole
    stop = whole.text[3]
    cut = list(engine.stream(query, replace(GREEDY, max_new_tokens=10, stop=(stop,))))
    assert "".join(cut[:-1]) == whole.text[: whole.text.index(stop)] and cut[-1].ended


def test_closing_a_stream_early_stops_its_generation(engine):
    stream = engine.stream(texts(engine)[0], replace(GREEDY, max_new_tokens=400))
    assert isinstance(next(stream), str)
    stream.close()  # joins the generation thread: it must stop at the next token, not after 400
    assert engine.generate(texts(engine)[:1], GREEDY)  # and the model is free again


# ---------------------------------------------------------------------------------------------- thread safety
def test_the_tokenizer_never_holds_padding_state(engine, monkeypatch):
    """The root of issue 39's race: padding settings live on the shared Rust tokenizer, so the engine never
    sets any (it pads itself); one it arrives with is dropped before any thread can race on it."""
    model, tok = tiny_causal_lm(0, varied=True)
    tok(["a", "longer text"], padding=True)  # leaves padding switched on in the backend tokenizer
    assert tok.backend_tokenizer.padding is not None
    fresh = GenerationEngine(model, tok)
    assert tok.backend_tokenizer.padding is None
    fresh.generate(texts(fresh), GREEDY)  # batches of different lengths, padded by the engine
    assert tok.backend_tokenizer.padding is None
    # Callers encoding while the worker encodes batches: no call sees another's settings.
    monkeypatch.setattr(
        model, "generate", lambda input_ids, **kw: torch.cat([input_ids, input_ids[:, :1]], 1)
    )
    stop = threading.Event()

    def batches() -> int:
        n = 0
        while not stop.is_set():
            fresh.generate_call(texts(fresh), GREEDY)
            n += 1
        return n

    with ThreadPoolExecutor(9) as pool:
        worker = pool.submit(batches)
        counts = list(pool.map(lambda i: len(fresh.token_ids(PROMPTS * 20)), range(400)))
        stop.set()
        assert worker.result() > 0
    assert counts == [len(PROMPTS) * 20] * 400
    fresh.close()


def test_only_the_engine_calls_transformers_generate():
    """Every local model generates through the engine (``model.generate`` nowhere else in the library)."""
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("alignpro_plugins", "trainers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bmodel\.generate\(", line)
    ]
    assert [f.split(":")[0] for f in found] == ["alignpro_plugins/engine.py"]


def test_submitted_calls_share_batches(engine, monkeypatch):
    queries = texts(engine, [f"request {i} about tea?" for i in range(8)])
    expected = [engine.generate([q], GREEDY)[0][0] for q in queries]
    calls = spy_generate(monkeypatch, engine.model)
    barrier = threading.Barrier(8)

    def call(q: str) -> Generation:
        barrier.wait()
        return engine.submit(q, GREEDY).result()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, queries))
    assert results == expected
    assert sum(c["input_ids"].shape[0] for c in calls) == 8 and len(calls) < 8  # micro-batched
