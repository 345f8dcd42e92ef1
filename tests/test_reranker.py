"""The re-ranker: popularity shrinkage, leakage-free counts, candidate-aware attention, masks,
save/load, and a tiny end-to-end fit on a popularity-driven data set that it must learn."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from newsrec.config import RerankConfig, config_from_dict
from newsrec.data import schema
from newsrec.data.artifact import Impressions, open_dataset
from newsrec.data.popularity import PrefixCounts, news_counts_from_impressions, shrunk_ctr
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.models.reranker import FEATURE_NAMES, Reranker, build_features, load_reranker

D = 12  # first-stage news vector width in the model-only tests


def _impressions(times: list[str], candidates: list[list[int]], labels: list[list[int]],
                 histories: list[list[int]] | None = None) -> Impressions:
    histories = histories or [[] for _ in times]

    def csr(rows: list[list[int]], dtype: type) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        values = np.array([v for r in rows for v in r], dtype=dtype)
        return values, offsets

    hist, hist_off = csr(histories, np.int32)
    cand, cand_off = csr(candidates, np.int32)
    lab, _ = csr(labels, np.int8)
    return Impressions("train", np.arange(len(times), dtype=np.int64), np.array(["U"] * len(times), dtype=object),
                       np.array(times, dtype="datetime64[us]"), hist, hist_off, cand, cand_off, lab)


# ------------------------------------------------------------------------------------------------
# popularity


def test_shrinkage_pulls_rare_news_to_the_mean_and_keeps_frequent_news_at_their_ctr():
    mean = 0.05
    clicks = np.array([0, 1, 500, 0])
    shown = np.array([0, 1, 1000, 2000])
    ctr = shrunk_ctr(clicks, shown, prior=20.0, mean_ctr=mean)
    assert ctr[0] == pytest.approx(mean)  # never shown: exactly the mean (cold news)
    assert ctr[1] == pytest.approx((1 + 20 * mean) / 21)  # "1 of 1" is not a CTR of 1
    assert abs(ctr[1] - mean) < 0.05
    assert ctr[2] == pytest.approx((500 + 1) / 1020)  # frequent: near its own 0.5
    assert abs(ctr[2] - 0.5) < 0.01
    assert ctr[3] == pytest.approx(1 / 2020)
    assert shrunk_ctr(np.array([0]), np.array([0]), prior=0.0, mean_ctr=mean)[0] == mean  # no 0/0


def test_prefix_counts_exclude_the_impression_itself_and_later_ones():
    imps = _impressions(
        ["2019-11-10T08:00:00", "2019-11-10T09:00:00", "2019-11-10T09:00:00", "2019-11-10T10:00:00"],
        [[1, 2], [1, 3], [1], [1, 2, 3]],
        [[1, 0], [0, 1], [1], [1, 0, 0]])
    prefix = PrefixCounts(imps)
    clicks, shown = prefix.for_candidates(imps)
    # brute force: events strictly earlier in time
    times = imps.time.astype("datetime64[s]").astype(np.int64)
    want_c, want_s = [], []
    for i in range(len(imps)):
        for n in imps.candidates_of(i):
            earlier = [j for j in range(len(imps)) if times[j] < times[i]]
            want_s.append(sum(int((imps.candidates_of(j) == n).sum()) for j in earlier))
            want_c.append(sum(int(imps.labels_of(j)[imps.candidates_of(j) == n].sum()) for j in earlier))
    np.testing.assert_array_equal(clicks, want_c)
    np.testing.assert_array_equal(shown, want_s)
    # news 1 in the first impression: clicked there, but its own click is not visible to it
    assert (clicks[0], shown[0]) == (0, 0)
    # in-fold counts (over the same impressions) would leak that click
    full = news_counts_from_impressions(imps, n_news=3)
    assert full.clicks[1] == 3 and full.impressions[1] == 4
    assert not np.array_equal(full.clicks[imps.candidates], clicks)
    # ties in time are not "before": impressions 1 and 2 (09:00) do not see each other
    assert (clicks[2], shown[2]) == (1, 1) and (clicks[4], shown[4]) == (1, 1)
    # arbitrary queries (e.g. retrieved negatives) at a later time see everything before it
    c, s = prefix.at(np.array([1, 2, 3, 0]), np.full(4, times.max() + 1))
    np.testing.assert_array_equal(c, [3, 0, 1, 0])
    np.testing.assert_array_equal(s, [4, 2, 2, 0])


# ------------------------------------------------------------------------------------------------
# features and model


def test_build_features_known_values():
    feats = build_features(
        retrieval_scores=np.array([[2.0, -1.0]]), clicks=np.array([[0, 50]]), impressions=np.array([[0, 100]]),
        exposure=np.array([[30, 0]]), age_seconds=np.array([[7200.0, 0.0]]), age_known=np.array([[True, False]]),
        candidate_category=np.array([[1, 2]]), candidate_subcategory=np.array([[3, 4]]),
        history_category=np.array([[1, 1, 2, 9]]), history_subcategory=np.array([[3, 5, 5, 9]]),
        history_mask=np.array([[True, True, True, False]]), prior=10.0, mean_ctr=0.1)
    assert feats.shape == (1, 2, len(FEATURE_NAMES)) and feats.dtype == np.float32
    f = dict(zip(FEATURE_NAMES, np.moveaxis(feats[0], -1, 0)))
    np.testing.assert_allclose(f["retrieval_score"], [2.0, -1.0])
    ctr = (50 + 10 * 0.1) / 110
    np.testing.assert_allclose(f["popularity_logit"], [0.0, np.log(ctr / (1 - ctr)) - np.log(0.1 / 0.9)], rtol=1e-5)
    np.testing.assert_allclose(f["log_impressions"], [0.0, np.log1p(100)], rtol=1e-6)
    np.testing.assert_allclose(f["log_exposure"], [np.log1p(30), 0.0], rtol=1e-6)
    np.testing.assert_allclose(f["log_exposure_rate"], [np.log1p(15.0), 0.0], rtol=1e-6)  # 30 in 2 hours
    np.testing.assert_allclose(f["log_age_hours"], [np.log1p(2.0), np.log1p(24 * 30)], rtol=1e-6)
    np.testing.assert_allclose(f["age_unknown"], [0.0, 1.0])
    np.testing.assert_allclose(f["category_share"], [2 / 3, 1 / 3], rtol=1e-6)  # the padded 9 is ignored
    np.testing.assert_allclose(f["subcategory_share"], [1 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(f["log_history_len"], [np.log1p(3)] * 2, rtol=1e-6)


def _model(seed: int = 0, **cfg: object) -> Reranker:
    torch.manual_seed(seed)
    model = Reranker(RerankConfig(hidden_size=8, num_heads=2, dropout=0.0, **cfg), news_dim=D)
    with torch.no_grad():  # leave the "start as the first stage" init so the tests see the attention
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _inputs(b: int = 3, n: int = 5, c: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(b, n, D, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, :] = False  # a user without clicks
    cand = torch.randn(b, c, D, generator=g)
    feats = torch.randn(b, c, len(FEATURE_NAMES), generator=g)
    return hist, mask, cand, feats


def test_shapes_padding_and_empty_history():
    model = _model()
    hist, mask, cand, feats = _inputs()
    scores = model(hist, mask, cand, feats)
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
    garbage = hist.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), D)  # padding content must not matter
    torch.testing.assert_close(model(garbage, mask, cand, feats), scores)
    # extra padding columns change nothing either
    wider = torch.cat([hist, torch.randn(3, 2, D)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(wider, wider_mask, cand, feats), scores, atol=1e-5, rtol=1e-5)
    # candidates are scored independently: permuting them permutes the scores
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model(hist, mask, cand[:, perm], feats[:, perm]), scores[:, perm])


def test_user_vectors_depend_on_the_candidate():
    model = _model()
    hist, mask, cand, _ = _inputs()
    users, projected = model.user_vectors(hist, mask, cand)  # (B, C, d) each
    assert users.shape == projected.shape == (3, 4, 8)
    # same history, different candidates -> different user vectors
    assert (users[0, 0] - users[0, 1]).abs().max() > 1e-3
    one, _ = model.user_vectors(hist[:1], mask[:1], cand[:1, :1])
    torch.testing.assert_close(one[0, 0], users[0, 0], atol=1e-5, rtol=1e-5)


def _seeded_reference(layer, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The candidate-seeded Fastformer written the long way in float64: for every (user, candidate)
    the per-position outputs o_n are formed and pooled explicitly."""
    p = {k: v.detach().double() for k, v in layer.state_dict().items()}
    h, e = layer.num_heads, layer.head_dim
    d = h * e
    x, y = x.double(), y.double()
    out = torch.zeros(y.shape[0], y.shape[1], d, dtype=torch.float64)
    for b in range(x.shape[0]):
        xs = x[b][mask[b]]  # real clicks only
        q = xs @ p["query.weight"].T + p["query.bias"]
        k = xs @ p["key.weight"].T + p["key.bias"]
        v = xs @ p["value.weight"].T + p["value.bias"]
        for c in range(y.shape[1]):
            if len(xs) == 0:
                out[b, c] = p["output.bias"]
                continue
            seed = p["query_score"] + y[b, c] @ p["query_seed.weight"].T + p["query_seed.bias"]
            g = torch.zeros(d, dtype=torch.float64)
            gk = torch.zeros(d, dtype=torch.float64)
            for head in range(h):
                sl = slice(head * e, (head + 1) * e)
                alpha = torch.softmax(q[:, sl] @ seed[sl] / e ** 0.5, dim=0)
                g[sl] = alpha @ q[:, sl]
                mixed = k[:, sl] * g[sl]
                beta = torch.softmax(mixed @ p["key_score"][sl] / e ** 0.5, dim=0)
                gk[sl] = beta @ mixed
            o = (gk * v) @ p["output.weight"].T + p["output.bias"] + q  # (n, d)
            r = p["pool_score"] + y[b, c] @ p["pool_seed.weight"].T + p["pool_seed.bias"]
            gamma = torch.softmax(o @ r / d ** 0.5, dim=0)
            out[b, c] = gamma @ o
    return out


