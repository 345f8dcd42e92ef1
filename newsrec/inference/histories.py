"""Click histories as the encoders read them: the one place a history is cut and padded.

A history is one user's clicks, oldest first (news_idx, or a service's keys). Every entry point —
evaluation, submission, batch scoring, the service, the MLflow model, the re-ranker — reads the
most recent ``history_len`` clicks of it, exactly as clicked: a news clicked twice stays twice, an
empty history is valid (the encoder's empty-history vector). Batches are right-padded with
news_idx 0 (mask False), so row 0 of any news-vector table is the padding news.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from newsrec.data.artifact import Impressions


def recent_bounds(offsets: np.ndarray, rows: np.ndarray, history_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) int64 [B] into a CSR's values: the most recent ``history_len`` clicks of each
    of ``rows`` (None = every click). The truncation rule of every path."""
    rows = np.asarray(rows, dtype=np.int64)
    end = np.asarray(offsets, dtype=np.int64)[rows + 1]
    start = np.asarray(offsets, dtype=np.int64)[rows]
    if history_len is not None:
        if history_len < 1:
            raise ValueError(f"history_len={history_len}: must be >= 1 (or None for every click)")
        start = np.maximum(start, end - history_len)
    return start, end


def recent_clicks(history: np.ndarray, history_len: int | None) -> np.ndarray:
    """The most recent ``history_len`` clicks of one history (int [N], oldest first)."""
    history = np.asarray(history)
    start, end = recent_bounds(np.array([0, len(history)]), np.array([0]), history_len)
    return history[int(start[0]):int(end[0])]


@dataclass(frozen=True)
class Histories:
    """Histories in CSR: ``values`` int [total] (oldest first within each), ``offsets`` int64 [n + 1]."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of_impressions(cls, impressions: "Impressions") -> "Histories":
        """The full histories of a split's impressions (no copy)."""
        return cls(impressions.history, impressions.history_offsets)

    @classmethod
    def of_lists(cls, rows: Sequence[np.ndarray]) -> "Histories":
        """One history per entry of ``rows`` (each int [N_i], oldest first)."""
        arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def recent(self, history_len: int | None, rows: np.ndarray | None = None) -> "Histories":
        """The most recent ``history_len`` clicks of each of ``rows`` (default: every row), as CSR."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        start, end = recent_bounds(self.offsets, rows, history_len)
        lengths = end - start
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Histories(self.values[gather], offsets)

    def distinct(self, history_len: int | None = None) -> tuple["Histories", np.ndarray]:
        """The distinct histories after cutting each to its most recent ``history_len`` clicks
        (first occurrence order) and, int64 [n], which one each row is: a user with many
        impressions and the same history is encoded once. Only the distinct ones are copied."""
        start, end = recent_bounds(self.offsets, np.arange(len(self)), history_len)
        index_of: dict[bytes, int] = {}
        of_row = np.empty(len(self), dtype=np.int64)
        first_row: list[int] = []
        values = np.ascontiguousarray(self.values)
        for i, (s, e) in enumerate(zip(start.tolist(), end.tolist())):
            key = values[s:e].tobytes()
            j = index_of.get(key)
            if j is None:
                j = index_of[key] = len(first_row)
                first_row.append(i)
            of_row[i] = j
        return self.recent(history_len, np.asarray(first_row, dtype=np.int64)), of_row

    def padded(self, rows: np.ndarray | None = None, *, history_len: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The most recent ``history_len`` clicks of each of ``rows`` (default: every row),
        right-padded with 0: (history_idx int64 [B, N], mask bool [B, N], True = click), N = the
        longest kept history (at least 1, so a batch of empty histories still has a column)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        start, end = recent_bounds(self.offsets, rows, history_len)
        lengths = end - start
        width = max(int(lengths.max(initial=0)), 1)
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        idx = np.zeros(mask.shape, dtype=np.int64)
        idx[mask] = self.values[(start[:, None] + positions[None, :])[mask]]
        return idx, mask


def padded_histories(impressions: "Impressions", rows: np.ndarray, *, history_len: int | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``Histories.padded`` of impressions ``rows``: (history_idx int64 [B, N], mask bool [B, N])."""
    return Histories.of_impressions(impressions).padded(rows, history_len=history_len)
