"""Concurrency: from many threads or coroutines, every caller gets the rewrite of its own prompt, and no batch
fails because of another caller.

The race these tests catch: a fast tokenizer's padding settings are state on its shared Rust object. Callers
tokenized their prompt (the too-long check) without padding while the batch worker tokenized the batch with
padding, so whole batches failed ("Unable to create tensor") or a caller's check failed ("Already borrowed"),
and their prompts passed through unrewritten (issue 39, item 1).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from alignpro_plugins.manifest import GenerationDefaults, Manifest
from alignpro_plugins.prompter import Prompter, RewriteResult
from alignpro_plugins.testing import tiny_causal_lm

# Distinct prompts of many lengths: batches are padded, and every prompt has its own tagged rewrite.
PROMPTS = [f"request {i}: " + "please explain " * (i % 9) + f"topic {i * 13}?" for i in range(64)]


def tagging_generate(tok):
    """A fast stand-in for ``model.generate``: each row's guidance names a tag computed from that row's own
    tokens ("Cover point <tag> first."), so an answer that reached the wrong caller is seen, and so generation
    costs almost nothing and the callers' and the worker's tokenizer calls overlap as much as they can."""

    def generate(input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            own = [t for t, m in zip(ids, mask, strict=True) if m]  # the row without its left padding
            tag = sum(j * t for j, t in enumerate(own, 1)) % 100_003
            rows.append(
                tok(f"Cover point {tag} first.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            )
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    return generate


def make_prompter(*, fast: bool) -> Prompter:
    model, tok = tiny_causal_lm(0, varied=True)
    if fast:
        model.generate = tagging_generate(tok)
    manifest = Manifest(base_model="tiny", mode="augment", generation=GenerationDefaults(max_new_tokens=12))
    return Prompter(model.eval(), tok, manifest, similarity=None)


@pytest.fixture
def fast_prompter():
    pr = make_prompter(fast=True)
    yield pr
    pr.close()


@pytest.fixture(scope="module")
def tiny_prompter():
    pr = make_prompter(fast=False)
    yield pr
    pr.close()


def sequential(prompter: Prompter, prompts: list[str]) -> dict[str, RewriteResult]:
    """Each prompt rewritten alone, one after another: what every concurrent caller must get."""
    return {p: prompter.rewrite_results([p])[0] for p in prompts}


def test_threads_hammering_the_tokenizer_never_fail_a_batch(fast_prompter):
    expected = sequential(fast_prompter, PROMPTS)
    assert all(r.rewritten for r in expected.values())  # the tagged guidance passes the guard
    assert len({r.generated for r in expected.values()}) == len(PROMPTS)  # and differs by prompt
    # 32 threads, each rewriting a few prompts at a time (each call checks its prompts' lengths while the
    # batch worker encodes earlier batches): about 11,000 prompts in all.
    calls = [PROMPTS[i : i + n] for n in (4, 8, 16) for _ in range(12) for i in range(0, len(PROMPTS), 2)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(fast_prompter.rewrite_results, calls))
    fell_back = [r.fallback_reason for chunk in results for r in chunk if not r.rewritten]
    assert fell_back == []
    assert [[r.original for r in chunk] for chunk in results] == calls
    assert all(r == expected[r.original] for chunk in results for r in chunk)


async def test_hundreds_of_concurrent_coroutines_never_fail_a_batch(fast_prompter):
    expected = sequential(fast_prompter, PROMPTS)
    for _ in range(12):  # 12 rounds of 256 concurrent calls
        calls = PROMPTS * 4
        results = await asyncio.gather(*(fast_prompter.arewrite_results([p]) for p in calls))
        fell_back = [r.fallback_reason for (r,) in results if not r.rewritten]
        assert fell_back == []
        assert all(r == expected[p] for p, (r,) in zip(calls, results, strict=True))


def test_32_threads_with_real_generation_each_get_their_own_rewrite(tiny_prompter):
    expected = sequential(tiny_prompter, PROMPTS)
    assert len({r.generated for r in expected.values()}) > 5  # outputs really differ by prompt
    assert 0 < sum(r.rewritten for r in expected.values()) < len(PROMPTS)  # the guard keeps some, not all
    calls = PROMPTS * 4
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(tiny_prompter.rewrite, calls))
        batches = list(pool.map(lambda i: tiny_prompter.rewrite_batch(calls[i : i + 5]), range(0, 64, 5)))
    assert texts == [expected[p].text for p in calls]
    assert batches == [[expected[p].text for p in calls[i : i + 5]] for i in range(0, 64, 5)]


async def test_256_coroutines_with_real_generation_each_get_their_own_rewrite(tiny_prompter):
    expected = sequential(tiny_prompter, PROMPTS)
    calls = PROMPTS * 4
    texts = await asyncio.gather(*(tiny_prompter.arewrite(p) for p in calls))
    assert texts == [expected[p].text for p in calls]
    results = await asyncio.gather(
        *(tiny_prompter.arewrite_results(calls[i : i + 3]) for i in range(0, 96, 3))
    )
    assert [r for chunk in results for r in chunk] == [expected[p] for p in calls[:96]]
    assert await tiny_prompter.arewrite_batch(PROMPTS[:7]) == [expected[p].text for p in PROMPTS[:7]]
