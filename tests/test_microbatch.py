"""Micro-batching of concurrent requests: every caller gets its own result, batches form while the
worker is busy (never larger than max_batch), one failing request does not fail its neighbours, and
the service answers the same whether requests run batched or alone."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from newsrec.config import ServeConfig
from newsrec.serve.batching import MicroBatcher
from newsrec.serve.service import Recommender, _Job
from tests.test_service import serving_dirs  # noqa: F401  (shared fixture)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


class GatedDoubler:
    """run_batch that doubles ints, records batch sizes, fails on negative items, and holds its
    first batch until ``gate`` is set (so the next requests queue up behind it)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        if not self.sizes:
            self.gate.wait(10)
        self.sizes.append(len(items))
        if any(x < 0 for x in items):
            raise ValueError(f"negative item in {items}")
        return [2 * x for x in items]


def _queued_behind_first(batcher: MicroBatcher, run: GatedDoubler, items: list[int]) -> list:
    """Submit 0 (held by the gate), then ``items`` from their own threads once 0 is in flight;
    release the gate when all of them wait in the queue. Returns each item's result or exception."""
    pool = ThreadPoolExecutor(len(items) + 1)
    first = pool.submit(batcher.submit, 0)
    _wait_for(lambda: batcher.batches == 1)
    futures = [pool.submit(batcher.submit, x) for x in items]
    _wait_for(lambda: len(batcher._queue) == len(items))
    run.gate.set()
    assert first.result(10) == 0
    out = []
    for f in futures:
        try:
            out.append(f.result(10))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    pool.shutdown()
    return out


def test_requests_waiting_together_run_as_one_batch():
    run = GatedDoubler()
    batcher = MicroBatcher(run, max_batch=8)
    assert _queued_behind_first(batcher, run, [1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
    assert run.sizes == [1, 5]
    assert batcher.batches == 2 and batcher.mean_batch == 3.0


def test_batches_never_exceed_max_batch():
    run = GatedDoubler()
    batcher = MicroBatcher(run, max_batch=2)
    assert _queued_behind_first(batcher, run, [1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
    assert run.sizes == [1, 2, 2, 1]


def test_a_failing_request_fails_alone():
    run = GatedDoubler()
    batcher = MicroBatcher(run, max_batch=8)
    out = _queued_behind_first(batcher, run, [1, -1, 3])
    assert out[0] == 2 and out[2] == 6
    assert isinstance(out[1], ValueError) and "negative" in str(out[1])
    assert run.sizes == [1, 3, 1, 1, 1]  # the failed batch of 3, then each alone


def test_many_threads_each_get_their_own_answer_and_close_runs_inline():
    batcher = MicroBatcher(lambda items: [x * x for x in items], max_batch=4)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(batcher.submit, range(400))) == [x * x for x in range(400)]
    assert 1 <= batcher.mean_batch <= 4
    batcher.close()
    run = GatedDoubler()
    run.gate.set()
    closed = MicroBatcher(run, max_batch=4)
    closed.close()
    assert closed.submit(21) == 42 and run.threads == {threading.current_thread().name}
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(run, max_batch=0)


@pytest.fixture(scope="module")
def services(serving_dirs):  # noqa: F811
    def load(batch_max: int) -> Recommender:
        return Recommender.load(serving_dirs.model_dir, serving_dirs.index_dir,
                                serve_cfg=ServeConfig(retrieve_k=40, max_k=20, batch_max=batch_max))
    return load(8), load(1)


def test_batched_model_calls_equal_one_request_at_a_time(services):
    batched, _ = services
    users = batched.sample_user_ids(40)
    histories = [batched.user_history(u) for u in users[:6]] + [np.zeros(0, dtype=np.int64)]
    jobs = [_Job(history=h[-batched.history_len:], exclude=set(h.tolist()), retrieve_k=40, now=None)
            for h in histories]
    lengths = {len(j.history) for j in jobs}
    assert len(lengths) >= 3 and 0 in lengths  # padding is exercised: different lengths, one empty
    together = batched._run_jobs(jobs)
    for job, found in zip(jobs, together):
        alone = batched._run_jobs([job])[0]
        np.testing.assert_array_equal(found.keys, alone.keys)
        np.testing.assert_allclose(found.scores, alone.scores, rtol=1e-5, atol=1e-6)
        assert len(found.keys) == 40 and not set(found.keys.tolist()) & job.exclude


def test_concurrent_recommend_batched_equals_unbatched(services):
    batched, single = services
    users = batched.sample_user_ids(24)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda u: batched.recommend(user_id=u, k=10), users))
    for user, rec in zip(users, got):
        want = single.recommend(user_id=user, k=10)
        assert [i.news_id for i in rec.items] == [i.news_id for i in want.items]
        np.testing.assert_allclose([i.score for i in rec.items], [i.score for i in want.items], rtol=1e-5)
        assert rec.history_used == want.history_used
    assert single.stats()["batch_max"] == 1 and batched.stats()["mean_batch"] >= 1


def test_async_recommend_batched_and_unbatched_agree(services):
    import asyncio

    batched, single = services
    users = batched.sample_user_ids(12)

    async def all_of(service: Recommender) -> list:
        return await asyncio.gather(*(service.recommend_async(user_id=u, k=5) for u in users))

    for a, b, user in zip(asyncio.run(all_of(batched)), asyncio.run(all_of(single)), users):
        assert [i.news_id for i in a.items] == [i.news_id for i in b.items]
        np.testing.assert_allclose([i.score for i in a.items], [i.score for i in b.items], rtol=1e-5)
        assert [n.news_id for n in a.history] == [str(batched.news_id_of(int(x)))
                                                  for x in batched.user_history(user)[-batched.history_len:]]
