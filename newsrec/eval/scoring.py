"""Offline batch scoring (``newsrec score``): chunked, resumable, shardable Parquet output.

Two modes:

* **split** — every candidate of a split's impressions: one row per candidate
  (``impression_id``, ``user_id``, ``news_id``, ``score``).
* **top-k** — for each user (latest history = the history of that user's most recent impression
  across splits), the K best news of a pool (all news of the artifact, or the candidates of a
  split), already-clicked news excluded: one row per user (``user_id``, ``news_ids`` list,
  ``scores`` list, best first). Exact by default (``ExactRetriever``: inner products + torch topk in
  batches); any object with the same ``search`` method — e.g. the FAISS ``NewsIndex`` of
  ``newsrec.serve.index`` — can be passed as ``retriever``.

Output: a folder ``OUT/part-XXXXX.parquet`` (one per chunk, each written atomically) plus a
manifest recording the arguments. Chunks form one global grid; shard i of n takes a contiguous
range of chunks, so the parts of all shards together are exactly the unsharded output. A run
restarted with the same arguments skips the parts already written; other arguments are refused
unless ``force`` is given.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from newsrec.data import schema
from newsrec.data.artifact import DatasetArtifact, Impressions
from newsrec.errors import NewsrecError
from newsrec.eval.evaluate import InferenceInputs, load_for_inference
from newsrec.inference.histories import Histories
from newsrec.inference.scoring import encode_all_news, encode_users, retrieve, score_impressions
from newsrec.utils.io import atomic_path, read_json, sha256_file, write_json
from newsrec.utils.progress import progress

PART = "part-{:05d}.parquet"


class Retriever(Protocol):
    """What top-k scoring needs from a retriever (``NewsIndex`` of ``newsrec.serve.index`` fits)."""

    def search(self, queries: np.ndarray, k: int, *, exclude: list[set[int]] | None = None) -> Any:
        """queries float32 [B, D] → an object with ``keys`` int64 [B, k] (news_idx, −1 = none) and
        ``scores`` float32 [B, k], best first."""


@dataclass
class TopK:
    keys: np.ndarray  # int64 [B, k]; -1 where fewer than k news qualify
    scores: np.ndarray  # float32 [B, k]; -inf where no key


class ExactRetriever:
    """Exact maximum inner product search over ``pool`` news: ``news_vectors`` [n_news + 1, D],
    ``pool`` int [P] news_idx. Scores in batches of ``batch_size`` queries (memory B × P floats)."""

    def __init__(self, news_vectors: torch.Tensor, pool: np.ndarray, *, batch_size: int = 512) -> None:
        self.pool = np.asarray(pool, dtype=np.int64)
        self.pool_vectors = news_vectors[torch.from_numpy(self.pool).to(news_vectors.device)]  # (P, D)
        self.column_of = np.full(len(news_vectors), -1, dtype=np.int64)
        self.column_of[self.pool] = np.arange(len(self.pool))
        self.batch_size = batch_size

    def search(self, queries: np.ndarray, k: int, *, exclude: list[set[int]] | None = None) -> TopK:
        queries_t = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32),
                                    device=self.pool_vectors.device)
        n, take = len(queries_t), min(k, len(self.pool))
        keys = np.full((n, k), -1, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        for s in range(0, n, self.batch_size):
            with torch.inference_mode():
                block = queries_t[s:s + self.batch_size] @ self.pool_vectors.T  # (b, P)
                if exclude is not None:
                    rows, cols = self._excluded(exclude[s:s + self.batch_size])
                    block[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
                top_scores, top_cols = torch.topk(block, take, dim=1)  # sorted, best first
            top_scores_np = top_scores.float().cpu().numpy()
            found = np.isfinite(top_scores_np)
            keys[s:s + len(block), :take] = np.where(found, self.pool[top_cols.cpu().numpy()], -1)
            scores[s:s + len(block), :take] = np.where(found, top_scores_np, -np.inf)
        return TopK(keys=keys, scores=scores)

    def _excluded(self, exclude: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        lists = [np.fromiter(e, dtype=np.int64) if not isinstance(e, np.ndarray) else e.astype(np.int64)
                 for e in exclude]
        rows = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
        cols = self.column_of[np.concatenate(lists)] if lists else np.zeros(0, np.int64)
        keep = cols >= 0
        return rows[keep], cols[keep]


# ---------------------------------------------------------------------------------------------
# who is scored


@dataclass
class LatestHistories:
    """Each user's history at their most recent impression across splits.

    ``user_ids`` object [U] sorted; ``histories``: their full histories (news_idx, oldest first),
    cut to the model's ``history_len`` only where they are encoded.
    """

    user_ids: np.ndarray
    histories: Histories

    def full(self, row: int) -> np.ndarray:
        return self.histories.row(row)


def latest_histories(dataset: DatasetArtifact) -> LatestHistories:
    """Users of every split, sorted by id, each with the history of their latest impression
    (latest time; ties: the later split in train, dev, test order, then the later row)."""
    frames = []
    splits = dataset.splits
    for split_rank, split in enumerate(splits):
        imps = dataset.impressions(split)
        frames.append(pl.DataFrame({"user_id": imps.user_id.tolist(), "time": imps.time,
                                    "split_rank": np.full(len(imps), split_rank, dtype=np.int8),
                                    "row": np.arange(len(imps), dtype=np.int64)}))
    if not frames:
        raise NewsrecError(f"{dataset.root}: the artifact holds no impressions, so there are no users to score")
    latest = (pl.concat(frames).sort(["user_id", "time", "split_rank", "row"])
              .group_by("user_id", maintain_order=True).last())
    user_ids = np.array(latest["user_id"].to_list(), dtype=object)
    split_rank = latest["split_rank"].to_numpy()
    rows = latest["row"].to_numpy()
    lengths = np.zeros(len(latest), dtype=np.int64)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for r, split in enumerate(splits):
        mine = np.flatnonzero(split_rank == r)
        imps = dataset.impressions(split)
        lengths[mine] = imps.history_lengths[rows[mine]]
        parts.append((mine, rows[mine]))
    offsets = np.zeros(len(latest) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.zeros(int(offsets[-1]), dtype=np.int32)
    for (mine, imp_rows), split in zip(parts, splits):
        imps = dataset.impressions(split)
        for user_row, imp_row in zip(mine.tolist(), imp_rows.tolist()):
            values[offsets[user_row]:offsets[user_row + 1]] = imps.history_of(imp_row)
    return LatestHistories(user_ids=user_ids, histories=Histories(values, offsets))


# ---------------------------------------------------------------------------------------------
# sharding, chunk grid, manifest


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n), 0 <= i < n; None → from RANK/WORLD_SIZE (torchrun), else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise NewsrecError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise NewsrecError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def shard_chunks(n_chunks: int, shard: tuple[int, int]) -> range:
    i, n = shard
    return range(i * n_chunks // n, (i + 1) * n_chunks // n)


def manifest_name(shard: tuple[int, int]) -> str:
    i, n = shard
    return "_manifest.json" if n == 1 else f"_manifest.shard-{i}-of-{n}.json"


def _prepare_out(out: Path, args: dict[str, Any], shard: tuple[int, int], *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NewsrecError(f"{out}: exists and is not a folder; scores are written as a folder of parts")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / manifest_name(shard)
    manifests = sorted(out.glob("_manifest*.json"))
    for path in manifests:
        previous = read_json(path).get("args", {})
        comparable = {k: v for k, v in previous.items() if k != "shard"}
        if comparable != {k: v for k, v in args.items() if k != "shard"}:
            if not force:
                changed = sorted(k for k in set(comparable) | set(args)
                                 if k != "shard" and comparable.get(k) != args.get(k))
                raise NewsrecError(f"{out}: holds scores written with other arguments (differs in: "
                                   f"{', '.join(changed)}); use --force to start over or choose another --out")
    if force:
        for path in [*out.glob("part-*.parquet"), *manifests]:
            path.unlink()
    if not manifest_path.exists():
        write_json(manifest_path, {"args": args, "finished": False})


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class ScoreResult:
    out: Path
    shard: tuple[int, int]
    chunks_written: int
    chunks_skipped: int
    items: int  # users (top-k) or impressions (split) scored by this shard
    rows: int  # rows written by this run
    seconds: float

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def score(model_dir: str | Path, data_dir: str | Path, *, out: str | Path, split: str | None = None,
          top_k: int | None = None, pool: str = "all", shard: str | tuple[int, int] | None = None,
          chunk_users: int = 20_000, force: bool = False, exclude_history: bool = True,
          retriever: Retriever | None = None, retriever_name: str = "exact", device: str | None = None,
          fail_after_chunks: int | None = None, show_progress: bool = True) -> ScoreResult:
    """The ``newsrec score`` stage (see the module docstring).

    ``split`` alone: score the split's impressions. ``top_k``: top-K news per user over ``pool``
    (``"all"`` news, or ``"split"``: the candidates of ``split``). ``chunk_users``: users (or
    impressions) per part file. ``fail_after_chunks``: stop with an error after writing that many
    parts (to exercise resumption).
    """
    if top_k is None and split is None:
        raise NewsrecError("give --split S to score a split's impressions, or --top-k K for top news per user")
    if top_k is not None and top_k <= 0:
        raise NewsrecError(f"--top-k {top_k}: must be > 0")
    if pool not in ("all", "split"):
        raise NewsrecError(f"--pool {pool!r}: expected all or split")
    if top_k is not None and pool == "split" and split is None:
        raise NewsrecError("--pool split needs --split S (whose candidates form the pool)")
    if chunk_users <= 0:
        raise NewsrecError(f"--chunk-users {chunk_users}: must be > 0")
    shard_ix = shard if isinstance(shard, tuple) else parse_shard(shard)
    out = Path(out)
    inputs = load_for_inference(model_dir, data_dir, device=device)
    args = {
        "mode": "top-k" if top_k is not None else "split", "split": split, "top_k": top_k,
        "pool": pool if top_k is not None else None, "chunk_users": chunk_users,
        "exclude_history": exclude_history if top_k is not None else None,
        "history_len": inputs.history_len, "retriever": retriever_name if top_k is not None else None,
        "model_weights_sha256": inputs.manifest.get("weights_sha256"),
        "dataset_manifest_sha256": sha256_file(inputs.dataset.root / schema.MANIFEST),
        "shard": f"{shard_ix[0]}/{shard_ix[1]}",
    }
    _prepare_out(out, args, shard_ix, force=force)
    news_vectors = encode_all_news(inputs.model, inputs.dataset, batch_size=inputs.batch_size,
                                   device=inputs.device, show_progress=show_progress)
    if top_k is None:
        job = _SplitJob(inputs, inputs.dataset.impressions(split), news_vectors)
    else:
        if retriever is None:
            pool_idx = (np.arange(1, inputs.dataset.n_news + 1) if pool == "all"
                        else np.unique(inputs.dataset.impressions(split).candidates))
            retriever = ExactRetriever(news_vectors, pool_idx, batch_size=inputs.batch_size)
        job = _TopKJob(inputs, latest_histories(inputs.dataset), news_vectors, retriever, top_k,
                       exclude_history=exclude_history)
    n_chunks = -(-job.n_items // chunk_users)
    mine = shard_chunks(n_chunks, shard_ix)
    total_items = sum(min((c + 1) * chunk_users, job.n_items) - c * chunk_users for c in mine)
    written = skipped = rows_written = items_done = 0
    start = time.perf_counter()
    bar = progress(total=total_items, desc=f"score shard {shard_ix[0]}/{shard_ix[1]}", unit="user",
                   disable=None if show_progress else True)
    try:
        for c in mine:
            lo, hi = c * chunk_users, min((c + 1) * chunk_users, job.n_items)
            part = out / PART.format(c)
            if part.exists():
                skipped += 1
                bar.update(hi - lo)
                continue
            table = job.run(np.arange(lo, hi))
            with atomic_path(part) as tmp:
                table.write_parquet(tmp)
            written += 1
            rows_written += len(table)
            items_done += hi - lo
            bar.update(hi - lo)
            if fail_after_chunks is not None and written >= fail_after_chunks:
                raise NewsrecError(f"stopped after {written} chunk(s) as asked (fail_after_chunks)")
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    write_json(out / manifest_name(shard_ix), {
        "args": args, "finished": True, "chunks": len(mine), "first_chunk": mine.start,
        "n_chunks_total": n_chunks, "items": total_items,
    })
    return ScoreResult(out=out, shard=shard_ix, chunks_written=written, chunks_skipped=skipped,
                       items=items_done, rows=rows_written, seconds=seconds)


class _SplitJob:
    """Scores of every candidate of a split's impressions, chunked by impression."""

    def __init__(self, inputs: InferenceInputs, impressions: Impressions, news_vectors: torch.Tensor) -> None:
        self.inputs, self.impressions, self.news_vectors = inputs, impressions, news_vectors
        self.news_ids = inputs.dataset.news_idx_to_id
        self.n_items = len(impressions)

    def run(self, rows: np.ndarray) -> pl.DataFrame:
        imps = self.impressions.select(rows)
        scores = score_impressions(self.inputs.model, self.inputs.dataset, imps,
                                   history_len=self.inputs.history_len, batch_size=self.inputs.batch_size,
                                   device=self.inputs.device, news_vectors=self.news_vectors,
                                   show_progress=False)
        counts = imps.candidate_counts
        return pl.DataFrame({
            "impression_id": np.repeat(imps.impression_id, counts),
            "user_id": np.repeat(imps.user_id, counts).tolist(),
            "news_id": self.news_ids[imps.candidates].tolist(),
            "score": scores,
        }, schema={"impression_id": pl.Int64, "user_id": pl.String, "news_id": pl.String,
                   "score": pl.Float32})


