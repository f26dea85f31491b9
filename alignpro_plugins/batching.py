"""Micro-batching for one model shared by many callers.

Callers submit single items and get futures; one worker thread drains the queue into batches and runs one
batched call at a time, so concurrent threads and coroutines never interleave ``generate`` on one model and
still get the throughput of batched generation.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[Hashable, list[T]], Sequence[R]],
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        name: str = "alignpro-batcher",
    ) -> None:
        # Checked here: a bad value would otherwise hang callers (an empty batch slice) or kill the worker.
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if (
            isinstance(max_wait_s, bool)
            or not isinstance(max_wait_s, (int, float))
            or not math.isfinite(max_wait_s)
            or max_wait_s < 0
        ):
            raise ValueError(f"max_wait_s must be a finite number of seconds >= 0, got {max_wait_s!r}")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[tuple[Hashable, T, Future[R]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._name = name

    def submit(self, key: Hashable, item: T) -> Future[R]:
        """Queue one item; items with the same ``key`` (generation settings) may share a batch."""
        fut: Future[R] = Future()
        self._ensure_started()
        self._queue.put((key, item, fut))
        return fut

    def submit_many(self, key: Hashable, items: Sequence[T]) -> list[Future[R]]:
        return [self.submit(key, item) for item in items]

    def _ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        pending: list[tuple[Hashable, T, Future[R]]] = []
        while True:
            if not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.append(first)
            # Drain what is already queued (waiting briefly) so concurrent callers share one batch.
            while len(pending) < self.max_batch_size * 4:
                try:
                    nxt = self._queue.get(timeout=self.max_wait_s)
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                pending.append(nxt)
            key = pending[0][0]
            batch = [p for p in pending if p[0] == key][: self.max_batch_size]
            taken = {id(p) for p in batch}
            pending = [p for p in pending if id(p) not in taken]
            live = [p for p in batch if p[2].set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._fn(key, [p[1] for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batched call returned {len(results)} results for {len(live)} items")
                for (_, _, fut), res in zip(live, results, strict=True):
                    fut.set_result(res)
            except BaseException as exc:  # delivered to every caller of the failed batch
                for _, _, fut in live:
                    fut.set_exception(exc)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)


def wait_all(futures: list[Future[Any]]) -> list[Any]:
    return [f.result() for f in futures]
