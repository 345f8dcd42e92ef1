"""Hand-made baselines: golden values against plain Python, no label leakage, they learn where the
answer is known, and `newsrec evaluate/submit --baseline`."""
from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import BaselineConfig
from newsrec.data import schema
from newsrec.data.artifact import DatasetArtifact
from newsrec.eval.baselines import (LOGREG_FEATURES, LogregModel, baseline_scores, candidate_ctr,
                                    evaluate_baseline, fit_logreg, logreg_features)
from newsrec.eval.metrics import compute_metrics
from newsrec.utils.io import write_json
from tests.train_fixtures import write_known_answer_artifact

T0 = dt.datetime(2019, 11, 10, 9)

# news_idx -> (category, subcategory, entities)
TINY_NEWS = {
    1: ("sports", "soccer", ["Q1"]), 2: ("sports", "soccer", ["Q1", "Q2"]), 3: ("sports", "tennis", []),
    4: ("news", "politics", ["Q3"]), 5: ("news", "politics", ["Q3", "Q4"]), 6: ("news", "world", ["Q2"]),
    7: ("food", "recipes", []), 8: ("food", "recipes", ["Q5"]), 9: ("weather", "local", ["Q6"]),
}
# (split, user, minutes after T0, history, [(candidate, label)])
TINY_BEHAVIORS = [
    ("train", "U1", 0, [1, 2, 4], [(3, 1), (5, 0), (7, 0)]),
    ("train", "U2", 5, [4, 5, 6, 8], [(3, 0), (5, 1), (8, 0)]),
    ("train", "U1", 5, [1, 2, 4], [(3, 1), (5, 1), (9, 0)]),  # same second as the one above
    ("train", "U3", 10, [], [(3, 0), (5, 0), (7, 1)]),
    ("train", "U2", 20, [4, 5, 6, 8, 5], [(3, 1), (7, 0), (9, 1)]),
    ("dev", "U1", 60, [1, 2, 4, 3], [(5, 0), (6, 1), (1, 0), (9, 0)]),
    ("dev", "U3", 61, [], [(3, 1), (7, 0)]),
    ("dev", "U2", 62, [4, 5, 6, 8, 5, 9], [(1, 0), (2, 1), (6, 0), (8, 1), (9, 0)]),
    ("dev", "U4", 63, [7], [(8, 1), (4, 0), (9, 0)]),
]


def write_tiny_artifact(root, behaviors=TINY_BEHAVIORS, news=TINY_NEWS):
    """A dataset artifact written by hand following ``newsrec.data.schema``; train counts in
    news.parquet computed here in plain Python from ``behaviors``."""
    root.mkdir(parents=True, exist_ok=True)
    n_news = len(news)
    categories = sorted({c for c, _, _ in news.values()})
    subcategories = sorted({s for _, s, _ in news.values()})
    write_json(root / schema.CATEGORIES, {"category": ["<unk>", *categories],
                                          "subcategory": ["<unk>", *subcategories]})
    write_json(root / schema.VOCAB, {"words": ["<pad>", "<unk>", "w"]})
    tokens = np.zeros((n_news + 1, 4), dtype=np.int32)
    tokens[1:, 0] = 2
    np.save(root / schema.TITLE_TOKENS, tokens)
    shown, clicked, in_history = Counter(), Counter(), Counter()
    for split, _, _, history, cands in behaviors:
        if split == "train":
            in_history.update(history)
            for n, y in cands:
                shown[n] += 1
                clicked[n] += y
    ids = sorted(news)
    frame = pl.DataFrame({
        "news_idx": ids, "news_id": [f"N{i}" for i in ids],
        "category": [news[i][0] for i in ids], "subcategory": [news[i][1] for i in ids],
        "category_idx": [1 + categories.index(news[i][0]) for i in ids],
        "subcategory_idx": [1 + subcategories.index(news[i][1]) for i in ids],
        "title": ["w"] * n_news, "abstract": [""] * n_news, "url": [""] * n_news,
        # the first entity in the title, the rest in the abstract (and the first repeated there)
        "title_entities": [news[i][2][:1] for i in ids],
        "title_entity_confidence": [[1.0] * len(news[i][2][:1]) for i in ids],
        "abstract_entities": [news[i][2] for i in ids],
        "abstract_entity_confidence": [[1.0] * len(news[i][2]) for i in ids],
        "splits": [["train"]] * n_news,
        "train_impressions": [shown[i] for i in ids], "train_clicks": [clicked[i] for i in ids],
        "train_history_clicks": [in_history[i] for i in ids], "first_seen": [T0] * n_news,
    }, schema=schema.NEWS_SCHEMA)
    frame.write_parquet(root / schema.NEWS)
    for split in ("train", "dev"):
        rows = [b for b in behaviors if b[0] == split]
        pl.DataFrame({
            "impression_id": list(range(1, len(rows) + 1)), "user_id": [r[1] for r in rows],
            "time": [T0 + dt.timedelta(minutes=r[2]) for r in rows], "history": [r[3] for r in rows],
            "candidates": [[n for n, _ in r[4]] for r in rows], "labels": [[y for _, y in r[4]] for r in rows],
        }, schema=schema.BEHAVIORS_SCHEMA).write_parquet(root / schema.behaviors_file(split))
        # the raw behaviors.tsv these rows stand for, and ingest's listing of its lines (submissions)
        raw = root / "raw" / split
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "behaviors.tsv").write_text("".join(
            f"{i}\t{r[1]}\t11/10/2019 9:00:00 AM\t{' '.join(f'N{h}' for h in r[3])}\t"
            + " ".join(f"N{n}-{y}" for n, y in r[4]) + "\n" for i, r in enumerate(rows, start=1)))
        pl.DataFrame({"line_no": np.arange(1, len(rows) + 1), "impression_id": [str(i) for i in range(1, len(rows) + 1)],
                      "row": np.arange(len(rows)), "candidates": [[n for n, _ in r[4]] for r in rows]},
                     schema=schema.LISTING_SCHEMA).write_parquet(root / schema.listing_file(split))
    sources = {split: {"path": str(root / "raw" / split),
                       "files": {"behaviors.tsv": {"path": str(root / "raw" / split / "behaviors.tsv")}}}
               for split in ("train", "dev")}
    write_json(root / schema.MANIFEST, {"schema_version": schema.SCHEMA_VERSION, "name": "tiny",
                                        "sources": sources})
    return DatasetArtifact(root)


