"""Micro-batching: the model work of requests that arrive together runs as one batched call.

Under concurrent load each ``/recommend`` would otherwise run its own small encoder, index search
and re-ranker calls in its own thread. Small calls are dominated by per-call overhead, and more
compute threads than cores only thrash caches and the interpreter lock. ``MicroBatcher`` hands the
work to one worker thread instead. The worker takes every request that is waiting (up to
``max_batch``) and runs them in one call. It never waits for a batch to fill: a request that
arrives alone runs at once, and batches form only while the worker is busy.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Runs ``run_batch(items) -> results`` (one result per item, same order) on a worker thread
    over the items submitted while it was busy.

    ``submit`` blocks until its item's result is ready and returns it, or raises what
    ``run_batch`` raised for it; ``submit_future`` returns a future of it instead (for event
    loops). When a batch of several items fails, each item is run again alone, so a request that
    breaks the model call fails by itself and never takes its neighbours down. After ``close``,
    items run in the calling thread.
    """

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]], *, max_batch: int,
                 name: str = "newsrec-batcher") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self._name = name
        self._queue: deque[tuple[Item, Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # batched calls made
        self.items = 0  # items they held

    def submit(self, item: Item) -> Result:
        return self.submit_future(item).result()

    def submit_future(self, item: Item) -> Future:
        """Queue ``item``; its result (or exception) arrives in the returned future."""
        future: Future = Future()
        with self._cond:
            closed = self._closed
            if not closed:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                    self._thread.start()
                self._queue.append((item, future))
                self._cond.notify()
        if closed:
            self._run([(item, future)])  # in the calling thread
        return future

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued items, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
                self.batches += 1
                self.items += len(batch)
            self._run(batch)

    def _run(self, batch: list[tuple[Item, Future]]) -> None:
        try:
            results = self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request(s)
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
            else:
                for one in batch:
                    self._run([one])
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)
