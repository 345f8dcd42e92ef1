"""FAISS inner-product index over news vectors — the only module that imports faiss.

INDEX_DIR layout (written atomically by :meth:`NewsIndex.save`)::

    index.faiss      the FAISS index (rows in insertion order)
    ids.npy          int64 [count]: the news key of each row
    vectors.npy      float32 [count, dim]: each row's vector (exact re-scoring, re-ranker input)
    fresh_news.json  {"base_news": n, "news": [{"key", "news_id", "title", ...}, ...]}
    manifest.json    kind, dim, count, base_news, build parameters, model dir + model.json sha256

News keys: the dataset's ``news_idx`` (1..base_news) for news of the artifact the index was built
from; fresh news added later get keys ``base_news + 1, base_news + 2, ...`` and their ids and titles
live in ``fresh_news.json``. Keys are never reused, so an id map never needs a rebuild.

Search returns exact inner products: the approximate index proposes rows, the stored vectors
re-score them, so HNSW / IVF-PQ only affect which rows are found, never their scores.

Maximum inner product → nearest neighbour. Inner product is not a metric, and HNSW / IVF built on it
find far fewer of the true top-k (graph and k-means both assume a metric). The approximate kinds
index each news vector x extended by one coordinate, ``[x, sqrt(M² − ‖x‖²)]``, and search with
``[q, 0]``: then ``‖q' − x'‖² = ‖q‖² + M² − 2 q·x``, so the L2 order is exactly the inner-product
order. M (``params["max_norm"]``) is the largest news norm at build time and is kept in the
manifest, so fresh news added later are extended with the same M. A fresh news with a norm above M
cannot be placed on that sphere: it is added with a 0 extra coordinate and recorded as an
*overflow* row, and every search also scores all overflow rows exactly, so such news are still
found and ranked right (at a small exact-scan cost per overflow row; ``newsrec index`` rebuilds
with a new M).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from newsrec.config import IndexConfig
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.utils.io import atomic_dir, read_json, read_manifest, write_json

INDEX_SCHEMA_VERSION = 2
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
VECTORS_FILE = "vectors.npy"
FRESH_FILE = "fresh_news.json"
COMPACT_AFTER = 256  # removed rows that trigger a compaction (searches skip removed rows until then)
MANIFEST_FILE = "manifest.json"
KINDS = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq")
APPROXIMATE_KINDS = ("hnsw", "ivf", "ivfsq", "ivfpq")
IVF_KINDS = ("ivf", "ivfsq", "ivfpq")
SHORTLIST_FACTOR = {"ivfpq": "pq_k_factor", "ivfsq": "sq_k_factor"}  # compressed codes: k * factor re-scored
SQ_ALIGN = 16  # IVF-SQ rows are zero-padded to a multiple of this: faiss's SIMD scanners need it
BATCH_QUERIES = 16  # a search of this many queries or more is a batch: it uses every core


def choose_kind(n_vectors: int, cfg: IndexConfig) -> str:
    """The index kind for a pool of ``n_vectors``: ``cfg.kind``, or with ``auto`` exact search up
    to ``cfg.flat_max`` vectors and ``cfg.ann_kind`` (IVF-SQ by default) above.

    IVF kinds are the default because their recall holds on vectors whose clusters are
    high-dimensional blobs (recall@100 ≥ 0.99 where HNSW stays near 0.5-0.7 at any efSearch;
    docs/benchmarks/serve_ann.json). IVF-SQ keeps IVF-Flat's recall (its 8-bit shortlist is
    re-scored exactly) with a quarter of the bytes to scan per list, which is what a search at
    millions of news is bound by; HNSW remains available with ``index.ann_kind=hnsw``."""
    if cfg.kind != "auto":
        return cfg.kind
    return "flat" if n_vectors <= cfg.flat_max else cfg.ann_kind


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _use_gpu(kind: str, device: str) -> bool:
    if device == "cpu":
        return False
    if device == "cuda" and not gpu_available():
        raise NewsrecError("index.device=cuda but faiss sees no GPU (install newsrec[gpu] on a "
                           "machine with CUDA, or set -o index.device=cpu)")
    # HNSW has no GPU implementation in faiss; it stays on the CPU.
    return gpu_available() and kind != "hnsw"


def _ivf_nlist(n_vectors: int, cfg: IndexConfig) -> int:
    nlist = cfg.ivf_nlist or int(4 * math.sqrt(max(n_vectors, 1)))
    # k-means needs a few dozen training points per list
    return max(1, min(nlist, n_vectors // 39 if n_vectors >= 39 else 1))


def extended_width(kind: str, dim: int, cfg: IndexConfig) -> int:
    """Width of the vectors the faiss index holds: ``dim`` for flat, ``dim + 1`` (the MIPS
    coordinate) for HNSW / IVF, zero-padded up to a multiple of ``pq_m`` for IVF-PQ and of 16 for
    IVF-SQ."""
    if kind == "flat":
        return dim
    if kind == "ivfpq":
        return cfg.pq_m * math.ceil((dim + 1) / cfg.pq_m)
    if kind == "ivfsq":
        return SQ_ALIGN * math.ceil((dim + 1) / SQ_ALIGN)
    return dim + 1


def max_norm_of(vectors: np.ndarray) -> float:
    """The M of the MIPS→L2 reduction for ``vectors`` float32 [n, dim]: their largest L2 norm
    (1.0 for an empty or all-zero pool)."""
    norms = _norms(vectors)
    top = float(norms.max()) if len(norms) else 0.0
    return top if top > 0 else 1.0


def _norms(vectors: np.ndarray) -> np.ndarray:
    """float64 [n] L2 norms, computed in blocks (bounded memory for millions of rows)."""
    out = np.empty(len(vectors), dtype=np.float64)
    for s in range(0, len(vectors), 100_000):
        block = vectors[s:s + 100_000].astype(np.float64)
        out[s:s + len(block)] = np.sqrt(np.einsum("nd,nd->n", block, block))
    return out


def extend_for_l2(vectors: np.ndarray, *, max_norm: float, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Base vectors float32 [n, dim] → float32 [n, width] ``[x, sqrt(M² − ‖x‖²), 0...]`` and the
    bool [n] mask of rows whose norm exceeds M (their extra coordinate is 0: overflow rows)."""
    norms = _norms(vectors)
    gap = max_norm ** 2 - norms ** 2
    out = np.zeros((len(vectors), width), dtype=np.float32)
    out[:, :vectors.shape[1]] = vectors
    out[:, vectors.shape[1]] = np.sqrt(np.maximum(gap, 0.0))
    return out, norms > max_norm * (1 + 1e-6)