@pytest.fixture()
def tiny(tmp_path):
    return write_tiny_artifact(tmp_path / "tiny")


def _python_lifts(history, candidate, a, base_cat, base_sub):
    """(category share, subcategory share, category lift, subcategory lift) in plain Python."""
    cat, sub = TINY_NEWS[candidate][0], TINY_NEWS[candidate][1]
    if not history:
        return 0.0, 0.0, 0.0, 0.0
    share_cat = sum(TINY_NEWS[h][0] == cat for h in history) / len(history)
    share_sub = sum(TINY_NEWS[h][1] == sub for h in history) / len(history)
    return (share_cat, share_sub, math.log((share_cat + a) / (base_cat[cat] + a)),
            math.log((share_sub + a) / (base_sub[sub] + a)))


def _python_base_rates():
    clicks = [h for split, _, _, history, _ in TINY_BEHAVIORS if split == "train" for h in history]
    base_cat = Counter(TINY_NEWS[h][0] for h in clicks)
    base_sub = Counter(TINY_NEWS[h][1] for h in clicks)
    return ({k: base_cat[k] / len(clicks) for k in {c for c, _, _ in TINY_NEWS.values()}},
            {k: base_sub[k] / len(clicks) for k in {s for _, s, _ in TINY_NEWS.values()}})


def test_heuristic_equals_plain_python(tiny):
    a = 0.05
    base_cat, base_sub = _python_base_rates()
    dev = tiny.impressions("dev")
    scores = baseline_scores("heuristic", tiny, dev, BaselineConfig(share_smoothing=a)).scores
    expected = [sum(_python_lifts(history, n, a, base_cat, base_sub)[2:])
                for split, _, _, history, cands in TINY_BEHAVIORS if split == "dev" for n, _ in cands]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
    # one value by hand: U1 (history sports/soccer, sports/soccer, news/politics, sports/tennis) and
    # candidate 1 (sports/soccer); train histories hold 15 clicks, 4 of them sports/soccer
    assert base_cat["sports"] == pytest.approx(4 / 15) and base_sub["soccer"] == pytest.approx(4 / 15)
    by_hand = math.log((3 / 4 + a) / (4 / 15 + a)) + math.log((2 / 4 + a) / (4 / 15 + a))
    assert scores[2] == pytest.approx(by_hand, rel=1e-6)
    # an empty history scores 0 for every candidate
    assert scores[4] == 0.0 and scores[5] == 0.0