class _TopKJob:
    """Top-K news per user over a pool, chunked by user."""

    def __init__(self, inputs: InferenceInputs, users: LatestHistories, news_vectors: torch.Tensor,
                 retriever: Retriever, k: int, *, exclude_history: bool) -> None:
        self.inputs, self.users, self.news_vectors = inputs, users, news_vectors
        self.retriever, self.k, self.exclude_history = retriever, k, exclude_history
        self.news_ids = inputs.dataset.news_idx_to_id
        self.n_items = len(users.user_ids)

    def run(self, rows: np.ndarray) -> pl.DataFrame:
        user_vectors = encode_users(self.inputs.model, self.news_vectors, self.users.histories.recent(None, rows),
                                    history_len=self.inputs.history_len, batch_size=self.inputs.batch_size)
        exclude = [set(self.users.full(int(r)).tolist()) for r in rows] if self.exclude_history else None
        keys, scores = retrieve(self.inputs.model, self.retriever, user_vectors, self.k, exclude=exclude)
        valid = keys >= 0
        counts = valid.sum(axis=1)
        list_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=list_offsets[1:])
        # best first; the retrievers fill valid entries left to right
        flat_keys, flat_scores = keys[valid], scores[valid]
        return pl.DataFrame({
            "user_id": pl.Series(self.users.user_ids[rows].tolist(), dtype=pl.String),
            "news_ids": _split_list(self.news_ids[flat_keys].astype(str), list_offsets, name="news_ids"),
            "scores": _split_list(flat_scores, list_offsets, name="scores"),
        })


def _split_list(values: np.ndarray, offsets: np.ndarray, *, name: str) -> pl.Series:
    """A list column whose row i holds ``values[offsets[i]:offsets[i + 1]]``."""
    import pyarrow as pa

    lists = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int64()).cast(pa.int32()), pa.array(values))
    return pl.Series(name, pl.from_arrow(lists))


def read_scores(out: str | Path) -> pl.DataFrame:
    """All parts of a score folder, in chunk order."""
    parts = sorted(Path(out).glob("part-*.parquet"))
    if not parts:
        raise NewsrecError(f"{out}: no part files")
    return pl.concat([pl.read_parquet(p) for p in parts])
