"""MicroBatcher: concurrent single submissions become real batches, results go back to the right caller."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from alignpro_plugins.batching import DECODE_STEP_COST_TOKENS, MicroBatcher, plan_batches


class Recorder:
    """A batched function that records every batch it sees; optionally slow or failing."""

    def __init__(self, delay: float = 0.0, fail_on: set[int] | None = None) -> None:
        self.batches: list[tuple[object, list[int]]] = []
        self.delay = delay
        self.fail_on = fail_on or set()
        self.lock = threading.Lock()

    def __call__(self, key, items):
        with self.lock:
            self.batches.append((key, list(items)))
        time.sleep(self.delay)
        if self.fail_on & set(items):
            raise ValueError(f"boom on {sorted(self.fail_on & set(items))}")
        return [(key, item * 10) for item in items]


def test_results_map_to_their_items_in_order():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=4)
    try:
        futures = [b.submit("k", i) for i in range(10)]
        assert [f.result() for f in futures] == [("k", i * 10) for i in range(10)]
        assert all(len(items) <= 4 for _, items in rec.batches)
        assert sorted(i for _, items in rec.batches for i in items) == list(range(10))
    finally:
        b.close()


def test_concurrent_threads_share_batches():
    rec = Recorder(delay=0.05)
    b = MicroBatcher(rec, max_batch_size=16)
    barrier = threading.Barrier(32)

    def call(i: int):
        barrier.wait()
        return b.submit("k", i).result(timeout=30)

    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, range(32)))
        assert results == [("k", i * 10) for i in range(32)]
        assert len(rec.batches) < 32 / 2, rec.batches  # real batching, not one call per caller
        assert max(len(items) for _, items in rec.batches) > 1
        assert all(len(items) <= 16 for _, items in rec.batches)
    finally:
        b.close()


def test_keys_are_never_mixed_in_one_batch():
    rec = Recorder(delay=0.02)
    b = MicroBatcher(rec, max_batch_size=8)
    try:
        futures = [b.submit(("a" if i % 2 else "b"), i) for i in range(20)]
        results = [f.result() for f in futures]
        assert results == [("a" if i % 2 else "b", i * 10) for i in range(20)]
        for key, items in rec.batches:
            assert all(("a" if i % 2 else "b") == key for i in items)
    finally:
        b.close()


def test_a_failed_batch_fails_only_its_callers_and_the_worker_survives():
    rec = Recorder(fail_on={3})
    b = MicroBatcher(rec, max_batch_size=2, max_wait_s=0.05)
    try:
        futures = [b.submit("k", i) for i in range(6)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=10))
            except ValueError as exc:
                outcomes.append(str(exc))
        failed_batch = next(items for _, items in rec.batches if 3 in items)
        for i, out in enumerate(outcomes):
            if i in failed_batch:
                assert out == "boom on [3]"
            else:
                assert out == ("k", i * 10)
        assert b.submit("k", 7).result(timeout=10) == ("k", 70)  # worker still alive
    finally:
        b.close()


def test_wrong_number_of_results_is_an_error_for_every_caller():
    b = MicroBatcher(lambda key, items: items[:-1], max_batch_size=4, max_wait_s=0.05)
    try:
        futures = [b.submit("k", i) for i in [1, 2, 3]]
        for f in futures:
            with pytest.raises(RuntimeError, match="returned"):
                f.result(timeout=10)
    finally:
        b.close()


def test_cancelled_futures_are_skipped():
    started = threading.Event()
    release = threading.Event()
    seen: list[list[int]] = []

    def fn(key, items):
        seen.append(list(items))
        if items == [0]:
            started.set()
            release.wait(10)
        return items

    b = MicroBatcher(fn, max_batch_size=4, max_wait_s=0.0)
    try:
        first = b.submit("k", 0)
        assert started.wait(10)
        queued = [b.submit("k", i) for i in (1, 2, 3)]
        assert queued[1].cancel()
        release.set()
        assert first.result(timeout=10) == 0
        assert [queued[0].result(timeout=10), queued[2].result(timeout=10)] == [1, 3]
        assert 2 not in [i for items in seen for i in items]
    finally:
        b.close()


def test_close_stops_the_worker_and_submit_restarts_it():
    b = MicroBatcher(lambda key, items: items, max_batch_size=4)
    assert b.submit("k", 1).result(timeout=10) == 1
    worker = b._thread
    assert worker is not None and worker.is_alive()
    b.close()
    assert not worker.is_alive()
    assert b.submit("k", 2).result(timeout=10) == 2
    b.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an int >= 1, got 0"),
        ({"max_batch_size": -3}, "max_batch_size must be an int >= 1, got -3"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an int >= 1, got 2.5"),
        ({"max_batch_size": True}, "max_batch_size must be an int >= 1, got True"),
        ({"max_wait_s": -0.1}, "max_wait_s must be a finite number of seconds >= 0, got -0.1"),
        ({"max_wait_s": float("nan")}, "max_wait_s must be a finite number of seconds >= 0, got nan"),
        ({"max_wait_s": "5"}, "max_wait_s must be a finite number of seconds >= 0, got '5'"),
    ],
)
def test_bad_settings_are_rejected_up_front(kwargs, message):
    # Before the check, max_batch_size=0 took empty batches forever and the caller's future never resolved.
    with pytest.raises(ValueError) as err:
        MicroBatcher(lambda key, items: items, **kwargs)
    assert str(err.value) == message


def test_smallest_valid_settings_still_work():
    b = MicroBatcher(lambda key, items: [i + 1 for i in items], max_batch_size=1, max_wait_s=0)
    try:
        assert [b.submit("k", i).result() for i in [1, 2, 3]] == [2, 3, 4]
    finally:
        b.close()


# ---------------------------------------------------------------------------------------------- plan_batches
def plan_cost(plan: list[list[int]], lengths: list[int], new_tokens: int, per_item: int = 1) -> float:
    return sum(
        len(b) * max(lengths[i] for i in b) * per_item + new_tokens * DECODE_STEP_COST_TOKENS for b in plan
    )


def contiguous_plans(n: int, max_rows: int | None):
    """Every split of n sorted items into contiguous calls of at most max_rows (brute force)."""
    if n == 0:
        yield []
        return
    for first in range(1, (max_rows or n) + 1):
        if first > n:
            break
        for rest in contiguous_plans(n - first, max_rows):
            yield [list(range(first))] + [[i + first for i in b] for b in rest]


@pytest.mark.parametrize("seed", range(12))
def test_plan_batches_is_the_cheapest_split_and_covers_every_item_once(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(200, 900)]) for _ in range(n)]
    new_tokens, max_rows, per_item = rng.choice([2, 8, 64]), rng.choice([None, 2, 4]), rng.choice([1, 4])
    plan = plan_batches(lengths, new_tokens=new_tokens, max_rows=max_rows, rows_per_item=per_item)
    assert sorted(i for b in plan for i in b) == list(range(n))
    assert all(len(b) <= (max_rows or n) for b in plan)
    order = sorted(range(n), key=lambda i: lengths[i])
    brute = min(
        plan_cost([[order[i] for i in b] for b in p], lengths, new_tokens, per_item)
        for p in contiguous_plans(n, max_rows)
    )
    assert plan_cost(plan, lengths, new_tokens, per_item) == pytest.approx(brute)


def test_plan_batches_splits_off_an_outlier_only_when_padding_costs_more_than_a_call():
    lengths = [20, 21, 22, 23, 800]
    # 4 short rows padded to 800 cost ~3,100 prompt tokens; a decode loop of 8 steps costs 192, of 256 steps 6,144.
    assert plan_batches(lengths, new_tokens=8) == [[0, 1, 2, 3], [4]]
    assert plan_batches(lengths, new_tokens=256) == [[0, 1, 2, 3, 4]]
    # Four sampled sequences per item multiply the padding, so the split pays off sooner.
    assert plan_batches(lengths, new_tokens=256, rows_per_item=4) == [[0, 1, 2, 3], [4]]
    assert plan_batches([], new_tokens=8) == []


def test_plan_batches_equal_lengths_take_the_fewest_calls():
    assert [len(b) for b in plan_batches([30] * 10, new_tokens=16, max_rows=4)] == [2, 4, 4]
    assert len(plan_batches([30] * 10, new_tokens=16)) == 1


def test_plan_batches_rejects_a_bad_row_cap():
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        plan_batches([1, 2], new_tokens=4, max_rows=0)