def test_logreg_features_equal_plain_python(tiny):
    config = BaselineConfig(share_smoothing=0.05, popularity_prior=3.0)
    base_cat, base_sub = _python_base_rates()
    dev = tiny.impressions("dev")
    x = logreg_features(tiny, dev, config)
    assert x.shape == (len(dev.candidates), len(LOGREG_FEATURES))
    train = [b for b in TINY_BEHAVIORS if b[0] == "train"]
    shown = Counter(n for b in train for n, _ in b[4])
    clicks = Counter({n: sum(y for b in train for m, y in b[4] if m == n) for n in TINY_NEWS})
    mean = sum(clicks.values()) / sum(shown.values())
    row = 0
    for split, _, _, history, cands in TINY_BEHAVIORS:
        if split != "dev":
            continue
        history_entities = {e for h in history for e in TINY_NEWS[h][2]}
        for n, _ in cands:
            ents = TINY_NEWS[n][2]
            overlap = sum(e in history_entities for e in ents) / len(ents) if ents else 0.0
            ctr = (clicks[n] + 3.0 * mean) / (shown[n] + 3.0)
            want = [*_python_lifts(history, n, 0.05, base_cat, base_sub), overlap,
                    math.log(ctr / (1 - ctr)), math.log1p(len(history))]
            np.testing.assert_allclose(x[row], want, rtol=1e-6, atol=1e-9, err_msg=f"candidate row {row}")
            row += 1


def _python_prefix_counts(behaviors):
    """(clicks, showings) of each train candidate in train impressions strictly earlier."""
    train = [b for b in behaviors if b[0] == "train"]
    out = []
    for _, _, minute, _, cands in train:
        for n, _ in cands:
            earlier = [y for _, _, m, _, c in train if m < minute for k, y in c if k == n]
            out.append((sum(earlier), len(earlier)))
    return out


def test_train_ctr_counts_only_strictly_earlier_impressions(tiny):
    """A train impression's click-through counts train impressions strictly before its time: never
    its own label, nor one at the same second, nor a later one."""
    train = tiny.impressions("train")
    prior, mean = 2.0, 7 / 15  # 7 clicks over 15 showings in the whole train log
    ctr = candidate_ctr(tiny, train, prior=prior)
    counts = _python_prefix_counts(TINY_BEHAVIORS)
    np.testing.assert_allclose(ctr, [(c + prior * mean) / (s + prior) for c, s in counts], rtol=1e-12)
    # exact counts: news 3 is clicked at t0, not at t5 (U2), clicked at t5 (U1), not at t10, clicked at t20
    assert [counts[int(o)] for o in train.candidate_offsets[:-1]] == [(0, 0), (1, 1), (1, 1), (2, 3), (2, 4)]
    # news 5 at t5 (two impressions at that second, one clicks it): only the t0 showing counts
    assert counts[4] == counts[7] == (0, 1)
    # flipping the last impression's labels changes none of its own features (prior 0: plain counts)
    flipped = [b if b[2] != 20 else (*b[:4], [(n, 1 - y) for n, y in b[4]]) for b in TINY_BEHAVIORS]
    other = write_tiny_artifact(tiny.root.parent / "flipped", behaviors=flipped)
    before = candidate_ctr(tiny, train, prior=0.0)
    after = candidate_ctr(other, other.impressions("train"), prior=0.0)
    shown = np.array([s for _, s in counts])
    np.testing.assert_array_equal(before[shown > 0], after[shown > 0])
    np.testing.assert_array_equal(before[train.candidate_offsets[4]:], [2 / 4, 1 / 2, 0 / 1])
    # dev uses the whole train log: news 3 shown 5 times, clicked 3
    dev = tiny.impressions("dev")
    assert candidate_ctr(tiny, dev, prior=prior)[dev.candidate_offsets[1]] == pytest.approx((3 + prior * mean) / 7)


def test_logreg_model_json_round_trip_and_sklearn_agreement(tiny):
    from sklearn.linear_model import LogisticRegression

    config = BaselineConfig(share_smoothing=0.05)
    model = fit_logreg(tiny, config)
    again = LogregModel.from_json(json.loads(json.dumps(model.to_json())))
    x = logreg_features(tiny, tiny.impressions("dev"), config)
    np.testing.assert_array_equal(model.decision(x), again.decision(x))
    train = tiny.impressions("train")
    xt = logreg_features(tiny, train, config)
    scale = xt.std(axis=0)
    scale[scale == 0] = 1.0
    reference = LogisticRegression(C=config.logreg_c, max_iter=1000).fit((xt - xt.mean(axis=0)) / scale,
                                                                         train.labels)
    np.testing.assert_allclose(model.decision(x),
                               reference.decision_function((x - xt.mean(axis=0)) / scale), rtol=1e-6, atol=1e-8)
    assert model.train_rows == len(train.candidates)


