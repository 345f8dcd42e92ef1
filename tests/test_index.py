"""The FAISS news index: exact search equals brute force, ANN recall is high, fresh news can be
added without a rebuild, and INDEX_DIR round-trips."""
from __future__ import annotations

import json

import numpy as np
import pytest

from newsrec.config import IndexConfig
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.serve.index import (build_index, choose_kind, extend_for_l2, extend_queries, load_index,
                                 max_norm_of)


def clustered_vectors(n: int, dim: int, *, n_clusters: int = 20, seed: int = 0) -> np.ndarray:
    """float32 [n, dim]: Gaussian clusters around random centres, like topic-grouped news."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    assign = rng.integers(0, n_clusters, size=n)
    return (centres[assign] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def test_choose_kind_by_size():
    cfg = IndexConfig(flat_max=1000)
    assert choose_kind(1000, cfg) == "flat"
    assert choose_kind(1001, cfg) == "ivfsq"
    assert choose_kind(1001, IndexConfig(flat_max=1000, ann_kind="hnsw")) == "hnsw"
    assert choose_kind(10, IndexConfig(kind="ivfpq")) == "ivfpq"


def test_flat_equals_brute_force():
    vectors = clustered_vectors(500, 24, seed=1)
    keys = np.arange(1, 501, dtype=np.int64)
    queries = clustered_vectors(7, 24, seed=2)
    index = build_index(vectors, keys, cfg=IndexConfig(kind="flat"), base_news=500)
    result = index.search(queries, 15)
    rows, scores = brute_force(vectors, queries, 15)
    np.testing.assert_array_equal(result.keys, keys[rows])
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(result.scores, axis=1) <= 0)


def test_exclude_removes_keys_and_still_returns_k():
    vectors = clustered_vectors(200, 16, seed=3)
    keys = np.arange(1, 201, dtype=np.int64)
    index = build_index(vectors, keys, cfg=IndexConfig(kind="flat"), base_news=200)
    query = vectors[:1]
    top = index.search(query, 10).keys[0]
    excluded = set(top[:5].tolist())
    result = index.search(query, 10, exclude=[excluded])
    assert len(result.keys[0]) == 10 and np.all(result.keys[0] > 0)
    assert not excluded & set(result.keys[0].tolist())
    np.testing.assert_array_equal(result.keys[0][:5], top[5:])


def test_k_larger_than_pool_pads_with_minus_one():
    vectors = clustered_vectors(5, 8)
    index = build_index(vectors, np.arange(1, 6), cfg=IndexConfig(kind="flat"), base_news=5)
    result = index.search(vectors[:2], 8)
    assert (result.keys[:, :5] > 0).all() and (result.keys[:, 5:] == -1).all()
    assert np.isneginf(result.scores[:, 5:]).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfsq"])
def test_ann_recall_on_clustered_set(kind):
    vectors = clustered_vectors(5000, 32, n_clusters=50, seed=4)
    keys = np.arange(1, 5001, dtype=np.int64)
    queries = clustered_vectors(50, 32, n_clusters=50, seed=5)
    cfg = IndexConfig(kind=kind, hnsw_m=32, hnsw_ef_search=256, ivf_nprobe=16)
    index = build_index(vectors, keys, cfg=cfg, base_news=5000)
    assert index.kind == kind
    result = index.search(queries, 50)
    rows, _ = brute_force(vectors, queries, 50)
    recall = np.mean([len(set(result.keys[b]) & set(keys[rows[b]])) / 50 for b in range(50)])
    assert recall >= 0.95, recall
    # scores are exact inner products of the returned keys
    np.testing.assert_allclose(result.scores, np.einsum("bkd,bd->bk", vectors[result.keys - 1], queries),
                               rtol=1e-5, atol=1e-4)


def test_ivfpq_rescored_exactly():
    vectors = clustered_vectors(3000, 32, n_clusters=30, seed=6)
    cfg = IndexConfig(kind="ivfpq", pq_m=8, ivf_nprobe=16)
    index = build_index(vectors, np.arange(1, 3001), cfg=cfg, base_news=3000)
    assert index.faiss_index.d == 40  # 32 + the MIPS coordinate, zero-padded to a multiple of pq_m
    result = index.search(vectors[:3], 10)
    exact = np.einsum("bkd,bd->bk", vectors[result.keys - 1], vectors[:3])
    np.testing.assert_allclose(result.scores, exact, rtol=1e-5, atol=1e-4)
    rows, _ = brute_force(vectors, vectors[:3], 10)
    np.testing.assert_array_equal(result.keys, rows + 1)  # the shortlist (k * pq_k_factor) holds the top 10


def test_ivfsq_codes_are_aligned_and_rescored_exactly():
    vectors = clustered_vectors(3000, 30, n_clusters=30, seed=7)
    index = build_index(vectors, np.arange(1, 3001), cfg=IndexConfig(kind="ivfsq", ivf_nprobe=16),
                        base_news=3000, show_progress=False)
    assert index.faiss_index.d == 32  # 30 + the MIPS coordinate, zero-padded to a multiple of 16
    result = index.search(vectors[:5], 10)
    exact = np.einsum("bkd,bd->bk", vectors[result.keys - 1], vectors[:5])
    np.testing.assert_allclose(result.scores, exact, rtol=1e-5, atol=1e-4)
    rows, _ = brute_force(vectors, vectors[:5], 10)
    np.testing.assert_array_equal(result.keys, rows + 1)  # the shortlist (k * sq_k_factor) holds the top 10


def norm_spread_vectors(n: int, dim: int, *, seed: int) -> np.ndarray:
    """Clustered vectors whose norms vary (lognormal, sigma 0.3) like trained news vectors."""
    scale = np.random.default_rng(seed + 100).lognormal(0.0, 0.3, size=(n, 1)).astype(np.float32)
    return clustered_vectors(n, dim, n_clusters=25, seed=seed) * scale


def test_default_params_recall_on_clustered_20k():
    """recall@100 ≥ 0.95 against exact inner product with the default approximate kind and its
    default parameters, on 20k clustered news vectors with a lognormal norm spread and two-topic
    user queries."""
    kind = IndexConfig().ann_kind
    vectors = norm_spread_vectors(20_000, 32, seed=15)
    queries = (vectors[:200:2] + vectors[1:200:2]) / 2  # users mixing two news' topics
    index = build_index(vectors, np.arange(1, 20_001), cfg=IndexConfig(kind=kind, build_threads=1),
                        base_news=20_000, show_progress=False)
    result = index.search(queries, 100)
    rows, _ = brute_force(vectors, queries, 100)
    recall = np.mean([len(set(result.keys[b]) & set(rows[b] + 1)) / 100 for b in range(len(queries))])
    assert recall >= 0.95, recall


def test_l2_reduction_orders_like_inner_product():
    vectors = norm_spread_vectors(400, 12, seed=11)
    queries = norm_spread_vectors(9, 12, seed=12)
    m = max_norm_of(vectors)
    assert m == pytest.approx(np.linalg.norm(vectors, axis=1).max(), rel=1e-6)
    extended, overflow = extend_for_l2(vectors, max_norm=m, width=13)
    assert extended.shape == (400, 13) and not overflow.any()
    np.testing.assert_allclose(np.linalg.norm(extended, axis=1), m, rtol=1e-4)  # all on one sphere
    q = extend_queries(queries, 13).astype(np.float64)
    l2 = ((q[:, None, :] - extended[None, :, :].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(l2, (queries ** 2).sum(1)[:, None] + m ** 2 - 2 * queries @ vectors.T,
                               rtol=1e-4, atol=1e-3)
    rows, _ = brute_force(vectors, queries, 20)
    np.testing.assert_array_equal(np.argsort(l2, axis=1, kind="stable")[:, :20], rows)
    # and the HNSW index over the extended vectors, with a beam covering the pool, is exact
    index = build_index(vectors, np.arange(1, 401), cfg=IndexConfig(kind="hnsw", hnsw_ef_search=400),
                        base_news=400)
    assert index.params["max_norm"] == pytest.approx(m) and index.faiss_index.d == 13
    np.testing.assert_array_equal(index.search(queries, 20).keys, rows + 1)


def test_fresh_news_longer_than_max_norm_are_found_and_ranked(tmp_path):
    vectors = norm_spread_vectors(3000, 16, seed=13)
    index = build_index(vectors, np.arange(1, 3001), cfg=IndexConfig(kind="hnsw"), base_news=3000)
    m = index.max_norm
    queries = norm_spread_vectors(6, 16, seed=14)
    # fresh news along each query, 2x longer than anything indexed: each must come first for its
    # query, with its exact score, although the reduction cannot place it on the sphere of radius M
    fresh = 2.0 * m * queries / np.linalg.norm(queries, axis=1, keepdims=True)
    keys = np.arange(3001, 3007)
    index.add(fresh, keys)
    assert index.overflow_count == 6 and index.max_norm == m  # M is kept for later news
    all_vectors = np.concatenate([vectors, fresh])
    for idx in (index, index.save(tmp_path / "idx") and load_index(tmp_path / "idx")):
        assert idx.overflow_count == 6
        result = idx.search(queries, 10)
        np.testing.assert_array_equal(result.keys[:, 0], keys)
        np.testing.assert_allclose(result.scores[:, 0], np.einsum("bd,bd->b", fresh, queries), rtol=1e-5)
        rows, _ = brute_force(all_vectors, queries, 10)
        overlap = np.mean([len(set(result.keys[b]) & set(rows[b] + 1)) / 10 for b in range(6)])
        assert overlap >= 0.9, overlap
        assert not set(idx.search(queries, 10, exclude=[{3001}] * 6).keys[0].tolist()) & {3001}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfsq"])
def test_add_fresh_news_then_search_finds_them(kind):
    vectors = clustered_vectors(1000, 16, seed=7)
    index = build_index(vectors, np.arange(1, 1001), cfg=IndexConfig(kind=kind), base_news=1000)
    assert index.next_key == 1001
    fresh = 10.0 * np.eye(16, dtype=np.float32)[:2]  # far out along two axes: top hit for themselves
    index.add(fresh, np.array([1001, 1002]), fresh=[{"news_id": "F1"}, {"news_id": "F2"}])
    assert index.count == 1002 and index.next_key == 1003 and 1002 in index
    result = index.search(fresh, 1)
    np.testing.assert_array_equal(result.keys[:, 0], [1001, 1002])
    np.testing.assert_allclose(index.vectors_of(np.array([1002])), fresh[1:])
    with pytest.raises(NewsrecError, match="already in the index"):
        index.add(fresh[:1], np.array([1001]))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfsq"])
def test_save_load_round_trip(tmp_path, kind):
    vectors = clustered_vectors(800, 16, seed=8)
    index = build_index(vectors, np.arange(1, 801), cfg=IndexConfig(kind=kind),
                        base_news=800, manifest={"model_dir": "m"})
    index.add(np.ones((1, 16), np.float32), np.array([801]), fresh=[{"news_id": "NEW1", "title": "t"}])
    out = tmp_path / "idx"
    index.save(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.faiss", "ids.npy", "vectors.npy", "fresh_news.json", "manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["count"] == 801 and manifest["dim"] == 16
    assert manifest["model_dir"] == "m" and manifest["base_news"] == 800
    loaded = load_index(out)
    assert loaded.fresh == [{"news_id": "NEW1", "title": "t", "key": 801}]
    queries = clustered_vectors(5, 16, seed=9)
    a, b = index.search(queries, 20), loaded.search(queries, 20)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_allclose(a.scores, b.scores)
    assert not list(tmp_path.glob(".idx*"))  # no temporary folder left behind


def test_load_rejects_missing_and_inconsistent(tmp_path):
    with pytest.raises(ArtifactError, match="not an index folder"):
        load_index(tmp_path)
    vectors = clustered_vectors(50, 8)
    out = tmp_path / "idx"
    build_index(vectors, np.arange(1, 51), cfg=IndexConfig(kind="flat"), base_news=50).save(out)
    np.save(out / "ids.npy", np.arange(1, 40, dtype=np.int64))
    with pytest.raises(ArtifactError, match="disagree"):
        load_index(out)
    (out / "vectors.npy").unlink()
    with pytest.raises(ArtifactError, match="vectors.npy is missing"):
        load_index(out)


def test_many_single_adds_keep_every_row():
    vectors = clustered_vectors(300, 8, seed=16)
    index = build_index(vectors, np.arange(1, 301), cfg=IndexConfig(kind="ivf", ivf_nprobe=64), base_news=300)
    before = index.vectors  # a view a running search could hold
    fresh = clustered_vectors(40, 8, seed=17)
    for i in range(40):
        index.add(fresh[i:i + 1], np.array([301 + i]))
    np.testing.assert_array_equal(before, vectors)
    np.testing.assert_array_equal(index.vectors, np.concatenate([vectors, fresh]))
    np.testing.assert_array_equal(index.keys, np.arange(1, 341))
    np.testing.assert_array_equal(index.vectors_of(np.array([340, 1])), np.stack([fresh[39], vectors[0]]))
    rows, _ = brute_force(index.vectors, fresh[:5], 5)
    np.testing.assert_array_equal(index.search(fresh[:5], 5).keys, rows + 1)
