"""MIND metrics: vectorised implementation vs a per-impression loop of the official formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from newsrec.errors import NewsrecError
from newsrec.eval.metrics import (compute_metrics, format_table, impression_metrics, impression_ranks,
                                  metrics_from_ranks, select_candidates, summarize)


# ---- independent reference: the official msnews/MIND evaluate.py formulas, one impression at a time
def _official_dcg(y_true, y_score, k, stable_ties):
    order = np.argsort(-y_score, kind="stable") if stable_ties else np.argsort(y_score)[::-1]
    y = np.take(y_true, order[:k])
    gains = 2 ** y - 1
    discounts = np.log2(np.arange(len(y)) + 2)
    return np.sum(gains / discounts)


def _official_ndcg(y_true, y_score, k, stable_ties=True):
    return _official_dcg(y_true, y_score, k, stable_ties) / _official_dcg(y_true, y_true, k, stable_ties)


def _official_mrr(y_true, y_score, stable_ties=True):
    order = np.argsort(-y_score, kind="stable") if stable_ties else np.argsort(y_score)[::-1]
    y = np.take(y_true, order)
    return np.sum(y / (np.arange(len(y)) + 1)) / np.sum(y_true)


def _reference(labels, scores, offsets, stable_ties=True):
    out = {"auc": [], "mrr": [], "ndcg@5": [], "ndcg@10": []}
    for i in range(len(offsets) - 1):
        y = labels[offsets[i]:offsets[i + 1]].astype(np.int64)
        s = scores[offsets[i]:offsets[i + 1]]
        has_click, has_non = y.sum() > 0, (y == 0).sum() > 0
        out["auc"].append(roc_auc_score(y, s) if has_click and has_non else np.nan)
        out["mrr"].append(_official_mrr(y, s, stable_ties) if has_click else np.nan)
        for k in (5, 10):
            out[f"ndcg@{k}"].append(_official_ndcg(y, s, k, stable_ties) if has_click else np.nan)
    return {k: np.array(v) for k, v in out.items()}


def _random_split(rng, n_impressions, *, max_candidates=40, tie_levels=None):
    counts = rng.integers(2, max_candidates, size=n_impressions)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    total = int(offsets[-1])
    labels = (rng.random(total) < 0.2).astype(np.int8)
    # make sure most impressions have a click and a non-click, as MIND does
    labels[offsets[:-1]] = 1
    labels[offsets[:-1] + 1] = 0
    if tie_levels is None:
        scores = rng.normal(size=total).astype(np.float32)
    else:
        scores = rng.integers(0, tie_levels, size=total).astype(np.float32)
    return labels, scores, offsets


@pytest.mark.parametrize("tie_levels", [None, 3, 8])
def test_matches_official_formulas_on_random_data(tie_levels):
    rng = np.random.default_rng(0 if tie_levels is None else tie_levels)
    labels, scores, offsets = _random_split(rng, 300, tie_levels=tie_levels)
    got = impression_metrics(labels, scores, offsets)
    want = _reference(labels, scores, offsets)
    for name in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-9, err_msg=name)
    means = compute_metrics(labels, scores, offsets)
    for name in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert means[name] == pytest.approx(float(np.nanmean(want[name])), abs=1e-12)
        assert isinstance(means[name], float)
    assert means["impressions"] == 300 and isinstance(means["impressions"], int)


def test_without_ties_matches_the_official_argsort_exactly():
    rng = np.random.default_rng(5)
    labels, scores, offsets = _random_split(rng, 200)
    scores = scores.astype(np.float64) + np.arange(len(scores)) * 1e-9  # no ties
    got = impression_metrics(labels, scores, offsets)
    want = _reference(labels, scores, offsets, stable_ties=False)
    for name in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-12, err_msg=name)


def test_known_values_by_hand():
    # impression 0: scores rank the candidates [c2, c0, c1]; the click is c0 at rank 2
    labels = np.array([1, 0, 0, 0, 1])
    scores = np.array([0.5, 0.1, 0.9, 0.2, 0.8])
    offsets = np.array([0, 3, 5])
    got = impression_metrics(labels, scores, offsets)
    assert got["mrr"][0] == pytest.approx(0.5)
    assert got["auc"][0] == pytest.approx(0.5)  # the click beats one of two non-clicks
    assert got["ndcg@5"][0] == pytest.approx(1 / math.log2(3))
    assert got["auc"][1] == 1.0 and got["mrr"][1] == 1.0 and got["ndcg@10"][1] == 1.0


def test_two_clicks_mrr_counts_every_click():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([4.0, 3.0, 2.0, 1.0])  # clicks at ranks 1 and 3
    got = impression_metrics(labels, scores, np.array([0, 4]))
    assert got["mrr"][0] == pytest.approx((1 + 1 / 3) / 2)


def test_ties_auc_half_and_stable_rank_order():
    labels = np.array([0, 1, 0])
    scores = np.array([1.0, 1.0, 0.0])
    got = impression_metrics(labels, scores, np.array([0, 3]))
    assert got["auc"][0] == pytest.approx(roc_auc_score(labels, scores)) == pytest.approx(0.75)
    # tie: the first listed (non-click) ranks first, the click second
    assert got["mrr"][0] == pytest.approx(0.5)
    np.testing.assert_array_equal(impression_ranks(scores, np.array([0, 3])), [1, 2, 3])


def test_no_click_and_all_click_impressions_are_counted_not_nan_in_means():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    scores = np.array([0.3, 0.2, 0.1, 0.5, 0.4, 0.9, 0.8, 0.1])
    offsets = np.array([0, 3, 5, 8, 8])  # no click, all click, normal, empty
    per = impression_metrics(labels, scores, offsets)
    assert np.isnan(per["auc"][0]) and np.isnan(per["mrr"][0]) and np.isnan(per["ndcg@10"][0])
    assert np.isnan(per["auc"][1]) and per["mrr"][1] == 0.75 and per["ndcg@5"][1] == 1.0
    assert per["auc"][2] == 1.0
    np.testing.assert_array_equal(per["valid"], [False, False, True, False])
    means = compute_metrics(labels, scores, offsets)
    assert means["impressions"] == 4
    assert means["no_click"] == 2  # incl. the empty impression
    assert means["no_nonclick"] == 1
    assert means["auc_impressions"] == 1
    assert means["impressions_scored"] == 2
    assert means["auc"] == 1.0
    assert means["mrr"] == pytest.approx((0.75 + 1.0) / 2)
    for name in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert not math.isnan(means[name])


def test_nothing_defined_gives_nan_with_zero_counts():
    means = compute_metrics(np.array([0, 0]), np.array([1.0, 2.0]), np.array([0, 2]))
    assert math.isnan(means["auc"]) and means["auc_impressions"] == 0 and means["no_click"] == 1


def test_bad_inputs_fail_clearly():
    with pytest.raises(NewsrecError, match="NaN or infinite"):
        compute_metrics(np.array([1, 0]), np.array([np.nan, 1.0]), np.array([0, 2]))
    with pytest.raises(NewsrecError, match="offsets"):
        compute_metrics(np.array([1, 0]), np.array([0.0, 1.0]), np.array([0, 3]))
    with pytest.raises(NewsrecError, match="labels must be 0"):
        compute_metrics(np.array([2, 0]), np.array([0.0, 1.0]), np.array([0, 2]))


def test_ranks_are_permutations_and_metrics_from_ranks_equal_metrics_from_scores():
    rng = np.random.default_rng(3)
    labels, scores, offsets = _random_split(rng, 100, tie_levels=5)
    ranks = impression_ranks(scores, offsets)
    for i in range(100):
        r = ranks[offsets[i]:offsets[i + 1]]
        np.testing.assert_array_equal(np.sort(r), np.arange(1, len(r) + 1))
        s = scores[offsets[i]:offsets[i + 1]]
        np.testing.assert_array_equal(r, np.argsort(np.argsort(-s, kind="stable"), kind="stable") + 1)
    from_ranks = metrics_from_ranks(labels, ranks, offsets)
    from_scores = compute_metrics(labels, scores, offsets)
    # MRR / nDCG use the same stable order; AUC differs only through tie handling
    for name in ("mrr", "ndcg@5", "ndcg@10"):
        assert from_ranks[name] == pytest.approx(from_scores[name], abs=1e-12)


def test_select_candidates_and_summarize_mask():
    labels = np.array([1, 0, 0, 1, 0])
    scores = np.array([0.1, 0.9, 0.5, 0.8, 0.2])
    offsets = np.array([0, 3, 5])
    keep = np.array([True, False, True, True, False])
    sel_labels, sel_scores, sel_offsets = select_candidates(labels, scores, offsets, keep)
    np.testing.assert_array_equal(sel_offsets, [0, 2, 3])
    np.testing.assert_array_equal(sel_labels, [1, 0, 1])
    np.testing.assert_array_equal(sel_scores, [0.1, 0.5, 0.8])
    per = impression_metrics(labels, scores, offsets)
    only_second = summarize(per, np.array([False, True]))
    assert only_second["impressions"] == 1 and only_second["auc"] == 1.0


def test_format_table_shows_percent_and_na():
    table = format_table({"all": {"auc": 0.61234, "mrr": math.nan, "ndcg@5": 0.3, "ndcg@10": 0.4,
                                  "impressions": 7}})
    assert "61.23" in table and "n/a" in table and table.splitlines()[0].split()[-1] == "impressions"


# ---- properties
@st.composite
def _impression(draw):
    n = draw(st.integers(2, 30))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    if sum(labels) == 0:
        labels[draw(st.integers(0, n - 1))] = 1
    if sum(labels) == n:
        labels[draw(st.integers(0, n - 1))] = 0
    scores = draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n))
    return np.array(labels), np.array(scores, dtype=np.float64)


@settings(max_examples=80, deadline=None)
@given(_impression())
def test_perfect_ranking_scores_one_and_reversed_is_worst(imp):
    labels, _ = imp
    offsets = np.array([0, len(labels)])
    n, c = len(labels), int(labels.sum())
    perfect = impression_metrics(labels, labels.astype(float), offsets)
    for name in ("auc", "ndcg@5", "ndcg@10"):
        assert perfect[name][0] == pytest.approx(1.0)
    # the official MRR averages 1/rank over all c clicks: its best is mean(1/1..1/c)
    assert perfect["mrr"][0] == pytest.approx(np.mean(1.0 / np.arange(1, c + 1)))
    reversed_ = impression_metrics(labels, -labels.astype(float), offsets)
    assert reversed_["auc"][0] == pytest.approx(0.0)
    # reversed puts every click after every non-click: MRR is the minimum possible
    assert reversed_["mrr"][0] == pytest.approx(np.mean(1.0 / np.arange(n - c + 1, n + 1)))


@settings(max_examples=80, deadline=None)
@given(_impression(), st.randoms(use_true_random=False))
def test_permuting_candidates_keeps_auc_and_without_ties_all_metrics(imp, rnd):
    labels, scores = imp
    scores = scores + np.arange(len(scores)) * 1e-3  # untie (integer scores stay ordered)
    perm = np.array(rnd.sample(range(len(labels)), len(labels)))
    offsets = np.array([0, len(labels)])
    a = impression_metrics(labels, scores, offsets)
    b = impression_metrics(labels[perm], scores[perm], offsets)
    for name in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert a[name][0] == pytest.approx(b[name][0], abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(_impression(), st.randoms(use_true_random=False))
def test_auc_with_ties_invariant_to_permutation_and_equals_sklearn(imp, rnd):
    labels, scores = imp
    perm = np.array(rnd.sample(range(len(labels)), len(labels)))
    offsets = np.array([0, len(labels)])
    a = impression_metrics(labels[perm], scores[perm], offsets)["auc"][0]
    assert a == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)



def test_float64_scores_with_ties_take_the_general_path_and_agree():
    rng = np.random.default_rng(11)
    labels, scores, offsets = _random_split(rng, 150, tie_levels=4)
    scores64 = scores.astype(np.float64) + 0.1  # not representable in float32: dense-rank path
    got = impression_metrics(labels, scores64, offsets)
    want = _reference(labels, scores64, offsets)
    for name in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-9, err_msg=name)
    np.testing.assert_array_equal(impression_ranks(scores64, offsets), impression_ranks(scores, offsets))
