"""News popularity: click-through shrunk toward the mean, and counts that do not leak labels.

Popularity of news n with ``clicks`` clicks over ``impressions`` showings::

    ctr_shrunk = (clicks + prior * mean_ctr) / (impressions + prior)

so a news shown rarely (or never: the cold case) sits near ``mean_ctr`` and a news shown far more
than ``prior`` times sits near its own click-through.

Where the counts come from matters:

- Scoring dev/test impressions or serving: counts over *all* train impressions (``news.parquet``'s
  ``train_clicks`` / ``train_impressions``, see :func:`news_counts_from_artifact`). Dev and test come
  after train in time, so these counts are the past.
- Training on train impressions: counting the same impressions' labels would leak the label (a news
  clicked once and shown once would get a popularity of "1 of 1" exactly where it is clicked). We use
  counts from train impressions **strictly before** each impression's time
  (:class:`PrefixCounts`). This is also what the model meets at dev time — counts from the past only,
  with news appearing for the first time getting the prior mean — so the re-ranker learns how much
  to trust a count of a given size, including zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from newsrec.data.artifact import DatasetArtifact, Impressions
from newsrec.errors import ConfigError


def shrunk_ctr(clicks: np.ndarray, impressions: np.ndarray, *, prior: float,
               mean_ctr: float) -> np.ndarray:
    """Click-through shrunk toward ``mean_ctr`` by ``prior`` pseudo-impressions.

    clicks, impressions: same shape, non-negative counts. Returns float64 of that shape.
    With ``prior == 0`` a news never shown falls back to ``mean_ctr`` (no division by zero).
    """
    if prior < 0:
        raise ConfigError(f"rerank.popularity_prior={prior} must be >= 0")
    clicks = np.asarray(clicks, dtype=np.float64)
    impressions = np.asarray(impressions, dtype=np.float64)
    denom = impressions + prior
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (clicks + prior * mean_ctr) / denom
    return np.where(denom > 0, out, mean_ctr)


@dataclass(frozen=True)
class NewsCounts:
    """Train click counts per news: index = news_idx (row 0 = padding news, counts 0).

    clicks, impressions: int64 [n_news + 1]; mean_ctr = total clicks / total impressions.
    """

    clicks: np.ndarray
    impressions: np.ndarray
    mean_ctr: float

    def ctr(self, news_idx: np.ndarray, *, prior: float) -> np.ndarray:
        """Shrunk click-through of ``news_idx`` (any shape), float64 of that shape."""
        return shrunk_ctr(self.clicks[news_idx], self.impressions[news_idx], prior=prior,
                          mean_ctr=self.mean_ctr)


def mean_ctr_of(clicks_total: float, impressions_total: float) -> float:
    """Global click-through; 0.5 stands in only when there are no impressions at all."""
    return float(clicks_total) / float(impressions_total) if impressions_total > 0 else 0.5


def news_counts_from_artifact(dataset: DatasetArtifact) -> NewsCounts:
    """Counts over all train impressions, as written by ingest into news.parquet."""
    news = dataset.news
    idx = news["news_idx"].to_numpy()
    clicks = np.zeros(dataset.n_news + 1, dtype=np.int64)
    shown = np.zeros(dataset.n_news + 1, dtype=np.int64)
    clicks[idx] = news["train_clicks"].fill_null(0).to_numpy()
    shown[idx] = news["train_impressions"].fill_null(0).to_numpy()
    return NewsCounts(clicks=clicks, impressions=shown, mean_ctr=mean_ctr_of(clicks.sum(), shown.sum()))


def news_counts_from_impressions(impressions: Impressions, *, n_news: int) -> NewsCounts:
    """Counts over every candidate of labelled ``impressions`` (int64 [n_news + 1] each)."""
    if impressions.labels is None:
        raise ConfigError(f"split '{impressions.split}' has no labels: popularity needs clicks")
    shown = np.bincount(impressions.candidates, minlength=n_news + 1).astype(np.int64)
    clicks = np.bincount(impressions.candidates, weights=impressions.labels.astype(np.float64),
                         minlength=n_news + 1).astype(np.int64)
    return NewsCounts(clicks=clicks, impressions=shown, mean_ctr=mean_ctr_of(clicks.sum(), shown.sum()))


def first_seen_seconds(dataset: DatasetArtifact) -> tuple[np.ndarray, np.ndarray]:
    """news.parquet ``first_seen`` as (seconds since the epoch float64 [n_news + 1], known bool
    [n_news + 1]). Unknown (never shown as a candidate, or the padding news) -> 0 and False."""
    news = dataset.news
    idx = news["news_idx"].to_numpy()
    seen = news["first_seen"].to_numpy()  # datetime64[us], NaT where null
    seconds = np.zeros(dataset.n_news + 1, dtype=np.float64)
    known = np.zeros(dataset.n_news + 1, dtype=bool)
    ok = ~np.isnat(seen)
    seconds[idx[ok]] = datetime64_to_seconds(seen[ok])
    known[idx[ok]] = True
    return seconds, known


def datetime64_to_seconds(times: np.ndarray) -> np.ndarray:
    """datetime64 array (any unit) -> float64 seconds since the epoch."""
    return times.astype("datetime64[us]").astype(np.int64).astype(np.float64) / 1e6


class PrefixCounts:
    """Clicks and showings of each news in impressions **strictly before** a given time.

    Built once from labelled impressions; :meth:`at` answers any (news_idx, time) pairs, so the
    same table serves an impression's own candidates and negatives retrieved for it. Events at the
    same second as the query are excluded (a tie is not "before"). With ``clicks=False`` the
    impressions need no labels and only showings are counted (clicks are all 0): the *exposure* of
    a news so far, which the log itself tells without any label.
    """

    def __init__(self, impressions: Impressions, *, clicks: bool = True) -> None:
        if clicks and impressions.labels is None:
            raise ConfigError(f"split '{impressions.split}' has no labels: popularity needs clicks")
        counts = impressions.candidate_counts
        event_news = impressions.candidates.astype(np.int64)
        event_sec = np.repeat(whole_seconds(impressions.time), counts)
        event_click = (impressions.labels.astype(np.int64) if clicks
                       else np.zeros(len(event_news), dtype=np.int64))
        self._t0 = int(event_sec.min()) if len(event_sec) else 0
        self._span = (int(event_sec.max()) - self._t0 + 2) if len(event_sec) else 2
        keys = event_news * self._span + (event_sec - self._t0)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._cum_clicks = np.concatenate([[0], np.cumsum(event_click[order])])
        self.n_events = len(keys)
        self.mean_ctr = mean_ctr_of(event_click.sum(), len(event_click))

    def at(self, news_idx: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, impressions) int64 of each news in ``news_idx`` before ``seconds`` (same shape;
        seconds since the epoch, whole seconds)."""
        news_idx = np.asarray(news_idx, dtype=np.int64)
        sec = np.clip(np.asarray(seconds, dtype=np.int64) - self._t0, 0, self._span - 1)
        sec = np.broadcast_to(sec, news_idx.shape)
        # searched in sorted order: binary searches of sorted queries hit the cache (5.5M queries
        # over 5.5M events: 3 s instead of 38 s, sort included)
        query = (news_idx * self._span + sec).ravel()
        order = np.argsort(query, kind="stable")
        sorted_query = query[order]
        group_start = np.searchsorted(self._keys, sorted_query - sorted_query % self._span, side="left")
        before = np.searchsorted(self._keys, sorted_query, side="left")
        shown = np.empty(len(query), dtype=np.int64)
        clicks = np.empty(len(query), dtype=np.int64)
        shown[order] = before - group_start
        clicks[order] = self._cum_clicks[before] - self._cum_clicks[group_start]
        return clicks.reshape(news_idx.shape), shown.reshape(news_idx.shape)

    def for_candidates(self, impressions: Impressions) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, impressions) aligned with ``impressions.candidates``, each counted over events
        strictly before that impression's time."""
        sec = np.repeat(whole_seconds(impressions.time), impressions.candidate_counts)
        return self.at(impressions.candidates, sec)


def whole_seconds(times: np.ndarray) -> np.ndarray:
    """datetime64 [n] -> int64 whole seconds since the epoch (floored)."""
    return times.astype("datetime64[s]").astype(np.int64)


def unseen_in_train(dataset: DatasetArtifact) -> np.ndarray:
    """Cold news: bool [n_news + 1], True where a news was neither shown in a train impression nor
    clicked in a train history (row 0, the padding news, is False)."""
    news = dataset.news
    idx = news["news_idx"].to_numpy()
    cold = np.zeros(dataset.n_news + 1, dtype=bool)
    cold[idx] = ((news["train_impressions"].fill_null(0).to_numpy() == 0)
                 & (news["train_history_clicks"].fill_null(0).to_numpy() == 0))
    return cold
