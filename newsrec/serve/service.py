"""The recommendation service: one user (or a given history) → retrieve K → re-rank → top k.

``Recommender`` holds the trained news/user encoders, the FAISS index with every news vector, the
dataset artifact (vocabulary, titles, users' latest histories) and, optionally, a re-ranker. The CLI
(``newsrec recommend``) and the HTTP app (``newsrec serve``) both call :meth:`Recommender.recommend`.

News keys are the index's (see ``newsrec.serve.index``): the artifact's news_idx, then fresh news
added through :meth:`Recommender.add_news`. Clicked news are never recommended back.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from newsrec.config import Config, IndexConfig, ServeConfig
from newsrec.data.artifact import DatasetArtifact, open_dataset
from newsrec.data.features import NewsFeatures, news_features
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.inference.histories import Histories, recent_clicks
from newsrec.inference.scoring import encode_all_news, encode_news, encode_users, retrieve
from newsrec.serve.batching import MicroBatcher
from newsrec.serve.clock import ServiceClock
from newsrec.serve.index import NewsIndex, build_index, load_index
from newsrec.utils.io import sha256_file


class UnknownUserError(NewsrecError):
    """The user has no impressions in the dataset artifact."""


class UnknownNewsError(NewsrecError):
    """News ids that are neither in the dataset artifact nor added as fresh news."""

    def __init__(self, news_ids: list[str]) -> None:
        self.news_ids = news_ids
        shown = ", ".join(news_ids[:10]) + (f" (+{len(news_ids) - 10} more)" if len(news_ids) > 10 else "")
        super().__init__(f"unknown news id(s) in history: {shown}; send known ids, or set "
                         f"ignore_unknown=true to drop them")


class DuplicateNewsError(NewsrecError):
    """A fresh news id that is already known."""


@dataclass(frozen=True)
class Item:
    """One recommended news: ``score`` ranks the list (re-ranker score when there is a re-ranker,
    else the retrieval score = dot(user, news))."""

    news_id: str
    score: float
    retrieval_score: float
    title: str
    category: str
    fresh: bool


@dataclass(frozen=True)
class NewsInfo:
    """A news as people see it: its id, title and category ("" when the news has none)."""

    news_id: str
    title: str
    category: str


@dataclass(frozen=True)
class _Job:
    """One request's model work: its history (the clicks the user encoder reads), every click (the
    re-ranker reads its own ``history_len`` of them), the keys never to return, how many candidates
    to retrieve, the request time (seconds since the epoch, the service's clock)."""

    history: np.ndarray
    exclude: set[int]
    retrieve_k: int
    now: float | None  # None: the clock's now when the job runs
    clicks: np.ndarray | None = None  # None: ``history`` is every click


@dataclass(frozen=True)
class _Request:
    """A checked request: its model work, how many items it wants, the history ids it dropped, and
    when it started and was ready for the model work (``time.perf_counter``)."""

    job: _Job
    k: int
    ignored: list[str]
    started: float
    prepared: float


@dataclass(frozen=True)
class _Found:
    """Retrieved candidates int64 [C], their retrieval scores [C] and final scores [C], and the
    timings of the batched call that produced them."""

    keys: np.ndarray
    retrieval_scores: np.ndarray
    scores: np.ndarray
    reranked: bool
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class Recommendation:
    items: list[Item]
    history_used: int  # clicks fed to the user encoder (after truncation to data.history_len)
    ignored_ids: list[str] = field(default_factory=list)  # unknown history ids dropped on request
    reranked: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    history: list[NewsInfo] = field(default_factory=list)  # those clicks, oldest first; len == history_used


class Recommender:
    """Retrieval + optional re-ranking over a FAISS index. Thread-safe: searches run concurrently
    with each other; adding fresh news takes the index lock (see ``NewsIndex``) and this one."""

    def __init__(self, *, model: Any, config: Config, dataset: DatasetArtifact, index: NewsIndex,
                 serve_cfg: ServeConfig | None = None, reranker: Any = None,
                 index_dir: str | Path | None = None, rerank_decision: str = "") -> None:
        self.model = model.eval()
        self.config = config
        self.dataset = dataset
        self.index = index
        self.serve_cfg = serve_cfg or config.serve
        self.reranker = reranker
        self.rerank_decision = rerank_decision  # with a re-ranker directory: whether it is used, and why
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.history_len = config.data.history_len
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()
        self._features: NewsFeatures | None = None
        self._features_lock = threading.Lock()
        self._dirty = False
        self._fresh_key_of: dict[str, int] = {}
        self._fresh_meta: dict[int, dict] = {}
        self.evicted = 0  # fresh news dropped to stay within serve.max_fresh_news
        for meta in index.fresh:
            self._fresh_key_of[meta["news_id"]] = int(meta["key"])
            self._fresh_meta[int(meta["key"])] = meta
        self.on_batch: Any = None  # called with the size of every batched model call (metrics)
        self.clock = ServiceClock(self._clock_start(index.fresh))
        self._evict_over_cap()
        if reranker is not None and index.fresh:
            self._register_fresh_with_reranker(index.fresh)
        self._latest_row: dict[str, tuple[str, int]] | None = None
        self._batcher = (MicroBatcher(self._run_jobs, max_batch=self.serve_cfg.batch_max)
                         if self.serve_cfg.batch_max > 1 else None)
        self._titles = dataset.news.select("news_idx", "title", "category")
        self._title_of = np.empty(dataset.n_news + 1, dtype=object)
        self._category_of = np.empty(dataset.n_news + 1, dtype=object)
        self._title_of[0] = self._category_of[0] = ""
        idx = self._titles["news_idx"].to_numpy()
        self._title_of[idx] = np.array(self._titles["title"].to_list(), dtype=object)
        self._category_of[idx] = np.array(self._titles["category"].to_list(), dtype=object)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_dir: str | Path, index_dir: str | Path, *, reranker_dir: str | Path | None = None,
             data_dir: str | Path | None = None, serve_cfg: ServeConfig | None = None,
             index_cfg: IndexConfig | None = None, rerank_use: str | None = None) -> "Recommender":
        """Open MODEL_DIR, INDEX_DIR (and RERANKER_DIR). The dataset artifact is ``data_dir`` or the
        one the model was trained on (recorded in model.json). ``index_cfg``: search-time settings
        (nprobe, efSearch, threads) that replace the ones the index was built with. ``rerank_use``:
        auto | always | never (None = the re-ranker's ``rerank.use``): the re-ranker is loaded only
        where it is to be used (``rerank_decision`` says why)."""
        from newsrec.inference.model_io import check_compatible, load_model

        loaded = load_model(model_dir)
        dataset = open_dataset(data_dir or _dataset_path(loaded.manifest, model_dir))
        check_compatible(loaded.manifest, dataset)
        index = load_index(index_dir, device=loaded.config.index.device)
        check_index_matches(index, model_dir=Path(model_dir), n_news=dataset.n_news,
                            news_dim=loaded.model.news_dim, index_dir=Path(index_dir))
        if index_cfg is not None:
            index.configure_search(index_cfg)
        reranker, decision = None, ""
        if reranker_dir is not None:
            from newsrec.inference.rerank import open_two_stage

            reranker, decision = open_two_stage(reranker_dir, retriever_dir=model_dir, use=rerank_use)
        return cls(model=loaded.model, config=loaded.config, dataset=dataset, index=index,
                   serve_cfg=serve_cfg or loaded.config.serve, reranker=reranker, index_dir=index_dir,
                   rerank_decision=decision)

    def _clock_start(self, fresh: list[dict]) -> float:
        """Where the service's clock starts: the end of the dataset's log (and of the re-ranker's),
        or the latest fresh news already added when that is later."""
        from newsrec.data import schema

        ends = [max((_seconds_of(pl.scan_parquet(self.dataset.root / schema.behaviors_file(s))
                                 .select(pl.col("time").max()).collect().item()) for s in self.dataset.splits),
                    default=0.0)]
        if self.reranker is not None:
            ends.append(self.reranker.log_end())
        ends += [ServiceClock.parse(m["added_at"]) for m in fresh if m.get("added_at")]
        return max(ends)

    def _register_fresh_with_reranker(self, fresh: list[dict]) -> None:
        """Fresh news saved with the index become known to the re-ranker (no clicks; first seen when
        they were added, on the service's clock; news saved without that time: the clock's start)."""
        keys = np.array([int(m["key"]) for m in fresh], dtype=np.int64)
        seen = np.array([ServiceClock.parse(m["added_at"]) if m.get("added_at") else self.clock.start_seconds
                         for m in fresh])
        for when in np.unique(seen):
            pick = seen == when
            self.reranker.add_news(keys[pick], self.index.vectors_of(keys[pick]), first_seen=float(when),
                                   category_idx=np.array([int(m.get("category_idx", 0)) for m, p in zip(fresh, pick) if p]),
                                   subcategory_idx=np.array([int(m.get("subcategory_idx", 0))
                                                             for m, p in zip(fresh, pick) if p]))

    # ------------------------------------------------------------------ ids
    def key_of(self, news_id: str) -> int | None:
        key = self.dataset.news_id_to_idx.get(news_id)
        return key if key is not None else self._fresh_key_of.get(news_id)

    def news_id_of(self, key: int) -> str:
        if key <= self.dataset.n_news:
            return str(self.dataset.news_idx_to_id[key])
        return str(self._fresh_meta[key]["news_id"])

    def _info(self, key: int) -> tuple[str, str, str]:
        """(news_id, title, category) of a key."""
        if key <= self.dataset.n_news:
            return (str(self.dataset.news_idx_to_id[key]), str(self._title_of[key] or ""),
                    str(self._category_of[key] or ""))
        meta = self._fresh_meta[key]
        return meta["news_id"], meta.get("title", ""), meta.get("category") or ""

    @property
    def n_users(self) -> int:
        return len(self._user_rows())

    def _user_rows(self) -> dict[str, tuple[str, int]]:
        """user_id → (split, row) of the user's latest impression over every split of the artifact."""
        if self._latest_row is None:
            frames = []
            for split in self.dataset.splits:
                df = self.dataset.behaviors(split).select("user_id", "time")
                frames.append(df.with_row_index("row").with_columns(pl.lit(split).alias("split")))
            if frames:
                latest = (pl.concat(frames).sort(["time", "row"])
                          .group_by("user_id", maintain_order=True).last())
                self._latest_row = {u: (s, int(r)) for u, s, r in
                                    zip(latest["user_id"], latest["split"], latest["row"])}
            else:
                self._latest_row = {}
        return self._latest_row

    def sample_user_ids(self, limit: int) -> list[str]:
        """Up to ``limit`` user ids of the artifact, in the order of their latest impression."""
        return list(itertools.islice(self._user_rows(), limit))

    def user_history(self, user_id: str) -> np.ndarray:
        """Keys of the user's clicks (oldest first, full length) from their latest impression."""
        where = self._user_rows().get(user_id)
        if where is None:
            raise UnknownUserError(f"unknown user '{user_id}': no impressions in {self.dataset.root.name}")
        split, row = where
        return np.asarray(self.dataset.impressions(split).history_of(row), dtype=np.int64)

    def resolve_history(self, news_ids: list[str], *, ignore_unknown: bool) -> tuple[np.ndarray, list[str]]:
        """News ids → keys (int64 [N], order kept); unknown ids raise, or are dropped and returned."""
        keys, unknown = [], []
        for news_id in news_ids:
            key = self.key_of(news_id)
            (unknown.append(news_id) if key is None else keys.append(key))
        if unknown and not ignore_unknown:
            raise UnknownNewsError(unknown)
        return np.asarray(keys, dtype=np.int64), unknown

    # ------------------------------------------------------------------ recommending
    def encode_history(self, history_keys: np.ndarray) -> np.ndarray:
        """Clicked keys (oldest first) → user vector float32 [U] (``model.user_dim``); the most recent
        ``data.history_len`` clicks are used; an empty history is valid."""
        return self.encode_histories([history_keys])[0]

    def encode_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        """``encode_history`` for several users in one encoder call → float32 [B, U]: the
        inference layer's ``encode_users`` over the index's vectors of the clicked keys."""
        recent = Histories.of_lists(histories).recent(self.history_len)
        keys, local = np.unique(recent.values, return_inverse=True)
        table = np.zeros((len(keys) + 1, self.index.dim), dtype=np.float32)  # row 0: the padding news
        table[1:] = self.index.vectors_of(keys)
        users = encode_users(self.model, torch.from_numpy(table).to(self.device),
                             Histories(local.reshape(-1) + 1, recent.offsets), history_len=None,
                             batch_size=max(len(recent), 1))
        return users.cpu().numpy()

    def recommend(self, *, user_id: str | None = None, history: list[str] | None = None,
                  k: int | None = None, ignore_unknown: bool | None = None,
                  now: _dt.datetime | None = None) -> Recommendation:
        """Top ``k`` news for ``user_id`` (latest history in the artifact) or a given ``history`` of
        news ids, never any clicked news. Retrieves ``serve.retrieve_k`` candidates, re-ranks them
        when a re-ranker is loaded, returns ``k`` sorted by score (descending). Concurrent calls
        share batched model calls (``serve.batch_max``)."""
        request = self._prepare(user_id=user_id, history=history, k=k, ignore_unknown=ignore_unknown, now=now)
        if self._batcher is not None:
            found = self._batcher.submit(request.job)
        else:
            found = self._run_jobs([request.job])[0]
        return self._finish(request, found)

    async def recommend_async(self, *, user_id: str | None = None, history: list[str] | None = None,
                              k: int | None = None, ignore_unknown: bool | None = None,
                              now: _dt.datetime | None = None) -> Recommendation:
        """``recommend`` for an event loop: the model work runs on the batching worker (or a
        thread when batching is off) while the loop serves other requests."""
        request = self._prepare(user_id=user_id, history=history, k=k, ignore_unknown=ignore_unknown, now=now)
        if self._batcher is not None:
            found = await asyncio.wrap_future(self._batcher.submit_future(request.job))
        else:
            found = (await asyncio.to_thread(self._run_jobs, [request.job]))[0]
        return self._finish(request, found)

    def _prepare(self, *, user_id: str | None, history: list[str] | None, k: int | None,
                 ignore_unknown: bool | None, now: _dt.datetime | None) -> "_Request":
        """Checks and the history's keys: everything of a request before the model work."""
        if (user_id is None) == (history is None):
            raise NewsrecError("give exactly one of user_id or history")
        k = self.serve_cfg.default_k if k is None else k
        if not 1 <= k <= self.serve_cfg.max_k:
            raise NewsrecError(f"k={k} is out of range: 1 <= k <= {self.serve_cfg.max_k} (serve.max_k)")
        if ignore_unknown is None:
            ignore_unknown = self.serve_cfg.ignore_unknown_history
        started = time.perf_counter()
        ignored: list[str] = []
        if user_id is not None:
            history_keys = self.user_history(user_id)
        else:
            if len(history) > self.serve_cfg.max_history:
                raise NewsrecError(f"history holds {len(history)} ids, more than serve.max_history="
                                   f"{self.serve_cfg.max_history}")
            history_keys, ignored = self.resolve_history(history, ignore_unknown=ignore_unknown)
        job = _Job(history=recent_clicks(history_keys, self.history_len), exclude=set(history_keys.tolist()),
                   retrieve_k=max(self.serve_cfg.retrieve_k, k),
                   now=self.clock.now() if now is None else _seconds_of(now), clicks=history_keys)
        return _Request(job=job, k=k, ignored=ignored, started=started, prepared=time.perf_counter())

    def _finish(self, request: "_Request", found: "_Found") -> Recommendation:
        """The top k of the model work's answer, with titles; timings of every step."""
        computed = time.perf_counter()
        order = np.argsort(-found.scores, kind="stable")[:request.k]
        items = []
        for i in order:
            key = int(found.keys[i])
            news_id, title, category = self._info(key)
            items.append(Item(news_id=news_id, score=float(found.scores[i]),
                              retrieval_score=float(found.retrieval_scores[i]), title=title,
                              category=category, fresh=key > self.dataset.n_news))
        used = [NewsInfo(*self._info(int(key))) for key in request.job.history]
        waited = 1e3 * (computed - request.prepared) - sum(found.timings_ms.values())
        timings = {"prepare_ms": 1e3 * (request.prepared - request.started), "wait_ms": max(waited, 0.0),
                   **found.timings_ms}
        return Recommendation(items=items, history_used=len(used), ignored_ids=request.ignored,
                              reranked=found.reranked, timings_ms=timings, history=used)

    def _run_jobs(self, jobs: list["_Job"]) -> list["_Found"]:
        """Encode, retrieve and re-rank for several requests at once (one call per model)."""
        if self.on_batch is not None:
            self.on_batch(len(jobs))
        t0 = time.perf_counter()
        users = self.encode_histories([job.history for job in jobs])
        t1 = time.perf_counter()
        found_keys, found_scores = retrieve(self.model, self.index, users, max(job.retrieve_k for job in jobs),
                                            exclude=[job.exclude for job in jobs])
        keys, firsts = [], []
        for b, job in enumerate(jobs):
            valid = found_keys[b] >= 0
            keys.append(found_keys[b][valid][:job.retrieve_k])
            firsts.append(found_scores[b][valid][:job.retrieve_k])
        t2 = time.perf_counter()
        reranked = self.reranker is not None and any(len(c) for c in keys)
        now = self.clock.now()
        scores = (self.reranker.rerank_many([job.history if job.clicks is None else job.clicks for job in jobs],
                                            keys, firsts, [now if job.now is None else job.now for job in jobs])
                  if reranked else firsts)
        t3 = time.perf_counter()
        timings = {"encode_ms": 1e3 * (t1 - t0), "retrieve_ms": 1e3 * (t2 - t1),
                   "rerank_ms": 1e3 * (t3 - t2)}
        return [_Found(keys=c, retrieval_scores=f, scores=np.asarray(s, dtype=np.float64),
                       reranked=reranked and len(c) > 0, timings_ms=timings)
                for c, f, s in zip(keys, firsts, scores)]

    def close(self) -> None:
        """Stop the batching worker (requests after this compute in their own thread)."""
        if self._batcher is not None:
            self._batcher.close()

    # ------------------------------------------------------------------ fresh news
    def add_news(self, news_id: str, title: str, *, category: str | None = None,
                 subcategory: str | None = None, entities: list[str] | None = None) -> int:
        """Encode a fresh news from its text (the artifact's tokenisation, or the model's PLM) and its
        ``entities`` (WikidataIds; used by an entity-reading model), add it to the index; returns its
        key. Raises DuplicateNewsError when ``news_id`` is already known."""
        news_id = news_id.strip()
        if not news_id:
            raise NewsrecError("news_id must not be empty")
        if self.key_of(news_id) is not None:
            raise DuplicateNewsError(f"news '{news_id}' is already known")
        cats = self.dataset.categories
        cat_idx = _index_of(cats["category"], category)
        sub_idx = _index_of(cats["subcategory"], subcategory)
        arrays = self.news_features().fresh([title], [cat_idx], [sub_idx],
                                            [list(entities or [])])
        vector = encode_news(self.model, arrays, device=self.device).cpu().numpy()
        with self._lock:
            if self.key_of(news_id) is not None:
                raise DuplicateNewsError(f"news '{news_id}' is already known")
            key = self.index.next_key
            added_at = self.clock.now_datetime().isoformat(timespec="seconds")
            meta = {"news_id": news_id, "title": title, "category": category or "",
                    "subcategory": subcategory or "", "category_idx": cat_idx, "subcategory_idx": sub_idx,
                    "added_at": added_at}
            keys = np.array([key], dtype=np.int64)
            if self.reranker is not None:  # before the index: a retrieved key must be known to it
                self.reranker.add_news(keys, vector, category_idx=np.array([cat_idx]),
                                       subcategory_idx=np.array([sub_idx]), first_seen=ServiceClock.parse(added_at))
            self.index.add(vector, keys, fresh=[meta])
            self._fresh_meta[key] = {**meta, "key": key}
            self._fresh_key_of[news_id] = key
            self._dirty = True
            self._evict_over_cap()
        return key

    def news_features(self) -> NewsFeatures:
        """The news inputs of the model (opened on first use): fresh news are tokenised, and for a PLM
        model run through the backbone, exactly as the dataset's news were."""
        with self._features_lock:
            if self._features is None:
                self._features = news_features(self.dataset, self.config,
                                               plm_fingerprint=getattr(self.model, "plm_fingerprint", None))
            return self._features

    def _evict_over_cap(self) -> list[str]:
        """Drop the oldest fresh news (smallest keys) beyond ``serve.max_fresh_news`` from the
        index and the id tables; returns their ids. The caller holds ``_lock`` (or is __init__)."""
        excess = len(self._fresh_meta) - self.serve_cfg.max_fresh_news
        if excess <= 0:
            return []
        oldest = sorted(self._fresh_meta)[:excess]
        self.index.remove(np.array(oldest, dtype=np.int64))
        evicted = [str(self._fresh_meta.pop(key)["news_id"]) for key in oldest]
        for news_id in evicted:
            del self._fresh_key_of[news_id]
        self._dirty = True
        self.evicted += len(evicted)
        return evicted

    @property
    def dirty(self) -> bool:
        """True when fresh news were added since the index was loaded or saved."""
        return self._dirty

    def save(self, index_dir: str | Path | None = None) -> Path:
        """Persist the index with its fresh news (atomic); defaults to the folder it was loaded from."""
        target = Path(index_dir) if index_dir is not None else self.index_dir
        if target is None:
            raise NewsrecError("no index folder to save to: pass index_dir")
        with self._lock:
            self.index.save(target)
            self._dirty = False
        return target

    def stats(self) -> dict[str, Any]:
        return {"news": self.index.count, "fresh_news": len(self._fresh_meta),
                "fresh_news_evicted": self.evicted, "index_kind": self.index.kind,
                "dim": self.index.dim, "reranker": self.reranker is not None,
                "rerank_decision": self.rerank_decision,
                "retrieve_k": self.serve_cfg.retrieve_k,
                "batch_max": self._batcher.max_batch if self._batcher is not None else 1,
                "mean_batch": round(self._batcher.mean_batch, 2) if self._batcher is not None else 1.0}