def extend_queries(queries: np.ndarray, width: int) -> np.ndarray:
    """Queries float32 [B, dim] → float32 [B, width] ``[q, 0, ...]``."""
    out = np.zeros((len(queries), width), dtype=np.float32)
    out[:, :queries.shape[1]] = queries
    return out


def _new_faiss_index(kind: str, dim: int, n_vectors: int, cfg: IndexConfig) -> tuple[Any, dict]:
    """An empty (untrained for IVF) faiss index over vectors of width ``extended_width`` and the
    parameters it was made with."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {"search_threads": cfg.search_threads}
    width = extended_width(kind, dim, cfg)
    search = {"search_threads": cfg.search_threads, "width": width}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(width, cfg.hnsw_m, faiss.METRIC_L2)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
        return index, {"hnsw_m": cfg.hnsw_m, "hnsw_ef_construction": cfg.hnsw_ef_construction,
                       "hnsw_ef_search": cfg.hnsw_ef_search, **search}
    nlist = _ivf_nlist(n_vectors, cfg)
    quantizer = faiss.IndexFlatL2(width)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, width, nlist, faiss.METRIC_L2)
        params = {"ivf_nlist": nlist, "ivf_nprobe": cfg.ivf_nprobe, **search}
    elif kind == "ivfsq":  # 8 bits per coordinate, range learnt per dimension
        index = faiss.IndexIVFScalarQuantizer(quantizer, width, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_L2)
        params = {"ivf_nlist": nlist, "ivf_nprobe": cfg.ivf_nprobe, "sq_k_factor": cfg.sq_k_factor, **search}
    else:
        index = faiss.IndexIVFPQ(quantizer, width, nlist, cfg.pq_m, 8, faiss.METRIC_L2)
        params = {"ivf_nlist": nlist, "ivf_nprobe": cfg.ivf_nprobe, "pq_m": cfg.pq_m,
                  "pq_k_factor": cfg.pq_k_factor, **search}
    index.nprobe = cfg.ivf_nprobe  # faiss's wrapper keeps `quantizer` alive with the index
    return index, params


@contextlib.contextmanager
def faiss_threads(n_threads: int) -> Iterator[None]:
    """Run the block with ``n_threads`` faiss (OpenMP) threads in the calling thread (0 = every
    core); the previous count is restored afterwards. OpenMP keeps this count per thread."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads or _cores())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _ReadWriteLock:
    """Many concurrent readers (searches) or one writer (add, save); a waiting writer blocks new
    readers so fresh news are not starved under constant load."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class SearchResult:
    """``keys`` int64 [B, k] (−1 where fewer than k were found), ``scores`` float32 [B, k]
    (exact inner products, descending; −inf where no key), ``rows`` int64 [B, k] index rows."""

    keys: np.ndarray
    scores: np.ndarray
    rows: np.ndarray


@dataclass
class NewsIndex:
    """A FAISS index with its id map and stored vectors. ``search`` and ``add`` are thread-safe:
    searches run concurrently with each other, an add waits for running searches and holds new
    ones back while it writes."""

    faiss_index: Any
    keys: np.ndarray  # int64 [count]
    vectors: np.ndarray  # float32 [count, dim]
    kind: str
    base_news: int  # keys 1..base_news are dataset news_idx; larger keys are fresh news
    params: dict = field(default_factory=dict)
    fresh: list[dict] = field(default_factory=list)  # metadata of fresh news, in key order
    manifest: dict = field(default_factory=dict)
    on_gpu: bool = False

    def __post_init__(self) -> None:
        self._lock = _ReadWriteLock()
        self._row_of_key = {int(k): i for i, k in enumerate(self.keys.tolist())}
        self._dead_rows: set[int] = set()  # removed rows, still in faiss until the next compaction
        self._overflow_rows = np.zeros(0, dtype=np.int64)
        if self.approximate:
            norms = _norms(self.vectors)
            if "max_norm" not in self.params:
                self.params["max_norm"] = float(norms.max()) if len(norms) and norms.max() > 0 else 1.0
            self.params.setdefault("width", self.dim + 1)
            self._overflow_rows = np.flatnonzero(norms > self.params["max_norm"] * (1 + 1e-6)).astype(np.int64)

    # ---- size
    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def count(self) -> int:
        """Searchable news (rows removed but not yet compacted away are not counted)."""
        return int(self.keys.shape[0]) - len(self._dead_rows)

    @property
    def approximate(self) -> bool:
        """True for the kinds that search the L2-extended vectors (HNSW, IVF, IVF-PQ)."""
        return self.kind in APPROXIMATE_KINDS

    @property
    def max_norm(self) -> float | None:
        """M of the MIPS→L2 reduction (None for the exact kind)."""
        return self.params.get("max_norm") if self.approximate else None

    @property
    def overflow_count(self) -> int:
        """Rows whose norm exceeds M; each search scores them exactly."""
        return int(len(self._overflow_rows))

    @property
    def next_key(self) -> int:
        """The key the next fresh news will get (keys of removed news are never reused)."""
        return max(self.base_news, int(self.keys.max()) if len(self.keys) else 0,
                   int(self.params.get("last_key", 0))) + 1

    def __contains__(self, key: int) -> bool:
        return int(key) in self._row_of_key

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        """Stored vectors of ``keys`` (int [M]) → float32 [M, dim]; KeyError on an unknown key."""
        rows = np.fromiter((self._row_of_key[int(k)] for k in keys), dtype=np.int64, count=len(keys))
        return self.vectors[rows]

    def configure_search(self, cfg: IndexConfig) -> None:
        """Take the search-time settings (efSearch, nprobe, PQ shortlist factor, faiss threads) from
        ``cfg``, e.g. after ``-o index.hnsw_ef_search=...``; build-time ones stay as built."""
        with self._lock.write():
            self.params["search_threads"] = cfg.search_threads
            if self.kind == "hnsw":
                self.params["hnsw_ef_search"] = cfg.hnsw_ef_search
            if self.kind in IVF_KINDS:
                self.params["ivf_nprobe"] = cfg.ivf_nprobe
            if self.kind in SHORTLIST_FACTOR:
                name = SHORTLIST_FACTOR[self.kind]
                self.params[name] = getattr(cfg, name)

    # ---- search
    def search(self, queries: np.ndarray, k: int, *, exclude: list[set[int]] | None = None) -> SearchResult:
        """Top ``k`` keys by inner product for each query.

        queries: float32 [B, dim]; exclude: per query a set of keys never returned (already clicked
        news) — the index is asked for ``k + len(exclude[b])`` rows so the answer still holds k.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got {queries.shape}")
        n_queries = queries.shape[0]
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        with self._lock.read():
            count = len(self.keys)
            dead = np.fromiter(self._dead_rows, dtype=np.int64, count=len(self._dead_rows))
            fetch = min(k + extra + len(dead), count)
            if fetch == 0:
                rows = np.full((n_queries, 0), -1, dtype=np.int64)
            else:
                rows = self._propose(queries, fetch, count)
            keys_all = self.keys
            vectors = self.vectors
            overflow = self._overflow_rows
        out_keys = np.full((n_queries, k), -1, dtype=np.int64)
        out_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        out_rows = np.full((n_queries, k), -1, dtype=np.int64)
        for b in range(n_queries):
            found = rows[b][rows[b] >= 0]
            if len(overflow):  # news longer than M: always scored exactly
                found = np.union1d(found, overflow)
            if len(dead):
                found = found[~np.isin(found, dead)]
            found_keys = keys_all[found]
            if exclude and exclude[b]:
                keep = ~np.isin(found_keys, np.fromiter(exclude[b], dtype=np.int64))
                found, found_keys = found[keep], found_keys[keep]
            exact = vectors[found] @ queries[b]  # exact re-scoring of the proposed rows
            order = np.argsort(-exact, kind="stable")[:k]
            n = len(order)
            out_keys[b, :n] = found_keys[order]
            out_scores[b, :n] = exact[order]
            out_rows[b, :n] = found[order]
        return SearchResult(out_keys, out_scores, out_rows)

    def _propose(self, queries: np.ndarray, fetch: int, count: int) -> np.ndarray:
        """Candidate rows int64 [B, ≥fetch] (−1 padded) from the faiss index."""
        # online requests (a few queries) use search_threads (0 = every core); offline batches every core
        n_threads = self.params.get("search_threads", 0) if len(queries) < BATCH_QUERIES else 0
        if not self.approximate:
            with faiss_threads(n_threads):
                return self.faiss_index.search(queries, fetch)[1]
        extended = extend_queries(queries, self.params["width"])
        params = None
        if self.kind in SHORTLIST_FACTOR:  # compressed codes: a longer shortlist, re-scored exactly
            fetch = min(fetch * self.params.get(SHORTLIST_FACTOR[self.kind], 1), count)
        if not self.on_gpu and self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.params.get("hnsw_ef_search", 16), fetch))
        elif not self.on_gpu:
            params = faiss.SearchParametersIVF(nprobe=self.params.get("ivf_nprobe", 1))
        with faiss_threads(n_threads):
            return self.faiss_index.search(extended, fetch, params=params)[1]

    # ---- fresh news
    def add(self, vectors: np.ndarray, keys: np.ndarray, *, fresh: list[dict] | None = None) -> None:
        """Append rows without a rebuild. vectors float32 [M, dim]; keys int64 [M], new and unique;
        ``fresh`` (optional, one dict per row) is kept in fresh_news.json with its key. Rows longer
        than the index's M become overflow rows (scored exactly by every search)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.asarray(keys, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(keys) != len(vectors):
            raise ValueError(f"add: expected vectors [M, {self.dim}] and M keys, got "
                             f"{vectors.shape} and {keys.shape}")
        if fresh is not None and len(fresh) != len(keys):
            raise ValueError("add: one fresh-news record per key")
        with self._lock.write():
            taken = [int(k) for k in keys if int(k) in self._row_of_key]
            if taken or len(set(keys.tolist())) != len(keys):
                raise NewsrecError(f"news key(s) already in the index: {taken[:5] or 'duplicates'}")
            start = len(self.keys)
            if self.approximate:
                extended, over = extend_for_l2(vectors, max_norm=self.params["max_norm"],
                                               width=self.params["width"])
                self.faiss_index.add(extended)
                if over.any():
                    self._overflow_rows = np.concatenate([self._overflow_rows, start + np.flatnonzero(over)])
            else:
                self.faiss_index.add(vectors)
            self.keys = _append(self, "keys", keys)
            self.vectors = _append(self, "vectors", vectors)
            for i, k in enumerate(keys.tolist()):
                self._row_of_key[k] = start + i
            if fresh is not None:
                self.fresh.extend({**meta, "key": int(k)} for meta, k in zip(fresh, keys.tolist()))
            if len(keys):
                self.params["last_key"] = max(int(self.params.get("last_key", 0)), int(keys.max()))

    def remove(self, keys: np.ndarray) -> None:
        """Take news out of search (evicted fresh news). Rows are dropped from faiss, the id map and
        the stored vectors in one compaction once ``COMPACT_AFTER`` are removed (and before a
        save); until then searches skip them. Unknown keys raise KeyError."""
        keys = np.asarray(keys, dtype=np.int64)
        with self._lock.write():
            rows = [self._row_of_key[int(k)] for k in keys]  # KeyError before any change
            for k, row in zip(keys.tolist(), rows):
                del self._row_of_key[k]
                self._dead_rows.add(row)
            gone = set(keys.tolist())
            self.fresh = [m for m in self.fresh if int(m["key"]) not in gone]
            if len(self._dead_rows) >= COMPACT_AFTER:
                self._compact()

    def _compact(self) -> None:
        """Rebuild the faiss rows, ids and vectors without the removed rows (write lock held). The
        faiss index is reset and refilled, so trained quantisers (IVF, SQ, PQ) are kept."""
        if not self._dead_rows:
            return
        live = np.ones(len(self.keys), dtype=bool)
        live[np.fromiter(self._dead_rows, dtype=np.int64)] = False
        self.keys = self.keys[live].copy()
        self.vectors = np.ascontiguousarray(self.vectors[live])
        self.__dict__.pop("_buffers", None)
        self.faiss_index.reset()
        _add_in_chunks(self.faiss_index, self.vectors, show_progress=False, kind=self.kind, params=self.params)
        self._row_of_key = {int(k): i for i, k in enumerate(self.keys.tolist())}
        self._dead_rows = set()
        if self.approximate:
            norms = _norms(self.vectors)
            self._overflow_rows = np.flatnonzero(norms > self.params["max_norm"] * (1 + 1e-6)).astype(np.int64)

    # ---- persistence
    def save(self, out_dir: str | Path) -> Path:
        """Write INDEX_DIR atomically (a reader sees the old folder or the new one, never half)."""
        out_dir = Path(out_dir)
        with self._lock.write():
            self._compact()
            cpu_index = faiss.index_gpu_to_cpu(self.faiss_index) if self.on_gpu else self.faiss_index
            manifest = {
                **self.manifest,
                "schema_version": INDEX_SCHEMA_VERSION,
                "kind": self.kind,
                "metric": "inner_product",
                "search_space": "l2 over [x, sqrt(M^2 - |x|^2)]" if self.approximate else "inner_product",
                "dim": self.dim,
                "count": self.count,
                "base_news": self.base_news,
                "fresh_news": len(self.fresh),
                "overflow_news": self.overflow_count,
                "params": self.params,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            with atomic_dir(out_dir) as tmp:
                faiss.write_index(cpu_index, str(tmp / INDEX_FILE))
                np.save(tmp / IDS_FILE, self.keys)
                np.save(tmp / VECTORS_FILE, self.vectors)
                write_json(tmp / FRESH_FILE, {"base_news": self.base_news, "news": self.fresh})
                write_json(tmp / MANIFEST_FILE, manifest)
            self.manifest = manifest
        return out_dir


def _append(index: NewsIndex, name: str, rows: np.ndarray) -> np.ndarray:
    """``getattr(index, name)`` with ``rows`` appended, as a view of a buffer grown by 25% at a
    time: adding one fresh news to a pool of millions copies one row, not the pool. Views handed
    out earlier (to running searches) keep seeing their unchanged rows."""
    current = getattr(index, name)
    buffers = index.__dict__.setdefault("_buffers", {})
    buffer = buffers.get(name)
    start, end = len(current), len(current) + len(rows)
    if buffer is None or not np.shares_memory(buffer, current) or len(buffer) < end:
        buffer = np.empty((max(end, int(1.25 * end) + 16), *current.shape[1:]), dtype=current.dtype)
        buffer[:start] = current
        buffers[name] = buffer
    buffer[start:end] = rows
    return buffer[:end]


def build_index(vectors: np.ndarray, keys: np.ndarray, *, cfg: IndexConfig, base_news: int,
                manifest: dict | None = None, show_progress: bool = True) -> NewsIndex:
    """Index ``vectors`` float32 [n, dim] under ``keys`` int64 [n] (news_idx, 1..base_news).

    The kind follows :func:`choose_kind`; approximate kinds index the L2-extended vectors (see the
    module docstring) with M = the largest norm of ``vectors``; IVF kinds train on a seeded sample
    of at most ``cfg.ivf_train_size`` vectors. Builds with ``cfg.build_threads`` faiss threads.
    ``manifest`` entries (model dir, hashes) are kept with it.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64)
    if vectors.ndim != 2 or len(keys) != len(vectors):
        raise ValueError(f"build_index: vectors [n, dim] and n keys expected, got {vectors.shape}, {keys.shape}")
    n, dim = vectors.shape
    kind = choose_kind(n, cfg)
    started = time.perf_counter()
    index, params = _new_faiss_index(kind, dim, n, cfg)
    if kind in APPROXIMATE_KINDS:
        params["max_norm"] = max_norm_of(vectors)
    with faiss_threads(cfg.build_threads):
        if kind in IVF_KINDS:
            rng = np.random.default_rng(cfg.seed)
            sample = vectors if n <= cfg.ivf_train_size else vectors[np.sort(rng.choice(n, cfg.ivf_train_size, replace=False))]
            index.train(extend_for_l2(sample, max_norm=params["max_norm"], width=params["width"])[0])
        on_gpu = _use_gpu(kind, cfg.device)
        if on_gpu:
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)  # the wrapper keeps `resources` alive
        _add_in_chunks(index, vectors, show_progress=show_progress and n > 50_000, kind=kind, params=params)
    built = {
        **(manifest or {}),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "device": "cuda" if on_gpu else "cpu",
    }
    return NewsIndex(index, keys.copy(), vectors, kind=kind, base_news=base_news, params=params,
                     manifest=built, on_gpu=on_gpu)