def write_category_and_popularity_world(root, *, seed=0, n_categories=5, news_per_category=24,
                                        n_users=60, impressions_per_user=6):
    """Users like one category; each news has an appeal of its own. A click needs both: category
    match adds +2.5 to the logit, the news' appeal spreads ±2. Popularity alone sees half the answer."""
    rng = np.random.default_rng(seed)
    n_news = n_categories * news_per_category
    news_cat = np.repeat(np.arange(n_categories), news_per_category)
    appeal = rng.uniform(-2.0, 2.0, n_news)
    news = {i + 1: (f"c{news_cat[i]}", f"s{news_cat[i]}", []) for i in range(n_news)}
    behaviors = []
    for u in range(n_users):
        liked = u % n_categories
        pool = np.flatnonzero(news_cat == liked) + 1
        history = rng.choice(pool, size=int(rng.integers(0, 8)), replace=False).tolist()
        for k in range(impressions_per_user):
            split = "train" if k < impressions_per_user - 2 else "dev"
            cands = rng.choice(n_news, size=10, replace=False) + 1
            logit = -2.0 + 2.5 * (news_cat[cands - 1] == liked) + appeal[cands - 1]
            labels = (rng.random(10) < 1 / (1 + np.exp(-logit))).astype(int)
            if labels.sum() in (0, 10):
                labels[int(np.argmax(logit))], labels[int(np.argmin(logit))] = 1, 0
            behaviors.append((split, f"U{u}", k * 600 + u, history,
                              list(zip(cands.tolist(), labels.tolist()))))
    return write_tiny_artifact(root, behaviors=behaviors, news=news)


def test_logreg_beats_popularity_where_clicks_need_both(tmp_path):
    dataset = write_category_and_popularity_world(tmp_path / "world")
    dev = dataset.impressions("dev")
    auc = {name: compute_metrics(dev.labels, baseline_scores(name, dataset, dev).scores,
                                 dev.candidate_offsets)["auc"] for name in ("logreg", "popularity", "heuristic")}
    assert auc["popularity"] > 0.55  # the appeal is visible to popularity
    assert auc["logreg"] > auc["popularity"] + 0.05
    assert auc["logreg"] > auc["heuristic"]


def test_heuristic_ranks_the_liked_category_first(tmp_path):
    dataset = DatasetArtifact(write_known_answer_artifact(tmp_path / "known"))
    result = evaluate_baseline("heuristic", dataset.root)
    assert result.metrics["auc"] > 0.85
    popularity = evaluate_baseline("popularity", dataset.root)
    assert popularity.metrics["auc"] == pytest.approx(0.5)  # no train clicks recorded: all news tie