def _seconds_of(when: Any) -> float:
    """Seconds since the epoch of a datetime (naive = UTC, as dataset times are)."""
    if when is None:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def _index_of(names: list[str], name: str | None) -> int:
    if not name:
        return 0
    try:
        return names.index(name)
    except ValueError:
        return 0  # an unseen category is the "<unk>" category


def _dataset_path(manifest: dict, model_dir: str | Path) -> str:
    path = manifest.get("dataset", {}).get("path")
    if not path or not Path(path).is_dir():
        raise ArtifactError(f"{model_dir}: the dataset the model was trained on ({path or 'not recorded'}) "
                            f"is not there; pass --data DIR")
    return path


def check_index_matches(index: NewsIndex, *, model_dir: Path, n_news: int, news_dim: int,
                        index_dir: Path) -> None:
    """ArtifactError unless INDEX_DIR was built from this model's news vectors over this dataset."""
    if index.dim != news_dim:
        raise ArtifactError(f"{index_dir}: index vectors are {index.dim}-d, the model's news vectors "
                            f"{news_dim}-d; rebuild with `newsrec index --model {model_dir}`")
    if index.base_news != n_news:
        raise ArtifactError(f"{index_dir}: built over {index.base_news} news, the dataset has {n_news}; "
                            f"rebuild with `newsrec index`")
    want = index.manifest.get("model_json_sha256")
    have = sha256_file(model_dir / "model.json") if (model_dir / "model.json").is_file() else None
    if want and have and want != have:
        raise ArtifactError(f"{index_dir}: built from another model (model.json sha256 differs); "
                            f"rebuild with `newsrec index --model {model_dir}`")


