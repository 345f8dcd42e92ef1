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
from newsrec.inference.features import FEATURE_NAMES, EventLog, candidate_features
from newsrec.inference.rerank import load_reranker
from newsrec.models.reranker import Reranker

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


def test_event_log_counts_strictly_before_each_moment():
    """EventLog (labels of part of the log, showings of all of it) against a brute-force count,
    for moments inside the labelled part, after it, and news it never saw."""
    from newsrec.data.artifact import concat_impressions

    labelled = _impressions(["2019-11-10T08:00:00", "2019-11-10T09:00:00", "2019-11-10T09:00:00"],
                            [[1, 2], [1, 3], [2]], [[1, 0], [0, 1], [1]])
    later = _impressions(["2019-11-10T10:00:00", "2019-11-10T11:00:00"], [[1, 4], [2, 4]], [[0, 0], [1, 0]])
    log = EventLog(labelled, concat_impressions([labelled, later], split="log", drop_mixed_labels=True))
    events = [(n, t, y, lab) for imps, lab in ((labelled, True), (later, False))
              for i in range(len(imps)) for n, y in zip(imps.candidates_of(i), imps.labels_of(i))
              for t in [imps.time[i].astype("datetime64[s]").astype(np.int64)]]
    news = np.array([[1, 2, 3, 4, 9]] * 5)
    base = int(np.datetime64("2019-11-10T08:00:00", "s").astype(np.int64))
    moments = np.array([base - 1, base + 1800, base + 3600, base + 3 * 3600, base + 9 * 3600], dtype=np.float64)
    clicks, shown_lab, shown = log.counts(news, moments)
    for b, now in enumerate(moments):
        for c, n in enumerate(news[b]):
            before = [e for e in events if e[0] == n and e[1] < now]
            assert clicks[b, c] == sum(e[2] for e in before if e[3])
            assert shown_lab[b, c] == sum(1 for e in before if e[3])
            assert shown[b, c] == len(before)
    assert log.mean_ctr == pytest.approx(3 / 5)
    total = log.totals(6)
    np.testing.assert_array_equal(total[0], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(total[2], [0, 3, 3, 1, 2, 0])


# ------------------------------------------------------------------------------------------------
# features and model


def test_candidate_features_known_values():
    feats = candidate_features(
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
    np.testing.assert_allclose(f["log_unlabelled_exposure"], [np.log1p(30), 0.0], rtol=1e-6)
    np.testing.assert_allclose(f["log_exposure_rate"], [np.log1p(15.0), 0.0], rtol=1e-6)  # 30 in 2 hours
    np.testing.assert_allclose(f["log_age_hours"], [np.log1p(2.0), np.log1p(24 * 30)], rtol=1e-6)
    np.testing.assert_allclose(f["age_unknown"], [0.0, 1.0])
    np.testing.assert_allclose(f["category_share"], [2 / 3, 1 / 3], rtol=1e-6)  # the padded 9 is ignored
    np.testing.assert_allclose(f["subcategory_share"], [1 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(f["log_history_len"], [np.log1p(3)] * 2, rtol=1e-6)


def _model(seed: int = 0, **cfg: object) -> Reranker:
    torch.manual_seed(seed)
    model = Reranker(RerankConfig(hidden_size=8, num_heads=2, dropout=0.0, **cfg), news_dim=D,
                     n_features=len(FEATURE_NAMES))
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
    model = Reranker(RerankConfig(hidden_size=8, num_heads=2), news_dim=D, n_features=len(FEATURE_NAMES)).eval()
    hist, mask, cand, feats = _inputs()
    torch.testing.assert_close(model(hist, mask, cand, feats), feats[..., 0])
    # with the training rows' statistics: the standardised first-stage score, the same order
    f = len(FEATURE_NAMES)
    model.set_feature_stats(np.linspace(-1.0, 1.0, f), np.linspace(0.5, 2.0, f))
    got = model(hist, mask, cand, feats)
    torch.testing.assert_close(got, (feats[..., 0] + 1.0) / 0.5)
    assert torch.equal(torch.argsort(got, dim=-1), torch.argsort(feats[..., 0], dim=-1))


def test_reranker_weights_saved_before_the_linear_path_score_as_they_did(tmp_path):
    from safetensors.torch import load_file, save_file

    from newsrec.models.reranker import load_weights, save_weights

    torch.manual_seed(0)
    cfg = RerankConfig(hidden_size=8, num_heads=2)
    f = len(FEATURE_NAMES)
    model = Reranker(cfg, news_dim=D, n_features=f).eval()
    model.set_feature_stats(np.linspace(-1.0, 1.0, f), np.linspace(0.5, 2.0, f))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    hist, mask, cand, feats = _inputs()
    # the old formula: retrieval_weight · raw first-stage score + MLP correction, no linear path
    users, c = model.user_vectors(hist, mask, cand)
    normed = (feats - model.feature_mean) / model.feature_std * model.feature_used
    old = (model.retrieval_weight * feats[..., 0]
           + model.head(torch.cat([users, c, users * c, normed], dim=-1)).squeeze(-1))
    save_weights(model, tmp_path / "new.safetensors")
    state = load_file(str(tmp_path / "new.safetensors"))
    del state["feature_linear.weight"], state["retrieval_standardised"]
    save_file(state, str(tmp_path / "old.safetensors"))
    legacy = load_weights(cfg, tmp_path / "old.safetensors", news_dim=D, n_features=f)
    torch.testing.assert_close(legacy(hist, mask, cand, feats), old.detach())
    current = load_weights(cfg, tmp_path / "new.safetensors", news_dim=D, n_features=f)
    torch.testing.assert_close(current(hist, mask, cand, feats), model(hist, mask, cand, feats).detach())
    del state["head.0.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_weights(cfg, tmp_path / "broken.safetensors", news_dim=D, n_features=f)


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
                                   popularity_prior=5.0, eval_batch_size=64, train_fraction=0.3)
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
    from newsrec.inference.model_io import build_model, save_model
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
    # the guard (latest slice of the train log, never dev) saw the same and says so
    guard = result.guard
    assert guard["won"] and guard["impressions"] > 0
    assert guard["two_stage"]["auc"] > guard["first_stage"]["auc"]
    manifest = json.loads((result.out_dir / "reranker.json").read_text())
    assert manifest["guard"]["won"] is True and 1 <= manifest["guard"]["best_epoch"] <= 4
    # the retriever kept no held-out slice (it may have trained on every row): its scores of the
    # slice would be in-sample, so a first stage was fit on the log before the slice
    assert manifest["guard"]["first_stage_source"] == "refit"


def test_first_stage_source_uses_the_retriever_only_where_it_never_trained():
    from newsrec.train.rerank import first_stage_source, retriever_trained_until

    def manifest(until: str | None) -> dict:
        holdout = {"selection": "holdout", "train_time_to": until} if until else {"selection": "none"}
        return {"extra": {"holdout": holdout}}

    until = manifest("2019-11-14T23:59:59")
    assert retriever_trained_until(until) == np.datetime64("2019-11-14T23:59:59", "s").astype(np.int64)
    after = float(np.datetime64("2019-11-15T00:00:00", "s").astype(np.int64))
    same = after - 1.0  # the second of its last training impression: rows there may be its own
    assert first_stage_source("auto", until, after) == "retriever"
    assert first_stage_source("auto", until, same) == "refit"
    assert first_stage_source("auto", manifest(None), after) == "refit"
    assert first_stage_source("auto", {}, after) == "refit"
    assert first_stage_source("refit", until, after) == "refit"
    assert first_stage_source("retriever", until, after) == "retriever"
    with pytest.raises(NewsrecError, match="in-sample.*rerank.first_stage=refit"):
        first_stage_source("retriever", until, same)
    with pytest.raises(NewsrecError, match="no held-out slice"):
        first_stage_source("retriever", manifest(None), after)


def _slice_log(root: Path):
    """(dataset, train impressions, the time slices, the log the re-ranker learned in) of the
    fixture, rebuilt the way ``fit_reranker`` builds them."""
    from newsrec.data.artifact import concat_impressions
    from newsrec.train.rerank import time_slices

    dataset = open_dataset(root / "data")
    train = dataset.impressions("train")
    cfg = _config().rerank
    parts = time_slices(train.time, train_fraction=cfg.train_fraction, guard_fraction=cfg.guard_fraction)
    shown = concat_impressions([dataset.impressions(s) for s in dataset.splits], split="log", drop_mixed_labels=True)
    log = EventLog(train.select(parts.early), shown)
    return dataset, train, parts, log


def _training_data(root: Path, loaded, *, hard: bool):
    from newsrec.data.popularity import datetime64_to_seconds
    from newsrec.train.rerank import TrainingData, _with_click, clicked_by_user, retrieve_top

    dataset, train, parts, log = _slice_log(root)
    fit = train.select(_with_click(train, parts.fit))
    rng = np.random.default_rng(0)
    retrieval = rng.normal(size=len(fit.candidates)).astype(np.float32)
    if hard:
        users = torch.from_numpy(rng.normal(size=(len(fit), loaded.model.news_dim)).astype(np.float32))
        vectors = torch.from_numpy(loaded.tables.vectors)
        hard_idx, hard_scores = retrieve_top(
            lambda: None, users, vectors, fit, k=10, first_seen=loaded.tables.first_seen,
            first_seen_known=loaded.tables.first_seen_known, exclude_candidates=True,
            excluded=clicked_by_user(train, fit.user_id))
    else:
        hard_idx, hard_scores = np.zeros((len(fit), 1), np.int64), np.zeros((len(fit), 1), np.float32)
    samples = np.flatnonzero(fit.labels > 0)
    rows = np.searchsorted(fit.candidate_offsets, samples, side="right") - 1
    return TrainingData(fit, datetime64_to_seconds(fit.time), retrieval, hard_idx, hard_scores, log, samples,
                        rows), log


def test_training_and_serving_paths_give_the_same_feature_row(trained):
    """One impression's rows: through the training path (``training_rows``) and through the path
    that scores impressions (``features_for`` on padded impressions, as evaluate and the guard
    do); and, after the log's end, the log replayed equals the serving totals."""
    from newsrec.inference.features import padded_candidates
    from newsrec.inference.histories import padded_histories
    from newsrec.train.rerank import training_rows

    root, _ = trained
    loaded = load_reranker(root / "reranker")
    data, log = _training_data(root, loaded, hard=False)
    imps = data.impressions
    sample = int(np.argmax(imps.history_lengths[data.sample_row] > 2))  # a user with a history
    row = int(data.sample_row[sample])
    batch = training_rows(data, loaded, np.array([sample]), npratio=50, hard_negatives=0,
                          rng=np.random.default_rng(0))
    n = int(imps.candidate_counts[row])
    assert batch["candidate_mask"][0].sum() == n  # the click and every non-click
    hist, hmask = padded_histories(imps, np.array([row]), history_len=loaded.history_len)
    cand, cmask, flat = padded_candidates(imps, np.array([row]))
    served = loaded.features_for(log, history_idx=hist, history_mask=hmask, candidate_idx=cand,
                                 retrieval_scores=data.retrieval[flat][None].astype(np.float64),
                                 now_seconds=data.now[[row]])[0]
    trained_rows = batch["features"][0][batch["candidate_mask"][0]]
    order = [int(np.flatnonzero(cand[0] == c)[0]) for c in batch["candidates"][0][:n]]
    np.testing.assert_array_equal(trained_rows, served[order])
    # the re-ranker reads the same clicks in training as when it scores
    np.testing.assert_array_equal(batch["history"][0][batch["history_mask"][0]], hist[0][hmask[0]])
    # after the log: the log replayed to a later moment equals the serving path's totals
    full = EventLog.of_dataset(open_dataset(root / "data"))
    later = np.array([loaded.log_end() + 3600.0])
    a = loaded.features_for(full, history_idx=hist, history_mask=hmask, candidate_idx=cand,
                            retrieval_scores=np.zeros(cand.shape), now_seconds=later)
    b = loaded.features_for(loaded.totals(), history_idx=hist, history_mask=hmask, candidate_idx=cand,
                            retrieval_scores=np.zeros(cand.shape), now_seconds=later)
    np.testing.assert_array_equal(a, b)
    assert loaded.mean_ctr == pytest.approx(full.mean_ctr)


def test_training_rows_show_exposure_without_labels_and_no_feature_is_constant(trained):
    """The labels of the re-ranker's log end before its slice: training rows hold news shown since
    (exposure beyond the labelled count) — the combination dev and serving meet. Every feature
    varies over the training rows or is dropped (then it cannot move a score)."""
    from newsrec.train.rerank import feature_stats, training_rows

    root, _ = trained
    loaded = load_reranker(root / "reranker")
    data, _ = _training_data(root, loaded, hard=True)
    f = {name: i for i, name in enumerate(FEATURE_NAMES)}

    batch = training_rows(data, loaded, np.arange(len(data.samples)), npratio=4, hard_negatives=2,
                          rng=np.random.default_rng(0))
    rows = batch["features"][batch["candidate_mask"]]
    assert (rows[:, f["log_unlabelled_exposure"]] > 0).mean() > 0.5
    assert not np.allclose(rows[:, f["log_impressions"]], rows[:, f["log_exposure"]])
    _, std = feature_stats(data, loaded, np.random.default_rng(1), npratio=4, hard_negatives=2, batch_size=64)
    used = loaded.model.feature_used.numpy() > 0
    dropped = set(loaded.manifest["features_dropped"])
    assert dropped == {n for n, u in zip(FEATURE_NAMES, used) if not u}
    for name, i in f.items():
        assert name in dropped or std[i] > 1e-6, (name, std[i])
    # a dropped feature changes no score
    if dropped:
        i = f[sorted(dropped)[0]]
        hist, mask, cand, feats = (torch.zeros(1, 3, loaded.model.news_dim), torch.ones(1, 3, dtype=torch.bool),
                                   torch.randn(1, 4, loaded.model.news_dim), torch.randn(1, 4, len(FEATURE_NAMES)))
        other = feats.clone()
        other[..., i] += 5.0
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(hist, mask, cand, feats), loaded.model(hist, mask, cand, other))


def test_time_slices_and_hard_negatives_never_clicked_by_the_user():
    from newsrec.train.rerank import clicked_by_user, retrieve_top, time_slices

    times = np.array(["2019-11-10T0%d:00:00" % h for h in (5, 1, 2, 3, 4, 6, 7, 8, 9, 9)], dtype="datetime64[us]")
    parts = time_slices(times, train_fraction=0.5, guard_fraction=0.4)
    sec = times.astype("datetime64[s]").astype(np.int64)
    assert sec[parts.early].max() < sec[parts.fit].min() <= sec[parts.fit].max() < sec[parts.guard].min()
    assert sorted(np.concatenate([parts.early, parts.fit, parts.guard]).tolist()) == list(range(10))
    assert set(parts.guard.tolist()) == {8, 9}  # rows at the same second stay together
    with pytest.raises(NewsrecError, match="train_fraction"):
        time_slices(times[:1], train_fraction=0.5, guard_fraction=0.5)
    # user U clicked news 3 in one impression and has 5 in a history: neither is a hard negative
    imps = _impressions(["2019-11-10T08:00:00", "2019-11-10T09:00:00"], [[3, 4], [1, 2]], [[1, 0], [1, 0]],
                        histories=[[], [5]])
    values, offsets = clicked_by_user(imps, imps.user_id)
    assert set(values[offsets[0]:offsets[1]].tolist()) == {1, 3, 5}
    users = torch.ones(2, 2)
    vectors = torch.tensor([[0.0, 0.0]] + [[float(i), float(i)] for i in range(1, 8)])  # higher idx, higher score
    top, _ = retrieve_top(None, users, vectors, imps, k=7, first_seen=np.zeros(8), first_seen_known=np.zeros(8, bool),
                          exclude_candidates=False, excluded=(values, offsets))
    for row in top:
        assert not set(row.tolist()) & {1, 3, 5}
    plain, _ = retrieve_top(None, users, vectors, imps, k=7, first_seen=np.zeros(8), first_seen_known=np.zeros(8, bool),
                            exclude_candidates=False)
    assert 3 in plain[1].tolist()  # without the exclusion, a news the user clicked elsewhere comes back


def test_guard_decides_where_the_two_stage_model_is_used():
    from sklearn.metrics import ndcg_score, roc_auc_score

    from newsrec.eval.metrics import impression_metrics
    from newsrec.inference.rerank import two_stage_decision
    from newsrec.train.rerank import guard_comparison as compare_per_impression

    def guard_comparison(labels, offsets, first_scores, two_scores, **kw):
        return compare_per_impression(impression_metrics(labels, first_scores, offsets),
                                      impression_metrics(labels, two_scores, offsets), **kw)

    rng = np.random.default_rng(0)
    n, c = 300, 5
    labels = np.zeros((n, c), dtype=np.int8)
    labels[np.arange(n), rng.integers(0, c, n)] = 1
    first = rng.normal(size=(n, c))
    better = first + 2.0 * labels * (rng.random((n, 1)) < 0.5)  # the click lifted in half the impressions
    offsets = np.arange(0, n * c + 1, c)
    defaults = RerankConfig()
    kw = dict(auc_margin=defaults.guard_auc_margin, auc_z=defaults.guard_auc_z,
              ndcg_tolerance=defaults.guard_ndcg_tolerance, ndcg_z=defaults.guard_ndcg_z)
    verdict = guard_comparison(labels.ravel(), offsets, first.ravel(), better.ravel(), **kw)
    # the gains and their standard errors, computed independently per impression
    d_auc = [roc_auc_score(labels[i], better[i]) - roc_auc_score(labels[i], first[i]) for i in range(n)]
    d_ndcg = [ndcg_score(labels[i:i + 1], better[i:i + 1], k=10) - ndcg_score(labels[i:i + 1], first[i:i + 1], k=10)
              for i in range(n)]
    assert verdict["auc_gain"] == pytest.approx(np.mean(d_auc))
    assert verdict["auc_se"] == pytest.approx(np.std(d_auc, ddof=1) / np.sqrt(n))
    assert verdict["ndcg10_gain"] == pytest.approx(np.mean(d_ndcg))
    assert verdict["ndcg10_se"] == pytest.approx(np.std(d_ndcg, ddof=1) / np.sqrt(n))
    assert verdict["two_stage"]["auc"] - verdict["first_stage"]["auc"] == pytest.approx(verdict["auc_gain"])
    assert verdict["won"]
    # one lifted impression among three (gains [g, 0, 0]: mean = se): a positive estimate, which the
    # default rule takes; asking for the gain to stand 1.645 standard errors clear refuses it
    d_auc = np.asarray(d_auc)
    few = np.concatenate([np.flatnonzero(d_auc > 0.2)[:1], np.flatnonzero(d_auc == 0)[:2]])
    assert len(few) == 3
    noisy = guard_comparison(labels[few].ravel(), offsets[:4], first[few].ravel(), better[few].ravel(), **kw)
    assert noisy["auc_gain"] > 0.06 and noisy["auc_se"] == pytest.approx(noisy["auc_gain"]) and noisy["won"]
    assert not guard_comparison(labels[few].ravel(), offsets[:4], first[few].ravel(), better[few].ravel(),
                                **{**kw, "auc_z": 1.645})["won"]
    # one impression has no standard error: never a win, and the record stays plain JSON
    single = guard_comparison(labels[few[:1]].ravel(), offsets[:2], first[few[:1]].ravel(), better[few[:1]].ravel(), **kw)
    assert single["auc_gain"] > 0.2 and single["auc_se"] is None and not single["won"]
    json.dumps(single, allow_nan=False)
    assert "± ? AUC" in two_stage_decision({"guard": {**single, "impressions": 1}}, "auto")[1]
    # an identical ranking gains nothing: not a win (the first stage is used)
    assert not guard_comparison(labels.ravel(), offsets, first.ravel(), first.ravel(), **kw)["won"]
    # AUC surely better but nDCG@10 surely worse: two clicks, [c n n n c] -> [n c c n n]
    lab = np.tile([1, 0, 0, 0, 1], 50)
    before, after = np.tile([5.0, 4, 3, 2, 1], 50), np.tile([4.0, 5, 2, 1, 3], 50)
    lost_ndcg = guard_comparison(lab, np.arange(0, 251, 5), before, after, **kw)
    assert lost_ndcg["auc_gain"] == pytest.approx(1 / 6) and lost_ndcg["ndcg10_gain"] < -0.1
    assert not lost_ndcg["won"]
    # a margin the gain does not clear
    assert not guard_comparison(labels.ravel(), offsets, first.ravel(), better.ravel(),
                                **{**kw, "auc_margin": verdict["auc_gain"]})["won"]
    first = verdict["first_stage"]
    lost = {"guard": {"won": False, "impressions": 9, "first_stage": first, "two_stage": {"auc": 0.5, "ndcg@10": 0.3}}}
    won = {"guard": {**lost["guard"], "won": True}}
    assert two_stage_decision(won, "auto")[0] and not two_stage_decision(lost, "auto")[0]
    on, why = two_stage_decision(lost, "auto")
    assert "did not beat the first stage" in why and "0.5000" in why and "\n" not in why
    assert two_stage_decision(lost, "always")[0] and not two_stage_decision(won, "never")[0]
    on, why = two_stage_decision({"guard": {**lost_ndcg, "impressions": 50}}, "auto")
    assert not on and "gains +0.1667 ± 0.0000 AUC" in why and "\n" not in why
    with pytest.raises(Exception, match="rerank.use"):
        two_stage_decision(won, "on")


def test_guard_verdict_never_rests_on_an_impressions_own_choice_of_epoch():
    from newsrec.train.rerank import cross_fitted, guard_halves

    def epoch(auc):  # per-impression metrics of one epoch (only what cross_fitted reads)
        auc = np.asarray(auc, dtype=float)
        return {"auc": auc, "mrr": auc + 1, "ndcg@5": auc + 2, "ndcg@10": auc + 3,
                "valid": np.ones(len(auc), bool), "clicks": np.ones(len(auc), np.int64),
                "candidates": np.full(len(auc), 5, np.int64)}

    half = np.array([0, 0, 1, 1], dtype=np.int8)
    # epoch 1 looks best on half 0 only, epoch 2 on half 1 only, epoch 3 is nowhere best
    per_epoch = [epoch([0.9, 0.9, 0.5, 0.5]), epoch([0.6, 0.6, 0.8, 0.8]), epoch([0.1, 0.1, 0.1, 0.1])]
    out, chosen = cross_fitted(per_epoch, half)
    assert chosen == [1, 2]
    # half 0 is scored by the epoch chosen on half 1, half 1 by the one chosen on half 0
    assert out["auc"].tolist() == [0.6, 0.6, 0.5, 0.5]
    assert out["ndcg@10"].tolist() == [3.6, 3.6, 3.5, 3.5]
    assert out["clicks"].tolist() == [1, 1, 1, 1]
    # halves follow users (a user's impressions together), both halves get impressions
    users = np.array([f"U{i % 7}" for i in range(40)], dtype=object)
    halves = guard_halves(users)
    assert set(halves.tolist()) == {0, 1}
    for u in set(users):
        assert len(set(halves[users == u].tolist())) == 1
    assert guard_halves(np.array(["U1", "U1", "U1"], dtype=object)).tolist() == [0, 1, 0]


def test_evaluate_follows_rerank_use(trained, tmp_path):
    from newsrec.eval.evaluate import evaluate

    root, result = trained
    never = evaluate(root / "model", root / "data", reranker=root / "reranker", rerank_use="never",
                     log_to_mlflow=False, show_progress=False)
    plain = evaluate(root / "model", root / "data", log_to_mlflow=False, show_progress=False)
    always = evaluate(root / "model", root / "data", reranker=root / "reranker", rerank_use="always",
                      log_to_mlflow=False, show_progress=False)
    auto = evaluate(root / "model", root / "data", reranker=root / "reranker", log_to_mlflow=False,
                    show_progress=False)
    np.testing.assert_array_equal(never.scores, plain.scores)
    assert not never.metrics["reranked"] and "rerank.use=never" in never.metrics["rerank_decision"]
    assert always.metrics["reranked"] and auto.metrics["reranked"]  # it won its guard
    assert always.metrics["auc"] == pytest.approx(result.metrics["two_stage"]["auc"], abs=1e-6)
    # a re-ranker that lost its guard is not used under auto
    lost = tmp_path / "lost"
    import shutil

    shutil.copytree(root / "reranker", lost)
    manifest = json.loads((lost / "reranker.json").read_text())
    manifest["guard"]["won"] = False
    (lost / "reranker.json").write_text(json.dumps(manifest))
    off = evaluate(root / "model", root / "data", reranker=lost, log_to_mlflow=False, show_progress=False)
    np.testing.assert_array_equal(off.scores, plain.scores)
    assert "did not beat" in off.metrics["rerank_decision"]


def test_save_load_round_trip_equals_the_fit(trained):
    from newsrec.eval.metrics import compute_metrics
    from newsrec.inference.model_io import load_model
    from newsrec.inference.rerank import score_impressions_two_stage

    root, result = trained
    loaded = load_reranker(root / "reranker", retriever_dir=root / "model")
    assert loaded.manifest["retriever"]["model_json_sha256"]
    retriever = load_model(root / "model")
    dataset = open_dataset(root / "data")
    dev = dataset.impressions("dev")
    scores = score_impressions_two_stage(retriever, loaded, dev, log=EventLog.of_dataset(dataset),
                                         show_progress=False)
    assert scores.shape == dev.candidates.shape and scores.dtype == np.float32
    again = compute_metrics(dev.labels, scores, dev.candidate_offsets)
    assert again["auc"] == pytest.approx(result.metrics["two_stage"]["auc"], abs=1e-6)


def test_rerank_after_the_log_equals_the_replayed_log_and_batches(trained):
    """Serving (``rerank``/``rerank_many``, the log's totals) equals scoring the same impression
    with the log replayed, one user or several at once; times before the log's end are refused."""
    from newsrec.inference.histories import padded_histories

    root, _ = trained
    loaded = load_reranker(root / "reranker")
    dataset = open_dataset(root / "data")
    dev = dataset.impressions("dev")
    full = EventLog.of_dataset(dataset)
    end = loaded.log_end()
    rng = np.random.default_rng(0)
    rows = [0, 3, 8, 11]
    histories = [dev.history_of(i) for i in rows] + [np.zeros(0, dtype=np.int64)]  # one without clicks
    candidates = [dev.candidates_of(i) for i in rows] + [np.array([1, 2, 3])]
    firsts = [rng.normal(size=len(c)) for c in candidates]
    nows = [end + 60.0, None, end + 7200.0, dt.datetime(2030, 1, 1), None]
    assert len({len(c) for c in candidates}) > 1  # candidate padding is exercised
    together = loaded.rerank_many(histories, candidates, firsts, nows)
    for h, c, f, now, got in zip(histories, candidates, firsts, nows, together):
        assert got.shape == (len(c),)
        np.testing.assert_allclose(got, loaded.rerank(h, c, f, now=now), rtol=1e-5, atol=1e-6)
    h, c, f = histories[0], candidates[0], firsts[0]
    imps = _impressions(["2019-11-20T00:00:00"], [c.tolist()], [[0] * len(c)], histories=[h.tolist()])
    hist, mask = padded_histories(imps, np.array([0]), history_len=loaded.history_len)
    replayed = loaded.score_batch(full, history_idx=hist, history_mask=mask, candidate_idx=c[None].astype(np.int64),
                                  retrieval_scores=f[None], now_seconds=np.array([end + 60.0]))[0]
    np.testing.assert_allclose(together[0], replayed, rtol=1e-5, atol=1e-6)
    with pytest.raises(NewsrecError, match="retrieval scores"):
        loaded.rerank_many(histories[:1], candidates[:1], [firsts[0][:-1]])
    with pytest.raises(NewsrecError, match="before the end of the re-ranker's log"):
        loaded.rerank(h, c, f, now=end - 3600.0)


def test_mismatched_retriever_is_refused(trained, tmp_path):
    from newsrec.inference.model_io import build_model, save_model

    root, _ = trained
    dataset = open_dataset(root / "data")
    torch.manual_seed(1)
    save_model(tmp_path / "other", build_model(_config(), dataset), _config(), dataset=dataset)
    with pytest.raises(ArtifactError, match="trained on the first-stage model"):
        load_reranker(root / "reranker", retriever_dir=tmp_path / "other")
    with pytest.raises(ArtifactError, match="not a re-ranker directory"):
        load_reranker(tmp_path / "other")


def test_fresh_news_get_the_prior_mean_and_their_age(trained):
    root, _ = trained
    loaded = load_reranker(root / "reranker")
    n = loaded.n_news
    vec = np.random.default_rng(0).normal(size=(2, loaded.model.news_dim)).astype(np.float32)
    added = loaded.log_end() + 600.0
    loaded.add_news(np.array([n + 1, n + 3]), vec, category_idx=np.array([1, 2]), first_seen=added)
    assert loaded.n_news == n + 3

    def feats(now: float) -> dict[str, np.ndarray]:
        f = loaded.features_for(loaded.totals(), history_idx=np.array([[1, 2]]),
                                history_mask=np.array([[True, True]]), candidate_idx=np.array([[n + 1, n + 3]]),
                                retrieval_scores=np.zeros((1, 2)), now_seconds=np.array([now]))
        return dict(zip(FEATURE_NAMES, np.moveaxis(f[0], -1, 0)))

    f = feats(added)
    np.testing.assert_allclose(f["popularity_logit"], 0.0, atol=1e-6)  # the prior mean
    np.testing.assert_allclose(f["log_age_hours"], 0.0, atol=1e-6)
    np.testing.assert_allclose(f["age_unknown"], 0.0)
    np.testing.assert_allclose(f["log_exposure"], 0.0)  # never shown yet
    np.testing.assert_allclose(feats(added + 3 * 3600.0)["log_age_hours"], np.log1p(3.0), rtol=1e-6)  # it ages
    scores = loaded.rerank(np.array([1, 2]), np.array([n + 1, 3, n + 3]), np.array([0.1, 0.2, 0.3]), now=added)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    with pytest.raises(NewsrecError, match="unknown to the re-ranker"):
        loaded.rerank(np.array([1]), np.array([n + 50]), np.array([0.0]))
    with pytest.raises(NewsrecError, match="need news_idx >"):
        loaded.add_news(np.array([1]), vec[:1], first_seen=added)


# ------------------------------------------------------------------------------------------------
# serving: one clock, one history length


class _FakeMonotonic:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def served(trained, tmp_path):
    from newsrec.serve.clock import ServiceClock
    from newsrec.serve.service import Recommender, index_news

    root, _ = trained
    index_news(root / "model", data_dir=root / "data", out_dir=tmp_path / "index")
    service = Recommender.load(root / "model", tmp_path / "index", reranker_dir=root / "reranker",
                               rerank_use="always", serve_cfg=_serve_cfg(batch_max=1))
    tick = _FakeMonotonic()
    service.clock = ServiceClock(service.clock.start_seconds, monotonic=tick)
    return service, tick, tmp_path / "index"


def _serve_cfg(**kw):
    from newsrec.config import ServeConfig

    return ServeConfig(retrieve_k=30, **kw)


def test_service_clock_starts_at_the_log_end_and_fresh_news_age(served, trained):
    from newsrec.serve.service import Recommender

    service, tick, index_dir = served
    root, _ = trained
    reranker = service.reranker
    assert service.rerank_decision.startswith("re-ranker on (rerank.use=always)")
    assert service.clock.start_seconds == pytest.approx(reranker.log_end())
    tick.t += 1800.0  # half an hour after start
    key = service.add_news("FRESH1", "w1 w2 w3", category="a")
    assert reranker.tables.first_seen[key] == pytest.approx(service.clock.now(), abs=1.0)
    assert reranker.tables.first_seen[key] >= reranker.log_end()

    def age_hours() -> float:
        f = reranker.features_for(reranker.totals(), history_idx=np.array([[1]]), history_mask=np.array([[True]]),
                                  candidate_idx=np.array([[key]]), retrieval_scores=np.zeros((1, 1)),
                                  now_seconds=np.array([service.clock.now()]))
        return float(np.expm1(f[0, 0, FEATURE_NAMES.index("log_age_hours")]))

    assert age_hours() == pytest.approx(0.0, abs=1e-3)
    tick.t += 2 * 3600.0
    assert age_hours() == pytest.approx(2.0, abs=1e-3)  # it grows with the clock, not clipped at 0
    rec = service.recommend(history=["N1", "N2"], k=5)
    assert rec.reranked
    # after a restart the clock never runs behind a fresh news already added
    service.save(index_dir)
    again = Recommender.load(root / "model", index_dir, reranker_dir=root / "reranker", rerank_use="always")
    assert again.clock.start_seconds >= reranker.tables.first_seen[key] - 1.0
    assert again.reranker.tables.first_seen[key] == pytest.approx(reranker.tables.first_seen[key], abs=1.0)


def test_service_reranks_with_the_history_length_training_used(served):
    """The user encoder reads data.history_len clicks; the re-ranker reads its own history_len of
    them — in serving as in training and evaluation, whichever is longer."""
    service, _, _ = served
    reranker = service.reranker
    assert service.history_len == 5
    reranker.config.rerank.history_len = 9  # longer than the first stage's 5
    clicks = [f"N{i}" for i in range(1, 13)]
    captured = {}
    original = reranker.rerank_many

    def spy(histories, candidates, firsts, nows):
        captured.update(histories=histories, candidates=candidates, firsts=firsts, nows=nows)
        return original(histories, candidates, firsts, nows)

    reranker.rerank_many = spy
    rec = service.recommend(history=clicks, k=5)
    keys = np.array([service.key_of(c) for c in clicks])
    np.testing.assert_array_equal(captured["histories"][0], keys)  # every click reaches the re-ranker
    want = original([keys[-9:]], captured["candidates"], captured["firsts"], captured["nows"])[0]
    got = {item.news_id: item.score for item in rec.items}
    for key, score in zip(captured["candidates"][0], want):
        if service.news_id_of(int(key)) in got:
            assert got[service.news_id_of(int(key))] == pytest.approx(float(score), rel=1e-5, abs=1e-6)
    short = original([keys[-5:]], captured["candidates"], captured["firsts"], captured["nows"])[0]
    assert not np.allclose(short, want)  # the first stage's 5 clicks would have scored otherwise
    assert rec.history_used == 5
