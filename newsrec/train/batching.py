"""Training batches for the NRMS objective, built off the main thread.

A *sample* is one click of a labelled impression. Each epoch, every sample is paired with
``npratio`` non-clicked candidates of the same impression, drawn afresh (fewer when the impression
has fewer; the rest is the padding news 0, masked out of the loss). The clicked news is always
column 0 of a sample's candidates, so the softmax cross-entropy target is 0.

Everything random is derived from ``(seed, epoch)`` (the order of samples) and
``(seed, epoch, batch_index)`` (the non-clicks of that batch), never from global state, so a run
resumed at any batch sees exactly the batches an uninterrupted run would have seen, and every rank
of a distributed run agrees on the global batch before taking its shard of it.

Each batch lists its *unique* news once (``unique_news``); the model encodes only those and the
history/candidate slots index into the encoded table (row 0 of the table is the zero vector of the
padding news). Histories overlap heavily, so this is most of the speed of a training step.

With ``split_history=True`` (the news-vector cache, ``train.news_cache_refresh_steps``) the history
side is left out of that list: ``unique_news``/``news`` hold the candidates only, and the history's
distinct news are listed apart (``history_news``, inputs not gathered) for the training step to
read from its cache, encoding only those due for a refresh.
"""
from __future__ import annotations

import collections
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from newsrec.data.artifact import Impressions
from newsrec.data.features import NewsFeatures
from newsrec.errors import ConfigError, DataError
from newsrec.models.inputs import NewsInputs

T = TypeVar("T")


@dataclass
class Batch:
    """One shard of one global training batch (B = this rank's samples, C = 1 + npratio,
    H = history_len, U = unique news encoded this step, T = title_len).

    ``history_slots``/``candidate_slots`` index the table ``[zero row; encode_news(unique news)]``:
    slot 0 is the padding news, slot u + 1 is ``unique_news[u]``.
    """

    history: torch.Tensor  # int64 [B, H] news_idx, oldest→newest, right-padded with 0
    history_mask: torch.Tensor  # bool [B, H] True = real click
    candidates: torch.Tensor  # int64 [B, C] news_idx; column 0 is the clicked news
    candidate_mask: torch.Tensor  # bool [B, C] False = padding (too few non-clicks)
    unique_news: torch.Tensor  # int64 [U] distinct news_idx > 0 (bucket-padded with repeats)
    n_unique: int  # distinct news before bucket padding
    history_slots: torch.Tensor  # int64 [B, H] rows of the encoded table
    candidate_slots: torch.Tensor  # int64 [B, C]
    news: NewsInputs  # what the news encoder reads about unique_news ([U, ...] each)
    global_batch_size: int  # samples in the whole global batch (all ranks)
    batch_index: int  # position of this batch in its epoch
    # split history (news-vector cache): unique_news/news/candidate_slots cover the candidates only;
    # history_news int64 [Uh] lists the distinct history news > 0 and history_slots index
    # [zero; history_news] (slot 0 = padding news)
    history_news: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.candidates.shape[0])

    @property
    def title_tokens(self) -> torch.Tensor | None:
        """int64 [U, T] titles of unique_news (a words model's input)."""
        return self.news.title_tokens

    @property
    def category(self) -> torch.Tensor:
        return self.news.category

    @property
    def subcategory(self) -> torch.Tensor:
        return self.news.subcategory


@dataclass(frozen=True)
class TrainSamples:
    """Every click of a labelled split, with the non-clicks of its impression (CSR).

    sample s is click ``click_news[s]`` of impression ``impression_row[s]``; its impression's
    non-clicked news are ``negatives[negative_offsets[r]:negative_offsets[r + 1]]`` with
    ``r = impression_row[s]``.
    """

    impression_row: np.ndarray  # int64 [S]
    click_news: np.ndarray  # int64 [S]
    negatives: np.ndarray  # int64 [total non-clicks]
    negative_offsets: np.ndarray  # int64 [n_impressions + 1]

    def __len__(self) -> int:
        return len(self.impression_row)


def build_samples(impressions: Impressions) -> TrainSamples:
    """All (impression, click) pairs of a labelled split, in file order."""
    if impressions.labels is None:
        raise DataError(impressions.split, "split has no labels; training needs a labelled split")
    labels = impressions.labels.astype(bool)
    counts = impressions.candidate_counts
    row_of_candidate = np.repeat(np.arange(len(impressions), dtype=np.int64), counts)
    click_pos = np.flatnonzero(labels)
    if len(click_pos) == 0:
        raise DataError(impressions.split, "no clicked candidate in any impression; nothing to learn")
    neg_pos = np.flatnonzero(~labels)
    neg_counts = np.bincount(row_of_candidate[neg_pos], minlength=len(impressions))
    negative_offsets = np.zeros(len(impressions) + 1, dtype=np.int64)
    np.cumsum(neg_counts, out=negative_offsets[1:])
    return TrainSamples(
        impression_row=row_of_candidate[click_pos],
        click_news=impressions.candidates[click_pos].astype(np.int64),
        negatives=impressions.candidates[neg_pos].astype(np.int64),
        negative_offsets=negative_offsets,
    )


