"""A cache of news vectors for the history side of training (``train.news_cache_refresh_steps``).

A training step's history holds far more distinct news than its candidates (at history 50, batch 32
about 800 against 160; at history 1,000 about 10,000), and encoding them forward and backward is
most of the step. As in SpeedyRec (arXiv 2102.09268), history news read their vectors from a cache
instead, and only candidate news are encoded with gradients:

- a cached vector is *detached*: no gradient reaches the news encoder through the history side;
- refresh is deterministic, by age: the vector of news ``n`` computed at step ``s`` serves steps
  ``s .. s + k - 1`` (``k = refresh_steps``); at step ``s + k`` (or when it was never computed) a
  step that reads ``n`` re-encodes it first. So a vector is at most ``k - 1`` optimizer updates
  behind the weights it is used with, and ``k = 1`` means fresh encodings every step. (SpeedyRec
  also refreshes at random before that bound; an exact bound keeps runs reproducible.)
- a refresh encodes with the news encoder in eval mode (no dropout) and without gradient: the vector
  reused for up to k steps is the model's own deterministic vector of that news, the one evaluation
  and serving feed the user encoder, rather than one dropout draw frozen for k steps. Candidates are
  encoded in train mode with gradients, exactly as without the cache, and are not written to it.

Only history news due for a refresh are gathered and encoded; everything else is one index into
``vectors``. Under torchrun every rank writes the rows refreshed by every rank (an all-gather), so
all ranks hold the same cache, the same one a single process would hold on the whole global batch.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

NEVER = -(2 ** 62)  # step stamp of a row never computed


class NewsVectorCache:
    """News vectors by news_idx (row 0 = padding news, always zero) and the step each was computed at."""

    def __init__(self, n_rows: int, dim: int, *, refresh_steps: int, device: torch.device | str = "cpu") -> None:
        if refresh_steps < 1:
            raise ValueError(f"refresh_steps={refresh_steps} must be >= 1 for a cache")
        self.refresh_steps = int(refresh_steps)
        self.vectors = torch.zeros(n_rows, dim, dtype=torch.float32, device=device)
        self.computed_at = torch.full((n_rows,), NEVER, dtype=torch.int64, device=device)
        self.refreshed = 0  # rows re-encoded by this process since the counters were reset
        self.read = 0  # distinct history news read since the counters were reset

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def is_due(self, news: Tensor, step: int) -> Tensor:
        """bool ``[n]``: which of ``news`` (int64 news_idx > 0) must be computed before ``step``
        reads it: never computed, or computed ``refresh_steps`` or more steps before."""
        return (step - self.computed_at[news.to(self.device)]) >= self.refresh_steps

    def due(self, news: Tensor, step: int) -> Tensor:
        """The news of ``news`` that are due at ``step`` (``is_due``)."""
        news = news.to(self.device)
        return news[self.is_due(news, step)]

    def write(self, news: Tensor, vectors: Tensor, step: int) -> None:
        """Store detached ``vectors [n, D]`` of ``news [n]`` as computed at ``step``."""
        if len(news) == 0:
            return
        if bool((news <= 0).any()):
            raise ValueError("the padding news (index 0) is never cached")
        news = news.to(self.device)
        self.vectors[news] = vectors.detach().to(self.vectors.dtype)
        self.computed_at[news] = step

    def refresh(self, news: Tensor, step: int, encode: Callable[[Tensor], Tensor],
                exchange: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Make every vector of ``news`` (distinct news_idx > 0) usable at ``step``: the due ones are
        encoded by ``encode(due news) → [n, D]`` and written; ``exchange`` (torchrun) turns this
        process's (news, vectors) into every process's before they are written. Returns the news
        this process encoded."""
        due = self.due(news, step)
        vectors = encode(due) if len(due) else self.vectors.new_zeros(0, self.vectors.shape[1])
        self.commit(news, due, vectors, step, exchange)
        return due

    def commit(self, news: Tensor, due: Tensor, vectors: Tensor, step: int,
               exchange: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None) -> None:
        """Write the ``vectors [n, D]`` this process computed at ``step`` for its ``due`` news (of the
        history ``news`` it read), after ``exchange`` (torchrun) turned them into every process's."""
        vectors = vectors.detach().to(self.vectors.dtype)
        self.refreshed += len(due)
        self.read += len(news)
        if exchange is not None:
            all_news, all_vectors = exchange(due, vectors)
            # two ranks may both have refreshed a news (with gradients, two dropout draws): every
            # rank keeps the lowest rank's, so all ranks hold the same row
            first = np.unique(all_news.cpu().numpy(), return_index=True)[1]
            if len(first) < len(all_news):
                keep = torch.from_numpy(first).to(all_news.device)
                all_news, all_vectors = all_news[keep], all_vectors[keep]
        else:
            all_news, all_vectors = due, vectors
        self.write(all_news, all_vectors, step)

    def lookup(self, news: Tensor) -> Tensor:
        """Cached vectors of ``news`` (any shape of news_idx; 0 = padding → zero vector) → ``[..., D]``."""
        return self.vectors[news.to(self.device)]

    def reset_counters(self) -> tuple[int, int]:
        """(rows refreshed, history news read) since the last reset; then zero both."""
        counts = (self.refreshed, self.read)
        self.refreshed = self.read = 0
        return counts

    # --- checkpoint ---------------------------------------------------------------------------

    def state_dict(self, next_step: int) -> dict[str, Any]:
        """The rows a run continuing at ``next_step`` may still read (computed within the last
        ``refresh_steps - 1`` steps); older rows would be re-encoded anyway and are left out."""
        live = torch.nonzero(self.computed_at > next_step - self.refresh_steps).squeeze(1)
        return {"refresh_steps": self.refresh_steps, "n_rows": int(self.vectors.shape[0]),
                "dim": int(self.vectors.shape[1]), "news": live.cpu(),
                "computed_at": self.computed_at[live].cpu(), "vectors": self.vectors[live].cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (int(state["n_rows"]), int(state["dim"]))
        if shape != tuple(self.vectors.shape) or int(state["refresh_steps"]) != self.refresh_steps:
            raise ValueError(f"checkpoint news cache {shape} refresh {state['refresh_steps']} does not fit "
                             f"{tuple(self.vectors.shape)} refresh {self.refresh_steps}")
        self.vectors.zero_()
        self.computed_at.fill_(NEVER)
        news = state["news"].to(self.device)
        self.vectors[news] = state["vectors"].to(self.device, self.vectors.dtype)
        self.computed_at[news] = state["computed_at"].to(self.device)


def pad_to_bucket(news: np.ndarray, bucket_size: int | None) -> np.ndarray:
    """``news`` padded to a multiple of ``bucket_size`` by repeating its first entry (stable shapes
    for bf16 kernels); callers keep the first ``len(news)`` results."""
    if not bucket_size or len(news) % bucket_size == 0 or len(news) == 0:
        return news
    return np.concatenate([news, np.repeat(news[:1], bucket_size - len(news) % bucket_size)])