def _add_in_chunks(index: Any, vectors: np.ndarray, *, show_progress: bool, kind: str, params: dict) -> None:
    from newsrec.utils.progress import progress

    chunk = 50_000
    with progress(total=len(vectors), desc=f"index {kind}", unit="news", disable=not show_progress) as bar:
        for start in range(0, len(vectors), chunk):
            block = vectors[start:start + chunk]
            if kind in APPROXIMATE_KINDS:
                block = extend_for_l2(block, max_norm=params["max_norm"], width=params["width"])[0]
            index.add(block)
            bar.update(len(block))


def load_index(index_dir: str | Path, *, device: str = "cpu") -> NewsIndex:
    """Open an INDEX_DIR written by :meth:`NewsIndex.save`; ArtifactError when it is not one."""
    index_dir = Path(index_dir)
    manifest_path, manifest = read_manifest(
        index_dir, MANIFEST_FILE, version=INDEX_SCHEMA_VERSION, what="index folder",
        remedy=f"build one with `newsrec index --model MODEL_DIR --data DIR --out {index_dir}`",
        required=(INDEX_FILE, IDS_FILE, VECTORS_FILE, FRESH_FILE))
    keys = np.load(index_dir / IDS_FILE, allow_pickle=False).astype(np.int64, copy=False)
    vectors = np.load(index_dir / VECTORS_FILE, allow_pickle=False)
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    fresh = read_json(index_dir / FRESH_FILE)
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise ArtifactError(f"{manifest_path}: unknown index kind {kind!r}")
    params = manifest.get("params", {})
    if kind in APPROXIMATE_KINDS and not params.get("max_norm"):
        raise ArtifactError(f"{manifest_path}: a {kind} index without params.max_norm (the M of the "
                            f"inner-product reduction); rebuild with `newsrec index`")
    if not (index.ntotal == len(keys) == len(vectors) == manifest.get("count")):
        raise ArtifactError(f"{index_dir}: index rows ({index.ntotal}), ids ({len(keys)}), vectors "
                            f"({len(vectors)}) and manifest count ({manifest.get('count')}) disagree; "
                            f"rebuild with `newsrec index`")
    width = params.get("width", index.d) if kind in APPROXIMATE_KINDS else vectors.shape[-1]
    if vectors.dtype != np.float32 or vectors.ndim != 2 or width != index.d or (
            kind == "flat" and vectors.shape[1] != index.d):
        raise ArtifactError(f"{index_dir / VECTORS_FILE}: expected float32 [count, dim] matching the "
                            f"index width {index.d}, got {vectors.dtype} {vectors.shape}")
    on_gpu = _use_gpu(kind, device)
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)  # the wrapper keeps `resources` alive
    return NewsIndex(index, keys, np.ascontiguousarray(vectors), kind=kind,
                     base_news=int(manifest["base_news"]), params=params,
                     fresh=list(fresh.get("news", [])), manifest=manifest, on_gpu=on_gpu)


def index_memory_bytes(index: NewsIndex) -> int:
    """Bytes of the serialised faiss index plus the stored vectors and ids (what a server holds)."""
    cpu_index = faiss.index_gpu_to_cpu(index.faiss_index) if index.on_gpu else index.faiss_index
    return int(faiss.serialize_index(cpu_index).nbytes + index.vectors.nbytes + index.keys.nbytes)