# ---------------------------------------------------------------------------- the `index` stage
def index_news(model_dir: str | Path, *, data_dir: str | Path | None, out_dir: str | Path,
               index_cfg: IndexConfig | None = None, batch_size: int | None = None) -> NewsIndex:
    """``newsrec index``: encode every news of the artifact with the trained news encoder and
    write INDEX_DIR (see ``newsrec.serve.index``). ``index_cfg`` defaults to the model's config."""
    from newsrec.inference.model_io import check_compatible, load_model

    model_dir = Path(model_dir)
    loaded = load_model(model_dir)
    data_dir = data_dir or _dataset_path(loaded.manifest, model_dir)
    dataset = open_dataset(data_dir)
    check_compatible(loaded.manifest, dataset)
    cfg = index_cfg or loaded.config.index
    news_vectors = encode_all_news(loaded.model, dataset, batch_size=batch_size or cfg.encode_batch_size,
                                   device="cpu")  # [n_news + 1, D], row 0 = padding
    vectors = news_vectors[1:].float().cpu().numpy()
    keys = np.arange(1, dataset.n_news + 1, dtype=np.int64)
    index = build_index(vectors, keys, cfg=cfg, base_news=dataset.n_news, manifest={
        "model_dir": str(model_dir.resolve()),
        "model_json_sha256": sha256_file(model_dir / "model.json"),
        "dataset_dir": str(Path(data_dir).resolve()),
    })
    index.save(out_dir)
    return index
