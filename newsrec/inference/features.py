"""The re-ranker's feature rows: one function of (the log strictly before an impression's time,
the impression), the same for training, evaluation and serving.

The log is what was shown (every split, no label needed) and what was clicked (the labelled
impressions whose labels the first stage and the popularity counts may use). ``EventLog`` answers
"what did the log tell before this moment" for any (news, time) pairs; ``LogTotals`` is the same
answer for moments after the whole log (serving), read from per-news totals. ``feature_rows``
turns those counts, the news tables and the impression into the features of ``FEATURE_NAMES``.

Where the labelled part of the log ends matters and is chosen by the caller, never by the feature
code: at evaluation and serving it is the train split; when the re-ranker learns, it is the train
log before the re-ranker's own slice (see ``newsrec.train.rerank``), so its training rows meet news
shown since the labels end (exposure without clicks, cold news) exactly as dev, test and serving do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from newsrec.data.artifact import DatasetArtifact, Impressions, concat_impressions
from newsrec.data.popularity import PrefixCounts, first_seen_seconds, mean_ctr_of, shrunk_ctr, whole_seconds

FEATURE_NAMES = (
    "retrieval_score",
    "popularity_logit",
    "log_impressions",
    "log_exposure",
    "log_unlabelled_exposure",
    "log_exposure_rate",
    "log_age_hours",
    "age_unknown",
    "category_share",
    "subcategory_share",
    "log_history_len",
)
MAX_AGE_HOURS = 24.0 * 30  # ages beyond a month (and unknown ages) are clipped here


# ------------------------------------------------------------------------------------------------
# the news


@dataclass
class NewsTables:
    """What the re-ranker knows about each news, indexed by news_idx (row 0 = padding news).

    vectors: float32 [n, D] frozen first-stage news vectors; clicks, impressions: int64 [n] labelled
    counts of the whole log (popularity after it); displays: int64 [n] showings in the whole log
    (every split, no label needed); first_seen: float64 [n] seconds since the epoch when the news
    entered the pool; first_seen_known: bool [n]; category, subcategory: int64 [n].
    """

    vectors: np.ndarray
    clicks: np.ndarray
    impressions: np.ndarray
    displays: np.ndarray
    first_seen: np.ndarray
    first_seen_known: np.ndarray
    category: np.ndarray
    subcategory: np.ndarray

    FIELDS = ("vectors", "clicks", "impressions", "displays", "first_seen", "first_seen_known",
              "category", "subcategory")

    def __len__(self) -> int:
        return len(self.vectors)

    def grow(self, size: int) -> None:
        """Extend every table to ``size`` rows (new rows: zero vectors, no counts, unknown age)."""
        extra = size - len(self)
        if extra <= 0:
            return
        self.vectors = np.concatenate([self.vectors, np.zeros((extra, self.vectors.shape[1]), np.float32)])
        for name in self.FIELDS[1:]:
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.zeros(extra, dtype=arr.dtype)]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.FIELDS}


def news_tables(dataset: DatasetArtifact, news_vectors: np.ndarray, log: "EventLog") -> NewsTables:
    """The tables of ``dataset``'s news after the whole ``log`` (counts = its totals)."""
    seen, known = first_seen_seconds(dataset)
    cat, sub = dataset.news_categories
    clicks, labelled, shown = log.totals(dataset.n_news + 1)
    return NewsTables(vectors=np.ascontiguousarray(news_vectors, dtype=np.float32), clicks=clicks,
                      impressions=labelled, displays=shown, first_seen=seen, first_seen_known=known,
                      category=cat.astype(np.int64), subcategory=sub.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# the log


class LogCounts(Protocol):
    mean_ctr: float

    def counts(self, news_idx: np.ndarray, now_seconds: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clicks, labelled showings, all showings) int64 [B, C] of ``news_idx`` [B, C] strictly
        before ``now_seconds`` [B]."""
        ...


class EventLog:
    """What a log tells strictly before any moment: ``labelled`` impressions (their clicks and
    showings; the part of the log whose labels may be used) and ``shown`` impressions (every
    showing, labelled or not — ``labelled`` is normally part of it).

    Moments after the labelled part (dev, test, the re-ranker's slice) are answered from its totals
    plus a running count of the later showings only; a full running count is built the first time
    a moment inside the labelled part is asked for. Times are whole seconds, as in
    ``PrefixCounts``: an event at the same second as the moment is not before it."""

    def __init__(self, labelled: Impressions, shown: Impressions) -> None:
        if labelled.labels is None:
            raise ValueError(f"split '{labelled.split}' has no labels: the labelled log needs them")
        self._labelled = labelled
        self._shown = shown
        self.mean_ctr = mean_ctr_of(int(labelled.labels.sum()), len(labelled.candidates))
        lab_sec = whole_seconds(labelled.time)
        shown_sec = whole_seconds(shown.time)
        self.labels_end = int(lab_sec.max()) + 1 if len(lab_sec) else -(1 << 62)  # every label is before
        ends = [int(t.max()) for t in (lab_sec, shown_sec) if len(t)]
        self.end_seconds = float(max(ends)) if ends else 0.0
        size = int(max(labelled.candidates.max(initial=0), shown.candidates.max(initial=0))) + 1
        self._size = size
        self._clicks = np.bincount(labelled.candidates, weights=labelled.labels.astype(np.float64),
                                   minlength=size).astype(np.int64)
        self._labelled_shown = np.bincount(labelled.candidates, minlength=size).astype(np.int64)
        early = shown.select(np.flatnonzero(shown_sec < self.labels_end))
        self._early_shown = np.bincount(early.candidates, minlength=size).astype(np.int64)
        self._late = PrefixCounts(shown.select(np.flatnonzero(shown_sec >= self.labels_end)), clicks=False)
        self._full: tuple[PrefixCounts, PrefixCounts] | None = None

    @classmethod
    def of_dataset(cls, dataset: DatasetArtifact, opened: dict[str, Impressions] | None = None) -> "EventLog":
        """The log of a dataset artifact: labels of the train split, showings of every split."""
        opened = opened or {}
        parts = {s: opened[s] if s in opened else dataset.impressions(s) for s in dataset.splits}
        return cls(parts["train"], concat_impressions(list(parts.values()), split="log", drop_mixed_labels=True))

    def counts(self, news_idx: np.ndarray, now_seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        news_idx = np.asarray(news_idx, dtype=np.int64)
        sec = np.floor(np.asarray(now_seconds, dtype=np.float64)).astype(np.int64)[:, None]
        known = np.minimum(news_idx, self._size - 1)  # news beyond the log (fresh): no events
        outside = news_idx >= self._size
        clicks = np.where(outside, 0, self._clicks[known])
        labelled = np.where(outside, 0, self._labelled_shown[known])
        _, late = self._late.at(news_idx, sec)
        shown = np.where(outside, 0, self._early_shown[known]) + late
        inside = (sec < self.labels_end)[:, 0]
        if inside.any():  # a moment within the labelled part: count it event by event
            if self._full is None:
                self._full = (PrefixCounts(self._labelled), PrefixCounts(self._shown, clicks=False))
            c, lab = self._full[0].at(news_idx[inside], sec[inside])
            _, sh = self._full[1].at(news_idx[inside], sec[inside])
            clicks[inside], labelled[inside], shown[inside] = c, lab, sh
        return clicks, labelled, shown

    def totals(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clicks, labelled showings, all showings) int64 [size] per news_idx over the whole log."""
        late = np.bincount(self._shown.candidates, minlength=size)[:size].astype(np.int64)
        pad = max(size - self._size, 0)
        return (np.pad(self._clicks, (0, pad))[:size], np.pad(self._labelled_shown, (0, pad))[:size], late)


@dataclass
class LogTotals:
    """The log's answer for moments after its end (serving): per-news totals of ``NewsTables``."""

    tables: NewsTables
    mean_ctr: float

    def counts(self, news_idx: np.ndarray, now_seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = self.tables
        return t.clicks[news_idx], t.impressions[news_idx], t.displays[news_idx]


# ------------------------------------------------------------------------------------------------
# feature rows


def feature_rows(log: LogCounts, tables: NewsTables, *, now_seconds: np.ndarray, history_idx: np.ndarray,
                 history_mask: np.ndarray, candidate_idx: np.ndarray, retrieval_scores: np.ndarray,
                 prior: float) -> np.ndarray:
    """Features float32 [B, C, F] (``FEATURE_NAMES``) of impressions at ``now_seconds`` [B]
    (seconds since the epoch) with histories int [B, N] (mask [B, N], True = real click),
    candidates int [B, C] and the first stage's scores of those candidates [B, C]. Everything the
    log contributes is counted strictly before each impression's time. The one place features are
    made: training rows, evaluation and serving all call this."""
    clicks, labelled, shown = log.counts(candidate_idx, now_seconds)
    return candidate_features(
        retrieval_scores=retrieval_scores, clicks=clicks, impressions=labelled, exposure=shown,
        age_seconds=np.asarray(now_seconds, dtype=np.float64)[:, None] - tables.first_seen[candidate_idx],
        age_known=tables.first_seen_known[candidate_idx], candidate_category=tables.category[candidate_idx],
        candidate_subcategory=tables.subcategory[candidate_idx], history_category=tables.category[history_idx],
        history_subcategory=tables.subcategory[history_idx], history_mask=history_mask, prior=prior,
        mean_ctr=log.mean_ctr)


def candidate_features(*, retrieval_scores: np.ndarray, clicks: np.ndarray, impressions: np.ndarray,
                       exposure: np.ndarray, age_seconds: np.ndarray, age_known: np.ndarray,
                       candidate_category: np.ndarray, candidate_subcategory: np.ndarray,
                       history_category: np.ndarray, history_subcategory: np.ndarray,
                       history_mask: np.ndarray, prior: float, mean_ctr: float) -> np.ndarray:
    """The arithmetic of ``feature_rows``: float32 ``[B, C, F]`` in the order of ``FEATURE_NAMES``.

    Per candidate ``[B, C]``: retrieval_scores, clicks / impressions (labelled counts the popularity
    is shrunk from), exposure (all showings before now, labelled or not: at least ``impressions``),
    age_seconds (now − first seen), age_known (bool), candidate_(sub)category.
    Per history ``[B, N]``: history_(sub)category and history_mask (True = real click).
    """
    ctr = shrunk_ctr(clicks, impressions, prior=prior, mean_ctr=mean_ctr)
    eps = 1e-4
    mean = min(max(mean_ctr, eps), 1 - eps)
    ctr = np.clip(ctr, eps, 1 - eps)
    popularity_logit = np.log(ctr / (1 - ctr)) - math.log(mean / (1 - mean))
    age_hours = np.clip(np.asarray(age_seconds, dtype=np.float64) / 3600.0, 0.0, MAX_AGE_HOURS)
    age_hours = np.where(age_known, age_hours, MAX_AGE_HOURS)
    mask = history_mask.astype(np.float64)  # (B, N)
    n_hist = mask.sum(axis=1)  # (B,)
    denom = np.maximum(n_hist, 1.0)[:, None]
    same_cat = (candidate_category[:, :, None] == history_category[:, None, :]) & (candidate_category[:, :, None] > 0)
    same_sub = (candidate_subcategory[:, :, None] == history_subcategory[:, None, :]) & (candidate_subcategory[:, :, None] > 0)
    category_share = (same_cat * mask[:, None, :]).sum(axis=2) / denom  # (B, C)
    subcategory_share = (same_sub * mask[:, None, :]).sum(axis=2) / denom
    log_hist = np.broadcast_to(np.log1p(n_hist)[:, None], category_share.shape)
    exposure = np.asarray(exposure, dtype=np.float64)
    impressions = np.asarray(impressions, dtype=np.float64)
    unlabelled = np.maximum(exposure - impressions, 0.0)  # shown since the labels end
    exposure_rate = exposure / np.maximum(age_hours, 1.0)  # showings per hour in the pool
    columns = [retrieval_scores, popularity_logit, np.log1p(impressions), np.log1p(exposure),
               np.log1p(unlabelled), np.log1p(exposure_rate), np.log1p(age_hours),
               (~np.asarray(age_known, dtype=bool)).astype(np.float64), category_share,
               subcategory_share, log_hist]
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# padding of candidate lists (histories: newsrec.inference.histories)


def right_padded(rows: list[np.ndarray], dtype: Any, *, min_width: int = 0) -> np.ndarray:
    """``rows`` (1-d arrays) stacked left-aligned into [B, W], 0 after each row's end;
    W = the longest row (at least ``min_width``)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    mask = np.arange(max(int(lengths.max(initial=0)), min_width))[None, :] < lengths[:, None]
    out = np.zeros(mask.shape, dtype=dtype)
    if lengths.sum():
        out[mask] = np.concatenate(rows)
    return out


def padded_candidates(impressions: Impressions, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of each impression in ``rows``, right-padded with 0.

    Returns (candidate_idx int64 [B, C], mask bool [B, C], flat int64 [mask.sum()]): ``flat`` are the
    positions in ``impressions.candidates`` of the real entries, in row-major order of the mask.
    """
    starts = impressions.candidate_offsets[rows]
    lengths = impressions.candidate_offsets[rows + 1] - starts
    width = max(int(lengths.max()) if len(rows) else 0, 1)
    pos = np.arange(width)
    mask = pos[None, :] < lengths[:, None]
    flat = (starts[:, None] + pos[None, :])[mask]
    cand = np.zeros(mask.shape, dtype=np.int64)
    cand[mask] = impressions.candidates[flat]
    return cand, mask, flat
