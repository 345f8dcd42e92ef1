"""Fast evaluation: encode every news once, every distinct user history once, then dot products.

``score_impressions`` is what training (per-epoch dev metrics), ``newsrec evaluate``, ``newsrec
submit`` and ``newsrec score`` use. ``score_impressions_slow`` runs the full model per impression
(candidate titles and history titles encoded directly) and is the reference the fast path is
checked against (``newsrec evaluate --check-slow N``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.data.artifact import DatasetArtifact, Impressions
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.eval import metrics as M
from newsrec.utils.progress import progress

HISTORY_BUCKETS = ((0, 0), (1, 9), (10, 49), (50, 199), (200, None))  # inclusive bounds of clicks


def _quiet(show_progress: bool) -> bool | None:
    """tqdm's ``disable``: True hides the bar, None lets tqdm hide it when stderr is not a terminal."""
    return None if show_progress else True


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode + no autograd for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _news_inputs(dataset: DatasetArtifact, rows: np.ndarray, device: torch.device
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Title tokens [B, T], category [B], subcategory [B] (int64) of news_idx ``rows``."""
    category, subcategory = dataset.news_categories
    tokens = torch.from_numpy(np.ascontiguousarray(dataset.title_tokens[rows]).astype(np.int64))
    return (tokens.to(device), torch.from_numpy(category[rows]).to(device),
            torch.from_numpy(subcategory[rows]).to(device))


def encode_all_news(model: nn.Module, dataset: DatasetArtifact, *, batch_size: int = 1024,
                    device: str | torch.device = "cpu", show_progress: bool = True) -> Tensor:
    """News vectors float32 [n_news + 1, D] on ``device``; row 0 (the padding news) is zeros."""
    device = torch.device(device)
    n_news = dataset.n_news
    out = torch.zeros(n_news + 1, model.news_dim, dtype=torch.float32, device=device)
    starts = range(1, n_news + 1, batch_size)
    with _inference(model):
        for start in progress(starts, desc="encode news", unit="batch", disable=_quiet(show_progress)):
            rows = np.arange(start, min(start + batch_size, n_news + 1))
            tokens, category, subcategory = _news_inputs(dataset, rows, device)
            out[start:start + len(rows)] = model.encode_news(tokens, category, subcategory).float()
    return out


@dataclass
class DistinctHistories:
    """Each impression's history truncated to the most recent ``history_len`` clicks, deduplicated.

    ``values``/``offsets``: CSR of the distinct histories (news_idx, oldest first);
    ``of_impression``: int64 [n_impressions], which distinct history each impression uses.
    """

    values: np.ndarray
    offsets: np.ndarray
    of_impression: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


def truncated_history_bounds(impressions: Impressions, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) int64 [n]: each impression's most recent ``history_len`` clicks."""
    end = impressions.history_offsets[1:]
    start = np.maximum(impressions.history_offsets[:-1], end - history_len)
    return start, end


def distinct_histories(impressions: Impressions, *, history_len: int) -> DistinctHistories:
    """Deduplicate the impressions' (truncated) histories: a user with many impressions and the
    same history is encoded once."""
    start, end = truncated_history_bounds(impressions, history_len)
    history = impressions.history
    index_of: dict[bytes, int] = {}
    of_impression = np.empty(len(impressions), dtype=np.int64)
    first_row: list[int] = []
    for i, (s, e) in enumerate(zip(start.tolist(), end.tolist())):
        key = history[s:e].tobytes()
        j = index_of.get(key)
        if j is None:
            j = index_of[key] = len(first_row)
            first_row.append(i)
        of_impression[i] = j
    rows = np.asarray(first_row, dtype=np.int64)
    lengths = end[rows] - start[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.repeat(start[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return DistinctHistories(values=history[gather], offsets=offsets, of_impression=of_impression)


def encode_histories(model: nn.Module, news_vectors: Tensor, values: np.ndarray, offsets: np.ndarray, *,
                     batch_size: int = 1024, show_progress: bool = True) -> Tensor:
    """User vectors float32 [n, D] for the histories in CSR (``values`` news_idx, ``offsets`` [n + 1]).

    Histories are grouped by length so that each batch pads little; clicks are right-padded
    (mask True = click), as the model's ``encode_user`` expects.
    """
    device = news_vectors.device
    lengths = np.diff(offsets)
    n = len(lengths)
    users = torch.zeros(n, news_vectors.shape[1], dtype=torch.float32, device=device)
    order = np.argsort(lengths, kind="stable")
    with _inference(model):
        for b in progress(range(0, n, batch_size), desc="encode users", unit="batch",
                          disable=_quiet(show_progress)):
            rows = order[b:b + batch_size]
            row_lengths = lengths[rows]
            width = max(int(row_lengths.max()), 1)
            # (B, N) news_idx, right-padded with 0 (the zero padding news)
            positions = np.arange(width)
            mask = positions[None, :] < row_lengths[:, None]
            idx = np.zeros(mask.shape, dtype=np.int64)
            idx[mask] = values[(offsets[rows][:, None] + positions[None, :])[mask]]
            idx_t = torch.from_numpy(idx).to(device)
            mask_t = torch.from_numpy(mask).to(device)
            users[torch.from_numpy(rows).to(device)] = model.encode_user(news_vectors[idx_t], mask_t).float()
    return users


def score_candidates(model: nn.Module, user_vectors: Tensor, news_vectors: Tensor, user_of_candidate: np.ndarray,
                     candidates: np.ndarray, *, chunk: int = 262_144) -> np.ndarray:
    """float32 [M]: ``model.score`` of each (user, candidate) pair, in chunks of ``chunk`` pairs."""
    out = np.empty(len(candidates), dtype=np.float32)
    device = news_vectors.device
    with _inference(model):
        for s in range(0, len(candidates), chunk):
            users = user_vectors[torch.from_numpy(user_of_candidate[s:s + chunk]).to(device)]  # (m, D)
            news = news_vectors[torch.from_numpy(candidates[s:s + chunk].astype(np.int64)).to(device)]
            out[s:s + len(users)] = model.score(users, news.unsqueeze(1)).squeeze(1).float().cpu().numpy()
    return out


def score_impressions(model: nn.Module, dataset: DatasetArtifact, impressions: Impressions, *,
                      history_len: int, batch_size: int = 1024, device: str | torch.device = "cpu",
                      news_vectors: Tensor | None = None, show_progress: bool = True) -> np.ndarray:
    """Click scores float32 [M] aligned with ``impressions.candidates``.

    Each news is encoded once (or ``news_vectors`` [n_news + 1, D] are reused), each distinct
    truncated history once, then one ``model.score`` per candidate. Equal to scoring every
    impression with the full model (``score_impressions_slow``) up to float rounding.
    """
    device = torch.device(device)
    if news_vectors is None:
        news_vectors = encode_all_news(model, dataset, batch_size=batch_size, device=device,
                                       show_progress=show_progress)
    news_vectors = news_vectors.to(device)
    histories = distinct_histories(impressions, history_len=history_len)
    user_vectors = encode_histories(model, news_vectors, histories.values, histories.offsets,
                                    batch_size=batch_size, show_progress=show_progress)
    user_of_candidate = np.repeat(histories.of_impression, impressions.candidate_counts)
    return score_candidates(model, user_vectors, news_vectors, user_of_candidate, impressions.candidates)


def score_impressions_slow(model: nn.Module, dataset: DatasetArtifact, impressions: Impressions,
                           rows: np.ndarray, *, history_len: int, device: str | torch.device = "cpu"
                           ) -> np.ndarray:
    """The full model, one impression at a time: encode its candidates' titles and its history's
    titles directly, then the user, then the scores. float32 scores of ``rows``' candidates,
    concatenated in ``rows`` order."""
    device = torch.device(device)
    out: list[np.ndarray] = []
    with _inference(model):
        for i in np.asarray(rows, dtype=np.int64):
            candidates = impressions.candidates_of(int(i)).astype(np.int64)
            history = impressions.history_of(int(i), history_len).astype(np.int64)
            candidate_vectors = model.encode_news(*_news_inputs(dataset, candidates, device))  # (C, D)
            if len(history):
                history_vectors = model.encode_news(*_news_inputs(dataset, history, device))  # (N, D)
            else:
                history_vectors = torch.zeros(1, model.news_dim, device=device)
            mask = torch.tensor([[len(history) > 0] * len(history_vectors)], device=device)
            user = model.encode_user(history_vectors.unsqueeze(0), mask)  # (1, D)
            out.append(model.score(user, candidate_vectors.unsqueeze(0))[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
