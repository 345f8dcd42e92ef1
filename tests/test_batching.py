"""NRMS batches: negatives from the same impression, padding masked, resumable order, dedup exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from newsrec.data.artifact import Impressions
from newsrec.train import batching


def _impressions(rows: list[tuple[list[int], list[int], list[int]]]) -> Impressions:
    """rows: (history, candidates, labels) per impression."""
    def csr(lists, dtype):
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        values = np.array([v for x in lists for v in x], dtype=dtype)
        return values, offsets

    hist, hist_off = csr([r[0] for r in rows], np.int32)
    cand, cand_off = csr([r[1] for r in rows], np.int32)
    lab, _ = csr([r[2] for r in rows], np.int8)
    n = len(rows)
    return Impressions("train", np.arange(1, n + 1, dtype=np.int64), np.array([f"U{i}" for i in range(n)], dtype=object),
                       np.zeros(n, dtype="datetime64[us]"), hist, hist_off, cand, cand_off, lab)


def _random_impressions(n: int, n_news: int, seed: int) -> Impressions:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        hist = list(rng.integers(1, n_news + 1, size=rng.integers(0, 12)))
        n_cand = int(rng.integers(2, 9))
        cands = list(rng.choice(np.arange(1, n_news + 1), size=n_cand, replace=False))
        labels = [0] * n_cand
        for pos in rng.choice(n_cand, size=int(rng.integers(1, 3)), replace=False):
            labels[pos] = 1
        rows.append((hist, cands, labels))
    return _impressions(rows)


def _builder(imps: Impressions, n_news: int, **kw) -> batching.BatchBuilder:
    title_tokens = np.arange((n_news + 1) * 3, dtype=np.int32).reshape(n_news + 1, 3)
    title_tokens[0] = 0
    cat = np.arange(n_news + 1, dtype=np.int64) % 5
    sub = np.arange(n_news + 1, dtype=np.int64) % 7
    opts = dict(batch_size=4, npratio=3, history_len=5, seed=7)
    opts.update(kw)
    return batching.BatchBuilder(imps, title_tokens=title_tokens, category=cat, subcategory=sub, **opts)


def test_samples_are_every_click_with_its_impression_non_clicks():
    imps = _impressions([([1, 2], [10, 11, 12], [0, 1, 0]), ([], [13, 14], [1, 1]), ([3], [15, 16, 17, 18], [0, 0, 1, 0])])
    s = batching.build_samples(imps)
    assert s.impression_row.tolist() == [0, 1, 1, 2]
    assert s.click_news.tolist() == [11, 13, 14, 17]
    assert s.negatives.tolist() == [10, 12, 15, 16, 18]
    assert s.negative_offsets.tolist() == [0, 2, 2, 5]


def test_negatives_come_from_the_same_impression_and_padding_is_masked():
    imps = _impressions([([1, 2], [10, 11, 12], [0, 1, 0]), ([], [13, 14], [1, 1]),
                         ([3], [15, 16, 17, 18, 19, 20], [0, 0, 1, 0, 0, 0])])
    s = batching.build_samples(imps)
    rng = np.random.default_rng(0)
    neg, mask = batching.sample_negatives(s, np.arange(len(s)), npratio=3, rng=rng)
    # impression 0 has two non-clicks: both taken, third slot padding
    assert sorted(neg[0][mask[0]].tolist()) == [10, 12] and mask[0].tolist().count(False) == 1
    assert neg[0][~mask[0]].tolist() == [0]
    # impression 1 has none: all padding
    for i in (1, 2):
        assert not mask[i].any() and (neg[i] == 0).all()
    # impression 2: three distinct of its four non-clicks
    assert mask[3].all() and len(set(neg[3].tolist())) == 3 and set(neg[3].tolist()) <= {15, 16, 18, 19, 20}


def test_negatives_are_drawn_afresh_each_epoch_but_reproducibly():
    imps = _random_impressions(40, 60, seed=1)
    b = _builder(imps, 60, npratio=2)
    e0 = b.build(0, 1)
    e0_again = b.build(0, 1)
    e1 = b.build(1, 1)
    assert torch.equal(e0.candidates, e0_again.candidates)
    assert not torch.equal(e0.candidates, e1.candidates)


def test_batch_rows_match_their_samples():
    imps = _random_impressions(30, 50, seed=2)
    b = _builder(imps, 50)
    order = batching.epoch_order(b.n_samples, seed=7, epoch=0)
    batch = b.build(0, 2)
    ids = order[8:12]
    assert batch.candidates[:, 0].tolist() == b.samples.click_news[ids].tolist()
    assert batch.candidate_mask[:, 0].all()
    for r, sid in enumerate(ids):
        row = int(b.samples.impression_row[sid])
        cands, labels = imps.candidates_of(row), imps.labels_of(row)
        negs = batch.candidates[r, 1:][batch.candidate_mask[r, 1:]].tolist()
        assert set(negs) <= set(cands[labels == 0].tolist())
        assert len(negs) == min(3, int((labels == 0).sum()))
        recent = imps.history_of(row, 5).tolist()
        assert batch.history[r, :len(recent)].tolist() == recent  # most recent, oldest first
        assert batch.history_mask[r].sum().item() == len(recent)
        assert (batch.history[r, len(recent):] == 0).all()


def test_recent_histories_keep_the_end_right_padded():
    imps = _impressions([([1, 2, 3, 4, 5, 6, 7], [9, 8], [1, 0]), ([], [9, 8], [0, 1]), ([4, 5], [9, 8], [1, 0])])
    hist, mask = batching.recent_histories(imps, np.array([0, 1, 2]), history_len=4)
    assert hist.tolist() == [[4, 5, 6, 7], [0, 0, 0, 0], [4, 5, 0, 0]]
    assert mask.tolist() == [[True] * 4, [False] * 4, [True, True, False, False]]


@pytest.mark.parametrize("bucket", [None, 8])
def test_dedup_reconstruction_equals_direct_gather(bucket):
    imps = _random_impressions(50, 30, seed=3)
    b = _builder(imps, 30, batch_size=16, bucket_size=bucket)
    batch = b.build(0, 0)
    # stand-in encoder: a fixed random vector per news; the dedup table must reproduce direct lookup
    table_all = torch.randn(31, 6, generator=torch.Generator().manual_seed(0))
    table_all[0] = 0
    encoded = table_all[batch.unique_news]
    table = torch.cat([torch.zeros(1, 6), encoded])
    assert torch.equal(table[batch.history_slots], table_all[batch.history])
    assert torch.equal(table[batch.candidate_slots], table_all[batch.candidates])
    uniq = torch.unique(torch.cat([batch.history.ravel(), batch.candidates.ravel()]))
    assert batch.n_unique == int((uniq > 0).sum())
    assert len(set(batch.unique_news[:batch.n_unique].tolist())) == batch.n_unique
    if bucket:
        assert len(batch.unique_news) % bucket == 0
    else:
        assert len(batch.unique_news) == batch.n_unique
    assert torch.equal(batch.title_tokens, torch.from_numpy(b.features.title_tokens[batch.unique_news.numpy()]).long())
    assert torch.equal(batch.category, batch.unique_news % 5)


def test_shards_of_a_global_batch_cover_it_exactly():
    imps = _random_impressions(30, 40, seed=4)
    single = _builder(imps, 40, batch_size=7).build(3, 1)
    shards = [_builder(imps, 40, batch_size=7, rank=r, world_size=2).build(3, 1) for r in range(2)]
    assert [s.size for s in shards] == [4, 3]
    assert torch.equal(torch.cat([s.candidates for s in shards]), single.candidates)
    assert torch.equal(torch.cat([s.history for s in shards]), single.history)
    assert all(s.global_batch_size == 7 for s in shards)


def test_background_batches_equal_inline_and_resume_mid_epoch():
    imps = _random_impressions(60, 40, seed=5)
    b = _builder(imps, 40)
    inline = list(b.epoch_batches(2, num_workers=0))
    threaded = list(b.epoch_batches(2, num_workers=2))
    resumed = list(b.epoch_batches(2, start_batch=3, num_workers=1))
    assert len(inline) == b.batches_per_epoch == -(-b.n_samples // 4)
    for x, y in zip(inline, threaded):
        assert torch.equal(x.candidates, y.candidates) and torch.equal(x.history, y.history)
    assert [x.batch_index for x in resumed] == list(range(3, len(inline)))
    for x, y in zip(inline[3:], resumed):
        assert torch.equal(x.candidates, y.candidates)
    # every sample appears exactly once per epoch
    clicks = torch.cat([x.candidates[:, 0] for x in inline]).sort().values
    assert clicks.tolist() == sorted(b.samples.click_news.tolist())


def test_batches_per_epoch_drops_only_a_last_batch_smaller_than_the_world():
    assert batching.batches_per_epoch(10, batch_size=4) == 3
    assert batching.batches_per_epoch(9, batch_size=4, world_size=2) == 2
    assert batching.batches_per_epoch(10, batch_size=4, world_size=2) == 3
    assert batching.shard_bounds(7, rank=1, world_size=3) == (3, 5)
