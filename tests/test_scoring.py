"""Batch scoring: exact top-k vs brute force, resume skips finished parts, shards add up."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.errors import NewsrecError
from newsrec.inference.scoring import encode_all_news, score_impressions
from newsrec.eval.scoring import ExactRetriever, latest_histories, read_scores, score
from newsrec.inference.model_io import load_model, save_model
from tests.test_evaluate import _real_model, make_artifact, tiny_config


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("data") / "tiny", seed=1)


@pytest.fixture(scope="module")
def model_dir(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "m"
    save_model(out, _real_model(artifact), tiny_config(), dataset=artifact)
    return out


def test_exact_retriever_equals_brute_force_with_exclusions():
    rng = np.random.default_rng(0)
    vectors = torch.from_numpy(rng.normal(size=(30, 4)).astype(np.float32))
    vectors[0] = 0
    pool = np.arange(1, 30)
    queries = rng.normal(size=(7, 4)).astype(np.float32)
    exclude = [set(rng.choice(pool, 3, replace=False).tolist()) for _ in range(7)]
    got = ExactRetriever(vectors, pool, batch_size=3).search(queries, 5, exclude=exclude)
    for b in range(7):
        s = vectors.numpy()[pool] @ queries[b]
        allowed = [(sc, k) for sc, k in zip(s, pool) if k not in exclude[b]]
        want = sorted(allowed, key=lambda t: -t[0])[:5]
        np.testing.assert_array_equal(got.keys[b], [k for _, k in want])
        np.testing.assert_allclose(got.scores[b], [sc for sc, _ in want], rtol=1e-5)
    # more than the pool: padded with -1 / -inf
    small = ExactRetriever(vectors, np.array([3, 4]), batch_size=2).search(queries[:2], 4, exclude=[{3}, set()])
    assert list(small.keys[0]) == [4, -1, -1, -1] and np.isneginf(small.scores[0, 1:]).all()


def test_latest_history_is_from_the_most_recent_impression(artifact):
    users = latest_histories(artifact)
    assert list(users.user_ids) == sorted(users.user_ids)
    # the hand-made artifact gives every user one fixed history, so check via the last impression
    last = {}
    for split in artifact.splits:
        imps = artifact.impressions(split)
        for i in range(len(imps)):
            key = imps.time[i]
            if imps.user_id[i] not in last or key >= last[imps.user_id[i]][0]:
                last[imps.user_id[i]] = (key, imps.history_of(i))
    for r, user in enumerate(users.user_ids):
        np.testing.assert_array_equal(users.full(r), last[user][1])


def test_split_scores_equal_the_fast_path(artifact, model_dir, tmp_path):
    result = score(model_dir, artifact.root, out=tmp_path / "s.parquet", split="dev", chunk_users=7,
                   show_progress=False)
    assert result.chunks_written == 5  # 30 impressions / 7
    frame = read_scores(tmp_path / "s.parquet")
    loaded = load_model(model_dir)
    imps = artifact.impressions("dev")
    want = score_impressions(loaded.model, artifact, imps, history_len=50, show_progress=False)
    np.testing.assert_allclose(frame["score"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert frame["impression_id"].to_list() == np.repeat(imps.impression_id, imps.candidate_counts).tolist()
    assert frame["news_id"].to_list() == [f"N{i}" for i in imps.candidates]


def test_top_k_matches_brute_force(artifact, model_dir, tmp_path):
    score(model_dir, artifact.root, out=tmp_path / "t", top_k=5, chunk_users=5, show_progress=False)
    frame = read_scores(tmp_path / "t")
    users = latest_histories(artifact)
    assert frame["user_id"].to_list() == list(users.user_ids)
    loaded = load_model(model_dir)
    vectors = encode_all_news(loaded.model, artifact, show_progress=False)
    for r in range(len(users.user_ids)):
        hist = users.full(r)
        with torch.no_grad():
            h = torch.from_numpy(hist[-50:].astype(np.int64))
            user = loaded.model.encode_user(vectors[h][None], torch.ones(1, len(h), dtype=torch.bool))
            all_scores = loaded.model.score(user, vectors[1:][None])[0].numpy()  # via the model's score
        all_scores[hist - 1] = -np.inf  # clicked news excluded
        best = np.argsort(-all_scores, kind="stable")[:5] + 1
        assert frame["news_ids"][r].to_list() == [f"N{i}" for i in best]
        np.testing.assert_allclose(frame["scores"][r].to_numpy(), all_scores[best - 1], rtol=1e-4, atol=1e-5)


def test_resume_skips_finished_chunks_and_equals_uninterrupted(artifact, model_dir, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(NewsrecError, match="stopped after 2"):
        score(model_dir, artifact.root, out=out, top_k=4, chunk_users=3, fail_after_chunks=2, show_progress=False)
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    result = score(model_dir, artifact.root, out=out, top_k=4, chunk_users=3, show_progress=False)
    assert result.chunks_skipped == 2 and result.chunks_written == 2  # 12 users / 3
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in parts)
    straight = tmp_path / "straight"
    score(model_dir, artifact.root, out=straight, top_k=4, chunk_users=3, show_progress=False)
    assert read_scores(out).equals(read_scores(straight))
    # other arguments: refused, then --force starts over
    with pytest.raises(NewsrecError, match="differs in: top_k"):
        score(model_dir, artifact.root, out=out, top_k=3, chunk_users=3, show_progress=False)
    again = score(model_dir, artifact.root, out=out, top_k=3, chunk_users=3, force=True, show_progress=False)
    assert again.chunks_written == 4 and len(read_scores(out)["news_ids"][0]) == 3


def test_shards_union_equals_unsharded(artifact, model_dir, tmp_path):
    whole = tmp_path / "whole"
    score(model_dir, artifact.root, out=whole, split="dev", chunk_users=4, show_progress=False)
    sharded = tmp_path / "sharded"
    for i in range(3):
        score(model_dir, artifact.root, out=sharded, split="dev", chunk_users=4, shard=f"{i}/3",
              show_progress=False)
    assert read_scores(sharded).equals(read_scores(whole))
    assert len(list(sharded.glob("_manifest.shard-*-of-3.json"))) == 3


def test_rank_and_world_size_pick_the_shard(artifact, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = score(model_dir, artifact.root, out=tmp_path / "w", split="dev", chunk_users=10, show_progress=False)
    assert result.shard == (1, 2)
    assert [p.name for p in sorted((tmp_path / "w").glob("part-*"))] == ["part-00001.parquet", "part-00002.parquet"]


def test_pool_split_and_cli(artifact, model_dir, tmp_path):
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(main, ["score", "--model", str(model_dir), "--data", str(artifact.root),
                                       "--out", str(out), "--top-k", "3", "--pool", "split", "--split", "dev"])
    assert result.exit_code == 0, result.output
    assert "users/s" in result.output
    pool = {f"N{i}" for i in np.unique(artifact.impressions("dev").candidates)}
    frame = read_scores(out)
    assert set(frame["news_ids"].explode().drop_nulls().to_list()) <= pool
    bad = CliRunner().invoke(main, ["score", "--model", str(model_dir), "--data", str(artifact.root),
                                    "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "--top-k K" in bad.output


def test_merge_by_maximum_keeps_each_key_once_at_its_best_score():
    from newsrec.inference.scoring import merge_by_maximum

    rng = np.random.default_rng(2)
    keys = rng.integers(-1, 9, size=(50, 12))
    scores = rng.normal(size=(50, 12)).astype(np.float32)
    for k in (1, 4, 12, 15):
        got_keys, got_scores = merge_by_maximum(keys, scores, k)
        assert got_keys.shape == got_scores.shape == (50, k)
        for b in range(50):
            best: dict[int, float] = {}
            for key, s in zip(keys[b], scores[b]):
                if key >= 0 and s > best.get(int(key), -np.inf):
                    best[int(key)] = float(s)
            want = sorted(best.items(), key=lambda t: -t[1])[:k]
            n = len(want)
            assert list(got_keys[b, :n]) == [key for key, _ in want]
            np.testing.assert_allclose(got_scores[b, :n], [s for _, s in want])
            assert (got_keys[b, n:] == -1).all() and np.isneginf(got_scores[b, n:]).all()


def test_retrieve_with_interest_vectors_equals_brute_force_maximum():
    from newsrec.config import ModelConfig
    from newsrec.inference.scoring import retrieve
    from newsrec.models.recommender import NewsRecommender

    torch.manual_seed(0)
    model = NewsRecommender(ModelConfig(embedding_dim=8, hidden_size=8, num_heads=2, pooling_hidden=4,
                                        user_interests=3), vocab_size=20, n_categories=3, n_subcategories=4).eval()
    rng = np.random.default_rng(3)
    vectors = torch.from_numpy(rng.normal(size=(40, model.news_dim)).astype(np.float32))
    vectors[0] = 0
    pool = np.arange(1, 40)
    users = torch.from_numpy(rng.normal(size=(6, model.user_dim)).astype(np.float32))
    exclude = [set(rng.choice(pool, 4, replace=False).tolist()) for _ in range(6)]
    keys, scores = retrieve(model, ExactRetriever(vectors, pool), users, 7, exclude=exclude)
    brute = model.score_pool(users, vectors).numpy()
    for b in range(6):
        allowed = [(float(brute[b, j]), int(j)) for j in pool if j not in exclude[b]]
        want = sorted(allowed, key=lambda t: -t[0])[:7]
        assert list(keys[b]) == [j for _, j in want]
        np.testing.assert_allclose(scores[b], [s for s, _ in want], rtol=1e-5)