def test_candidate_seeded_layer_matches_the_explicit_computation():
    from newsrec.models.reranker import CandidateSeededFastformer

    torch.manual_seed(3)
    layer = CandidateSeededFastformer(8, 2)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 8, generator=g)
    y = torch.randn(3, 5, 8, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2] = False  # no clicks at all
    got = layer(x, mask, y).double()
    torch.testing.assert_close(got, _seeded_reference(layer, x, mask, y), atol=1e-4, rtol=1e-4)


def test_untrained_reranker_ranks_as_the_first_stage():
    torch.manual_seed(0)
    model = Reranker(RerankConfig(hidden_size=8, num_heads=2), news_dim=D).eval()
    hist, mask, cand, feats = _inputs()
    torch.testing.assert_close(model(hist, mask, cand, feats), feats[..., 0])


# ------------------------------------------------------------------------------------------------
# end to end on a constructed popularity-driven data set


def _write_popularity_artifact(root: Path, *, seed: int = 0) -> Path:
    """News differ only in popularity (hidden CTR: 0.5 for "hits", 0.04 otherwise); titles and user
    histories carry no signal, so a first stage cannot tell clicks apart while click-through in
    the train impressions can. Half of the hits appear only on the dev day (cold); they are fresh."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    n_news, title_len = 80, 6
    vocab = [schema.PAD_WORD, schema.UNK_WORD] + [f"w{i}" for i in range(30)]
    tokens = np.zeros((n_news + 1, title_len), dtype=np.int32)
    tokens[1:] = rng.integers(2, len(vocab), size=(n_news, title_len))
    np.save(root / schema.TITLE_TOKENS, tokens)
    (root / schema.VOCAB).write_text(json.dumps({"words": vocab}))
    (root / schema.CATEGORIES).write_text(json.dumps({"category": ["<unk>", "a", "b"],
                                                       "subcategory": ["<unk>", "x", "y"]}))
    news_idx = np.arange(1, n_news + 1)
    hit = rng.random(n_news + 1) < 0.25
    hit[0] = False
    ctr = np.where(hit, 0.5, 0.04)
    dev_only = np.zeros(n_news + 1, dtype=bool)
    dev_only[-12:] = True  # the last 12 news appear only on the dev day
    start = dt.datetime(2019, 11, 10)

    def behaviors(split: str, n: int, day0: int, pool: np.ndarray) -> tuple[pl.DataFrame, list]:
        rows, shown = [], []
        for i in range(n):
            t = start + dt.timedelta(days=day0, minutes=int(rng.integers(0, 24 * 60)))
            cands = rng.choice(pool, size=8, replace=False)
            labels = (rng.random(8) < ctr[cands]).astype(np.int8)
            if not labels.any():
                labels[int(np.argmax(ctr[cands] + 1e-3 * rng.random(8)))] = 1
            history = rng.choice(np.arange(1, n_news - 11), size=int(rng.integers(0, 6)), replace=False)
            rows.append({"impression_id": i + 1, "user_id": f"U{rng.integers(0, 40)}", "time": t,
                         "history": history.astype(np.int32).tolist(),
                         "candidates": cands.astype(np.int32).tolist(), "labels": labels.tolist()})
            shown += [(int(c), t, int(y), split) for c, y in zip(cands, labels)]
        df = pl.DataFrame(rows, schema=schema.BEHAVIORS_SCHEMA).sort("time")
        df.write_parquet(root / schema.behaviors_file(split))
        return df, shown

    train_pool = news_idx[~dev_only[1:]]
    dev_pool = np.concatenate([rng.choice(train_pool, 28, replace=False), news_idx[dev_only[1:]]])
    train_df, train_shown = behaviors("train", 700, 0, train_pool)
    _, dev_shown = behaviors("dev", 150, 3, dev_pool)
    clicks = np.zeros(n_news + 1, dtype=np.int32)
    shown_n = np.zeros(n_news + 1, dtype=np.int32)
    first_seen: dict[int, dt.datetime] = {}
    for c, t, y, split in train_shown + dev_shown:
        if split == "train":
            clicks[c] += y
            shown_n[c] += 1
        first_seen[c] = min(first_seen.get(c, t), t)
    hist_clicks = np.bincount(np.concatenate([np.array(h, dtype=np.int64) for h in train_df["history"].to_list()]
                                             + [np.zeros(0, dtype=np.int64)]), minlength=n_news + 1)
    cat = (news_idx % 2 + 1).astype(np.int32)
    pl.DataFrame({
        "news_idx": news_idx.astype(np.int32), "news_id": [f"N{i}" for i in news_idx],
        "category": ["a" if c == 1 else "b" for c in cat], "subcategory": ["x" if c == 1 else "y" for c in cat],
        "category_idx": cat, "subcategory_idx": cat,
        "title": [" ".join(vocab[t] for t in row) for row in tokens[1:]], "abstract": [""] * n_news,
        "url": [""] * n_news, "title_entities": [[] for _ in news_idx],
        "title_entity_confidence": [[] for _ in news_idx], "abstract_entities": [[] for _ in news_idx],
        "abstract_entity_confidence": [[] for _ in news_idx],
        "splits": [["train", "dev"] for _ in news_idx],
        "train_impressions": shown_n[1:], "train_clicks": clicks[1:],
        "train_history_clicks": hist_clicks[1:].astype(np.int32),
        "first_seen": [first_seen.get(int(i)) for i in news_idx],
    }, schema=schema.NEWS_SCHEMA).write_parquet(root / schema.NEWS)
    (root / schema.MANIFEST).write_text(json.dumps({"schema_version": schema.SCHEMA_VERSION}))
    return root


def _config(**rerank: object):
    base: dict[str, object] = dict(hidden_size=16, num_heads=2, epochs=4, batch_size=32, lr=3e-3,
                                   hard_negatives=2, hard_negative_pool=10, npratio=4, dropout=0.0,
                                   popularity_prior=5.0, eval_batch_size=64)
    base.update(rerank)
    return config_from_dict({
        "data": {"title_len": 6, "history_len": 5},
        "model": {"embedding_dim": 8, "hidden_size": 8, "num_heads": 2, "pooling_hidden": 8},
        "train": {"eval_batch_size": 64},
        "rerank": base,
        "tracking": {"enabled": False},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from newsrec.models.io import build_model, save_model
    from newsrec.train.rerank import fit_reranker

    root = tmp_path_factory.mktemp("rerank")
    data = _write_popularity_artifact(root / "data")
    dataset = open_dataset(data)
    config = _config()
    torch.manual_seed(0)
    retriever = build_model(config, dataset)  # an untrained first stage: it knows nothing of popularity
    save_model(root / "model", retriever, config, dataset=dataset)
    result = fit_reranker(config, retriever_dir=root / "model", data_dir=data, out_dir=root / "reranker")
    return root, result


def test_two_stage_beats_first_stage_on_popularity(trained):
    _, result = trained
    first, two = result.metrics["first_stage"], result.metrics["two_stage"]
    assert first["impressions"] == two["impressions"] == 150
    assert two["auc"] > first["auc"] + 0.1, (first, two)
    assert two["ndcg@10"] > first["ndcg@10"]
    # cold news have no counts: they still rank (freshness, and popularity equal to the mean)
    assert np.isfinite(result.metrics["two_stage_cold"]["ndcg@10"])


def test_save_load_round_trip_and_batched_equals_single(trained):
    from newsrec.models.io import load_model
    from newsrec.train.rerank import score_impressions_two_stage

    root, result = trained
    loaded = load_reranker(root / "reranker", retriever_dir=root / "model")
    assert loaded.manifest["retriever"]["model_json_sha256"]
    retriever = load_model(root / "model")
    dev = open_dataset(root / "data").impressions("dev")
    scores = score_impressions_two_stage(retriever, loaded, dev, show_progress=False)
    assert scores.shape == dev.candidates.shape and scores.dtype == np.float32
    from newsrec.eval.metrics import compute_metrics

    again = compute_metrics(dev.labels, scores, dev.candidate_offsets)
    assert again["auc"] == pytest.approx(result.metrics["two_stage"]["auc"], abs=1e-6)
    # one user through rerank() equals the batched path
    from newsrec.train.rerank import encode_users, first_stage_candidate_scores

    vectors = torch.from_numpy(loaded.tables.vectors)
    users = encode_users(retriever.model, vectors, dev, history_len=5, batch_size=64, device=torch.device("cpu"))
    first = first_stage_candidate_scores(retriever.model, users, vectors, dev, batch_size=64)
    i = 7
    lo, hi = dev.candidate_offsets[i], dev.candidate_offsets[i + 1]
    when = dev.time[i].astype("datetime64[us]").item()
    now_s = np.array([when.replace(tzinfo=dt.timezone.utc).timestamp()])
    exposure = loaded.exposure_counter(dev)(dev.candidates_of(i).astype(np.int64)[None], now_s)[0]
    single = loaded.rerank(dev.history_of(i), dev.candidates_of(i), first[lo:hi], now=when, exposure=exposure)
    np.testing.assert_allclose(single, scores[lo:hi], rtol=1e-4, atol=1e-5)


def test_rerank_many_equals_one_user_at_a_time(trained):
    root, _ = trained
    loaded = load_reranker(root / "reranker")
    dev = open_dataset(root / "data").impressions("dev")
    rng = np.random.default_rng(0)
    rows = [0, 3, 8, 11]
    histories = [dev.history_of(i) for i in rows] + [np.zeros(0, dtype=np.int64)]  # one without clicks
    candidates = [dev.candidates_of(i) for i in rows] + [np.array([1, 2, 3])]
    firsts = [rng.normal(size=len(c)) for c in candidates]
    nows = [dt.datetime(2019, 11, 15, 8), None, dt.datetime(2019, 11, 14, 20), None, None]
    assert len({len(c) for c in candidates}) > 1  # candidate padding is exercised
    together = loaded.rerank_many(histories, candidates, firsts, nows)
    for h, c, f, now, got in zip(histories, candidates, firsts, nows, together):
        assert got.shape == (len(c),)
        np.testing.assert_allclose(got, loaded.rerank(h, c, f, now=now), rtol=1e-5, atol=1e-6)
    with pytest.raises(NewsrecError, match="retrieval scores"):
        loaded.rerank_many(histories[:1], candidates[:1], [firsts[0][:-1]])


def test_mismatched_retriever_is_refused(trained, tmp_path):
    from newsrec.models.io import build_model, save_model

    root, _ = trained
    dataset = open_dataset(root / "data")
    torch.manual_seed(1)
    save_model(tmp_path / "other", build_model(_config(), dataset), _config(), dataset=dataset)
    with pytest.raises(ArtifactError, match="trained on the first-stage model"):
        load_reranker(root / "reranker", retriever_dir=tmp_path / "other")
    with pytest.raises(ArtifactError, match="not a re-ranker directory"):
        load_reranker(tmp_path / "other")


def test_fresh_news_get_the_prior_mean_and_zero_age(trained):
    root, _ = trained
    loaded = load_reranker(root / "reranker")
    n = loaded.n_news
    vec = np.random.default_rng(0).normal(size=(2, loaded.model.news_dim)).astype(np.float32)
    now = dt.datetime(2019, 11, 20, 12, 0)
    loaded.add_news(np.array([n + 1, n + 3]), vec, category_idx=np.array([1, 2]), first_seen=now)
    assert loaded.n_news == n + 3
    feats = loaded.features_for(history_idx=np.array([[1, 2]]), history_mask=np.array([[True, True]]),
                                candidate_idx=np.array([[n + 1, n + 3]]), retrieval_scores=np.zeros((1, 2)),
                                now_seconds=np.array([now.replace(tzinfo=dt.timezone.utc).timestamp()]))
    f = dict(zip(FEATURE_NAMES, np.moveaxis(feats[0], -1, 0)))
    np.testing.assert_allclose(f["popularity_logit"], 0.0, atol=1e-6)  # the prior mean
    np.testing.assert_allclose(f["log_age_hours"], 0.0, atol=1e-6)
    np.testing.assert_allclose(f["age_unknown"], 0.0)
    np.testing.assert_allclose(f["log_exposure"], 0.0)  # never shown yet
    scores = loaded.rerank(np.array([1, 2]), np.array([n + 1, 3, n + 3]), np.array([0.1, 0.2, 0.3]), now=now)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    with pytest.raises(NewsrecError, match="unknown to the re-ranker"):
        loaded.rerank(np.array([1]), np.array([n + 50]), np.array([0.0]))
    with pytest.raises(NewsrecError, match="need news_idx >"):
        loaded.add_news(np.array([1]), vec[:1])