def epoch_order(n_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order of samples in ``epoch``: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5A17]).permutation(n_samples)


def batches_per_epoch(n_samples: int, *, batch_size: int, world_size: int = 1) -> int:
    """Global batches in an epoch. A last batch smaller than the world size is dropped (every rank
    needs at least one sample); on one process nothing is dropped."""
    full, rest = divmod(n_samples, batch_size)
    return full + (1 if rest >= world_size else 0)


def shard_bounds(n: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, end) share of ``n`` items for ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sample_negatives(samples: TrainSamples, sample_ids: np.ndarray, *, npratio: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``npratio`` distinct non-clicks of each sample's own impression.

    Returns (negatives int64 [n, npratio], mask bool [n, npratio]); where an impression has fewer
    non-clicks than ``npratio`` all of them are taken and the rest is padding news 0, mask False.
    """
    n = len(sample_ids)
    out = np.zeros((n, npratio), dtype=np.int64)
    mask = np.zeros((n, npratio), dtype=bool)
    rows = samples.impression_row[sample_ids]
    starts = samples.negative_offsets[rows]
    counts = samples.negative_offsets[rows + 1] - starts
    for i in range(n):
        count = int(counts[i])
        if count == 0:
            continue
        if count > npratio:
            picked = rng.choice(count, size=npratio, replace=False)
        else:
            picked = rng.permutation(count)
        out[i, :len(picked)] = samples.negatives[starts[i] + picked]
        mask[i, :len(picked)] = True
    return out, mask


def recent_histories(impressions: Impressions, rows: np.ndarray, *, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The most recent ``history_len`` clicks of each impression row, oldest→newest, right-padded.

    Returns (history int64 [n, history_len], mask bool [n, history_len]).
    """
    offsets = impressions.history_offsets
    ends = offsets[rows + 1]
    lengths = np.minimum(ends - offsets[rows], history_len)
    starts = ends - lengths
    cols = np.arange(history_len)
    mask = cols[None, :] < lengths[:, None]
    positions = np.where(mask, starts[:, None] + cols[None, :], 0)
    history = np.where(mask, impressions.history[positions] if len(impressions.history) else 0, 0)
    return history.astype(np.int64), mask


def deduplicate(history: np.ndarray, candidates: np.ndarray, *, bucket_size: int | None = None
                ) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """Distinct real news of a batch and, for each slot, its row in ``[zero; encoded uniques]``.

    history int [B, H], candidates int [B, C] (0 = padding news). Returns
    (unique_news int64 [U], n_unique, history_slots int64 [B, H], candidate_slots int64 [B, C]).
    With ``bucket_size`` the unique list is padded to a multiple of it by repeating its first entry
    (stable shapes for bf16 kernels); the repeats are never indexed.
    """
    both = np.concatenate([history.ravel(), candidates.ravel()])
    values, inverse = np.unique(both, return_inverse=True)
    has_pad = len(values) > 0 and values[0] == 0
    unique = values[1:] if has_pad else values
    slots = inverse + (0 if has_pad else 1)  # padding news → slot 0; unique[u] → slot u + 1
    n_unique = len(unique)
    if bucket_size and n_unique % bucket_size:
        filler = unique[:1] if n_unique else np.zeros(1, dtype=values.dtype)
        unique = np.concatenate([unique, np.repeat(filler, bucket_size - n_unique % bucket_size)])
    split = history.size
    return (unique.astype(np.int64), n_unique, slots[:split].reshape(history.shape).astype(np.int64),
            slots[split:].reshape(candidates.shape).astype(np.int64))


class BatchBuilder:
    """Builds the batches of an epoch for one rank (see module docstring for the contract)."""

    def __init__(self, impressions: Impressions, *, batch_size: int, npratio: int, history_len: int, seed: int,
                 features: NewsFeatures | None = None, title_tokens: np.ndarray | None = None,
                 category: np.ndarray | None = None, subcategory: np.ndarray | None = None,
                 bucket_size: int | None = None, rank: int = 0, world_size: int = 1,
                 split_history: bool = False) -> None:
        """``features``: the news inputs by news_idx (``newsrec.data.features``); or, for a words
        model, the ``title_tokens``/``category``/``subcategory`` arrays it is made of.
        ``split_history``: list the history's news apart from the candidates' (module docstring)."""
        if batch_size < world_size:
            raise ConfigError(f"train.batch_size={batch_size} is smaller than the {world_size} "
                              f"processes; raise train.batch_size (it is the global batch)")
        if features is None:
            if title_tokens is None or category is None or subcategory is None:
                raise ConfigError("BatchBuilder needs features, or title_tokens, category and subcategory")
            features = NewsFeatures(category=category, subcategory=subcategory, title_tokens=title_tokens)
        self.impressions = impressions
        self.samples = build_samples(impressions)
        self.features = features
        self.batch_size = batch_size
        self.npratio = npratio
        self.history_len = history_len
        self.seed = seed
        self.bucket_size = bucket_size
        self.rank = rank
        self.world_size = world_size
        self.split_history = split_history

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.n_samples, batch_size=self.batch_size, world_size=self.world_size)

    def global_batch_ids(self, epoch: int, batch_index: int, order: np.ndarray | None = None) -> np.ndarray:
        """Sample ids of global batch ``batch_index`` of ``epoch`` (before sharding)."""
        if order is None:
            order = epoch_order(self.n_samples, seed=self.seed, epoch=epoch)
        return order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]

    def build(self, epoch: int, batch_index: int, order: np.ndarray | None = None) -> Batch:
        ids = self.global_batch_ids(epoch, batch_index, order)
        rng = np.random.default_rng([self.seed, epoch, batch_index])
        negatives, negative_mask = sample_negatives(self.samples, ids, npratio=self.npratio, rng=rng)
        start, end = shard_bounds(len(ids), rank=self.rank, world_size=self.world_size)
        local = ids[start:end]
        candidates = np.concatenate([self.samples.click_news[local][:, None], negatives[start:end]], axis=1)
        candidate_mask = np.concatenate([np.ones((len(local), 1), dtype=bool), negative_mask[start:end]],
                                        axis=1)
        history, history_mask = recent_histories(self.impressions, self.samples.impression_row[local],
                                                 history_len=self.history_len)
        history_news = None
        if self.split_history:
            unique, n_unique, _, candidate_slots = deduplicate(
                np.zeros((0, 0), dtype=np.int64), candidates, bucket_size=self.bucket_size)
            values, inverse = np.unique(history, return_inverse=True)
            has_pad = len(values) > 0 and values[0] == 0
            history_news = torch.from_numpy(values[1:] if has_pad else values)
            history_slots = (inverse.reshape(history.shape) + (0 if has_pad else 1)).astype(np.int64)
        else:
            unique, n_unique, history_slots, candidate_slots = deduplicate(
                history, candidates, bucket_size=self.bucket_size)
        return Batch(
            history=torch.from_numpy(history),
            history_mask=torch.from_numpy(history_mask),
            candidates=torch.from_numpy(candidates),
            candidate_mask=torch.from_numpy(candidate_mask),
            unique_news=torch.from_numpy(unique),
            n_unique=n_unique,
            history_slots=torch.from_numpy(history_slots),
            candidate_slots=torch.from_numpy(candidate_slots),
            news=NewsInputs.from_arrays(self.features.gather(unique)),
            global_batch_size=len(ids),
            batch_index=batch_index,
            history_news=history_news,
        )

    def epoch_batches(self, epoch: int, *, start_batch: int = 0, num_workers: int = 1,
                      prefetch: int = 4) -> Iterator[Batch]:
        """Batches ``start_batch..`` of ``epoch``, built by ``num_workers`` background threads
        (0 = on the calling thread), yielded in order."""
        order = epoch_order(self.n_samples, seed=self.seed, epoch=epoch)
        indices = range(start_batch, self.batches_per_epoch)
        return prefetch_map(lambda b: self.build(epoch, b, order), indices,
                            num_workers=num_workers, depth=max(prefetch, num_workers))


def prefetch_map(fn: Callable[[int], T], items: Iterable[int], *, num_workers: int, depth: int) -> Iterator[T]:
    """``map(fn, items)`` computed ahead by a thread pool, results in input order, at most
    ``depth`` in flight. With ``num_workers=0`` everything runs on the caller's thread."""
    if num_workers <= 0:
        yield from map(fn, items)
        return
    iterator = iter(items)
    executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="newsrec-batches")
    try:
        pending = collections.deque(executor.submit(fn, i) for i in itertools.islice(iterator, depth))
        while pending:
            result = pending.popleft().result()
            for i in itertools.islice(iterator, 1):
                pending.append(executor.submit(fn, i))
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