def test_evaluate_cli_baseline_writes_the_metrics_contract(tiny, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["evaluate", "--baseline", "logreg", "--data", str(tiny.root),
                                       "--out", str(out), "-o", "baseline.logreg_c=0.5"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    for key in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert isinstance(metrics[key], float)
    assert metrics["impressions"] == 4 and metrics["candidates"] == 14
    assert set(metrics["breakdown"]) == {"history", "candidates"}
    assert metrics["baseline"]["name"] == "logreg" and metrics["baseline"]["config"]["logreg_c"] == 0.5
    assert metrics["baseline"]["model"]["features"] == list(LOGREG_FEATURES)
    library = evaluate_baseline("logreg", tiny.root, config=BaselineConfig(logreg_c=0.5))
    assert metrics["auc"] == pytest.approx(library.metrics["auc"])
    assert "unseen news" in result.output


@pytest.mark.parametrize("args", [["--model", "m"], ["--reranker", "r"], ["--device", "cpu"],
                                  ["-o", "train.epochs=2"]])
def test_baseline_with_model_options_fails_in_one_line(tiny, args):
    result = CliRunner().invoke(main, ["evaluate", "--baseline", "heuristic", "--data", str(tiny.root), *args])
    assert result.exit_code == 1, result.output
    assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ")


def test_model_with_baseline_settings_fails_and_neither_fails(tiny):
    result = CliRunner().invoke(main, ["evaluate", "--model", "m", "--data", str(tiny.root),
                                       "-o", "baseline.seed=1"])
    assert result.exit_code == 1 and "baseline section" in result.output
    result = CliRunner().invoke(main, ["evaluate", "--data", str(tiny.root)])
    assert result.exit_code == 1 and "exactly one of --model" in result.output


def test_submit_cli_baseline_writes_a_valid_file(tiny, tmp_path):
    out = tmp_path / "prediction.zip"
    result = CliRunner().invoke(main, ["submit", "--baseline", "heuristic", "--data", str(tiny.root),
                                       "--split", "dev", "--out", str(out)])
    assert result.exit_code == 0, result.output
    check = CliRunner().invoke(main, ["submit", "--check", str(out), "--data", str(tiny.root), "--split", "dev"])
    assert check.exit_code == 0 and "valid (4 impressions" in check.output


def test_logreg_fits_on_a_seeded_sample_of_whole_impressions(tmp_path):
    dataset = write_category_and_popularity_world(tmp_path / "world")
    train = dataset.impressions("train")
    config = BaselineConfig(logreg_max_rows=500, seed=3)
    model = fit_logreg(dataset, config)
    assert 500 <= model.train_rows < 510  # whole impressions of 10 candidates, just past the cap
    assert model.train_rows < len(train.candidates)
    again = fit_logreg(dataset, config)
    np.testing.assert_array_equal(model.coef, again.coef)
    assert not np.array_equal(model.coef, fit_logreg(dataset, BaselineConfig(logreg_max_rows=500, seed=4)).coef)


def test_model_category_lift_block_is_the_share_lift_score(tiny):
    """With model.category_lift the dot product of the user's and the news' wide blocks is the
    hand-made share-lift score (computed here in plain Python), under the learned weights."""
    import torch

    from newsrec.config import load_config
    from newsrec.inference.model_io import build_model
    from newsrec.models.inputs import NewsInputs

    a = 0.05
    config = load_config(None, ["model.category_lift=true", f"model.category_lift_smoothing={a}",
                                "model.hidden_size=16", "model.num_heads=2", "model.embedding_dim=8"])
    model = build_model(config, tiny).eval()
    deep = config.model.hidden_size
    category, subcategory = tiny.news_categories
    rows = torch.arange(len(category))
    with torch.no_grad():
        model.category_lift.weight.copy_(torch.tensor([1.0, 0.5]))
        news = model.encode_news(NewsInputs(category=torch.as_tensor(category)[rows],
                                            subcategory=torch.as_tensor(subcategory)[rows],
                                            title_tokens=torch.as_tensor(np.array(tiny.title_tokens), dtype=torch.long)))
    assert news.shape == (len(rows), model.news_dim) and model.news_dim > deep
    base_cat, base_sub = _python_base_rates()
    for split, _, _, history, cands in TINY_BEHAVIORS:
        n = max(len(history), 1)
        hist = torch.zeros(1, n, model.news_dim)
        mask = torch.zeros(1, n, dtype=torch.bool)
        if history:
            hist[0, :len(history)] = news[torch.as_tensor(history)]
            mask[0, :len(history)] = True
        with torch.no_grad():
            user = model.encode_user(hist, mask)
        for candidate, _ in cands:
            wide = float(user[0, deep:] @ news[candidate, deep:])
            _, _, lift_cat, lift_sub = _python_lifts(history, candidate, a, base_cat, base_sub)
            assert wide == pytest.approx(lift_cat + 0.5 * lift_sub, abs=1e-5), (split, history, candidate)


def test_title_match_baseline_equals_plain_python(tiny):
    from newsrec.data.features import title_match_vectors

    vocab = 10
    write_json(tiny.root / schema.VOCAB, {"words": ["<pad>", "<unk>", *[f"w{i}" for i in range(vocab - 2)]]})
    tokens = np.random.default_rng(0).integers(2, vocab, size=(len(TINY_NEWS) + 1, 4)).astype(np.int32)
    tokens[0] = 0  # the padding news
    tokens[3, 2:] = 0
    tokens[5, 0] = 1  # an unknown word
    np.save(tiny.root / schema.TITLE_TOKENS, tokens)
    dataset = DatasetArtifact(tiny.root)
    dev = dataset.impressions("dev")
    scores = baseline_scores("title-match", dataset, dev, BaselineConfig(title_match_dim=3)).scores
    rows = title_match_vectors(tokens, vocab, 3)
    expected = []
    for split, _, _, history, cands in TINY_BEHAVIORS:
        if split != "dev":
            continue
        blocks = {n: sum(rows[w] for w in tokens[n]) for n in set(history) | {c for c, _ in cands}}
        blocks = {n: v / math.sqrt(sum(x * x for x in v)) for n, v in blocks.items()}
        for candidate, _ in cands:
            expected.append(sum(float(blocks[candidate] @ blocks[h]) for h in history) / len(history)
                            if history else 0.0)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores[4] == 0.0 and scores[5] == 0.0  # the empty history
    assert len(set(np.round(scores[:4], 5))) > 1  # the titles differ, and so do the scores
