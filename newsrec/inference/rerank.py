"""The re-ranker at work: its directory (weights, news tables, manifest), scoring with it, and the
decision whether the two-stage model is used at all.

A re-ranker directory (``save_reranker``)::

    config.yaml           the resolved config it was trained with
    reranker.safetensors  weights (no pickle)
    reranker.json         schema version, the retriever it belongs to (its model.json sha256), the
                          dataset (manifest sha256), feature names and the ones dropped, mean
                          click-through, the log's end, the guard (held-out slice: both stages'
                          metrics, whether the two-stage model won)
    news_tables.npz       per news_idx: frozen first-stage vectors, clicks/impressions/showings over
                          the whole log, first-seen seconds, category/subcategory

Every score goes through ``newsrec.inference.features.feature_rows``: ``score_impressions`` with
the log before each impression (an ``EventLog``), ``rerank_many`` (serving) with the log's totals,
valid for moments after the log's end. Histories are cut to ``rerank.history_len`` by
``newsrec.inference.histories``. ``score_impressions_two_stage`` and ``two_stage_scores`` score a
split's impressions with both stages (``evaluate``, ``submit``, the re-ranker's reports).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newsrec.config import RERANK_USE, Config, config_from_yaml_text
from newsrec.data.artifact import DatasetArtifact, Impressions
from newsrec.data.popularity import datetime64_to_seconds
from newsrec.errors import ArtifactError, ConfigError, NewsrecError
from newsrec.inference.features import (FEATURE_NAMES, EventLog, LogCounts, LogTotals, NewsTables,
                                        feature_rows, padded_candidates, right_padded)
from newsrec.inference.histories import Histories
from newsrec.models.reranker import Reranker, load_weights, save_weights
from newsrec.utils.io import atomic_dir, read_manifest, sha256_file, write_json

RERANKER_SCHEMA_VERSION = 3
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "reranker.safetensors"
MANIFEST_FILE = "reranker.json"
TABLES_FILE = "news_tables.npz"
RETRIEVER_MANIFEST = "model.json"  # the first-stage model directory's manifest


def retriever_fingerprint(retriever_dir: str | Path) -> str:
    """sha256 of the first-stage model's ``model.json`` (names that exact model)."""
    path = Path(retriever_dir) / RETRIEVER_MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{retriever_dir}: not a model directory (no {RETRIEVER_MANIFEST}); "
                            f"train one with `newsrec train`")
    return sha256_file(path)


def save_reranker(out_dir: str | Path, model: Reranker, config: Config, *, retriever_dir: str | Path,
                  dataset_root: str | Path, dataset_manifest_sha256: str, tables: NewsTables,
                  mean_ctr: float, log_end: float, extra: dict[str, Any] | None = None) -> Path:
    """Write a re-ranker directory atomically (layout in the module docstring)."""
    used = model.feature_used.cpu().numpy() > 0
    manifest = {
        "schema_version": RERANKER_SCHEMA_VERSION,
        "kind": "newsrec-reranker",
        "retriever": {"path": str(Path(retriever_dir).resolve()),
                      "model_json_sha256": retriever_fingerprint(retriever_dir)},
        "dataset": {"path": str(Path(dataset_root).resolve()), "manifest_sha256": dataset_manifest_sha256},
        "news_dim": model.news_dim,
        "n_news": len(tables) - 1,
        "features": list(FEATURE_NAMES),
        "features_dropped": [n for n, u in zip(FEATURE_NAMES, used) if not u],
        "mean_ctr": float(mean_ctr),
        "popularity_prior": float(config.rerank.popularity_prior),
        "log_end": float(log_end),
        **(extra or {}),
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
        save_weights(model, tmp / WEIGHTS_FILE)
        np.savez(tmp / TABLES_FILE, **tables.arrays())
        write_json(tmp / MANIFEST_FILE, manifest)
    return Path(out_dir)


def load_reranker(reranker_dir: str | Path, *, retriever_dir: str | Path | None = None,
                  map_location: str = "cpu") -> "LoadedReranker":
    """Open a re-ranker directory. With ``retriever_dir``, refuse it unless it is the exact
    first-stage model the re-ranker was trained on (same model.json sha256)."""
    root = Path(reranker_dir)
    manifest_path, manifest = read_manifest(
        root, MANIFEST_FILE, version=RERANKER_SCHEMA_VERSION, what="re-ranker directory",
        remedy="train one with `newsrec train --stage rerank --retriever MODEL_DIR`",
        required=(CONFIG_FILE, WEIGHTS_FILE, TABLES_FILE))
    if manifest.get("kind") != "newsrec-reranker":
        raise ArtifactError(f"{manifest_path}: not a re-ranker manifest (kind {manifest.get('kind')!r})")
    if retriever_dir is not None:
        check_retriever(manifest, retriever_dir, where=str(root))
    if list(manifest.get("features", [])) != list(FEATURE_NAMES):
        raise ArtifactError(f"{manifest_path}: features {manifest.get('features')} differ from this "
                            f"newsrec's {list(FEATURE_NAMES)}; retrain the re-ranker")
    config = config_from_yaml_text((root / CONFIG_FILE).read_text(encoding="utf-8"))
    model = load_weights(config.rerank, root / WEIGHTS_FILE, news_dim=int(manifest["news_dim"]),
                         n_features=len(FEATURE_NAMES), map_location=map_location)
    with np.load(root / TABLES_FILE, allow_pickle=False) as npz:
        tables = NewsTables(**{k: npz[k].copy() for k in npz.files})
    if tables.vectors.shape[1] != model.news_dim:
        raise ArtifactError(f"{root / TABLES_FILE}: news vectors are {tables.vectors.shape[1]}-d, the "
                            f"re-ranker expects {model.news_dim}")
    return LoadedReranker(model=model, config=config, manifest=manifest, tables=tables,
                          device=torch.device(map_location))


def check_retriever(manifest: dict[str, Any], retriever_dir: str | Path, *, where: str) -> None:
    """Raise ArtifactError unless ``retriever_dir`` is the first stage named in ``manifest``."""
    expected = manifest["retriever"]["model_json_sha256"]
    got = retriever_fingerprint(retriever_dir)
    if got != expected:
        raise ArtifactError(f"{where}: this re-ranker was trained on the first-stage model at "
                            f"{manifest['retriever']['path']}, not on {retriever_dir} (model.json "
                            f"sha256 differs); pass that model or retrain with "
                            f"`newsrec train --stage rerank --retriever {retriever_dir}`")


# ------------------------------------------------------------------------------------------------
# whether to use it


def two_stage_decision(manifest: dict[str, Any], use: str) -> tuple[bool, str]:
    """(use the two-stage model?, one line saying why) for ``use`` in ``RERANK_USE``: ``never``
    and ``always`` force it; ``auto`` follows the guard recorded at training (the two-stage model
    against the first stage on the latest slice of the re-ranker's training log)."""
    if use not in RERANK_USE:
        raise ConfigError(f"rerank.use={use!r}: expected one of {', '.join(RERANK_USE)}")
    guard = manifest.get("guard") or {}
    if guard:
        f, t = guard["first_stage"], guard["two_stage"]
        seen = (f"on its held-out slice ({guard['impressions']} impressions): two-stage AUC "
                f"{t['auc']:.4f} vs first stage {f['auc']:.4f}, nDCG@10 {t['ndcg@10']:.4f} vs {f['ndcg@10']:.4f}")
        if "auc_se" in guard:  # paired gains with their standard errors (None: too few impressions)
            se = {k: "?" if guard[k] is None else f"{guard[k]:.4f}" for k in ("auc_se", "ndcg10_se")}
            seen += (f" (gains {guard['auc_gain']:+.4f} ± {se['auc_se']} AUC, "
                     f"{guard['ndcg10_gain']:+.4f} ± {se['ndcg10_se']} nDCG@10)")
    else:
        seen = "no guard recorded"
    if use == "never":
        return False, "re-ranker off (rerank.use=never): first stage only"
    if use == "always":
        return True, f"re-ranker on (rerank.use=always); {seen}"
    if guard.get("won"):
        return True, f"re-ranker on: it beat the first stage {seen}"
    return False, (f"re-ranker off: it did not beat the first stage {seen}; first stage only "
                   f"(force it with rerank.use=always)")


def open_two_stage(reranker_dir: str | Path, *, retriever_dir: str | Path, use: str | None = None,
                   map_location: str = "cpu") -> tuple["LoadedReranker | None", str]:
    """The re-ranker of ``reranker_dir`` when it is to be used, else None, and the one line saying
    why. ``use``: ``rerank.use`` (auto | always | never); None = the re-ranker's own config."""
    loaded = load_reranker(reranker_dir, retriever_dir=retriever_dir, map_location=map_location)
    on, why = two_stage_decision(loaded.manifest, use or loaded.config.rerank.use)
    return (loaded if on else None), why


# ------------------------------------------------------------------------------------------------
# scoring


@dataclass
class LoadedReranker:
    """A re-ranker ready to score: model in eval mode, its config, manifest and news tables."""

    model: Reranker
    config: Config
    manifest: dict[str, Any]
    tables: NewsTables
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def n_news(self) -> int:
        """Highest news_idx the re-ranker knows (artifact news plus fresh news added)."""
        return len(self.tables) - 1

    @property
    def mean_ctr(self) -> float:
        return float(self.manifest["mean_ctr"])

    @property
    def prior(self) -> float:
        return float(self.manifest["popularity_prior"])

    @property
    def history_len(self) -> int:
        """Most recent clicks the re-ranker reads: the same in training, evaluation and serving."""
        return self.config.rerank.history_len or self.config.data.history_len

    def log_end(self) -> float:
        """Seconds since the epoch of the last event of the log the tables count: the earliest
        moment ``rerank_many`` may score at."""
        return float(self.manifest["log_end"])

    def totals(self) -> LogTotals:
        return LogTotals(self.tables, self.mean_ctr)

    # ---- fresh news
    def add_news(self, news_idx: np.ndarray, vectors: np.ndarray, *, first_seen: float,
                 category_idx: np.ndarray | None = None, subcategory_idx: np.ndarray | None = None) -> None:
        """Register news that are not in the dataset artifact (added live by the service).

        news_idx int [M] (each > the artifact's n_news), vectors float32 [M, D] from the retriever's
        news encoder, category/subcategory int [M] (0 = unknown), first_seen: seconds since the
        epoch when they entered the pool (the service's clock). They have no clicks and no
        showings in the log (popularity = the prior mean).
        """
        news_idx = np.asarray(news_idx, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        base = int(self.manifest["n_news"])
        if news_idx.ndim != 1 or vectors.shape != (len(news_idx), self.model.news_dim):
            raise NewsrecError(f"add_news: expected news_idx [M] and vectors [M, {self.model.news_dim}], "
                               f"got {news_idx.shape} and {vectors.shape}")
        if len(news_idx) and news_idx.min() <= base:
            raise NewsrecError(f"add_news: fresh news need news_idx > {base} (the dataset's news); "
                               f"got {int(news_idx.min())}")
        if len(news_idx) == 0:
            return
        self.tables.grow(int(news_idx.max()) + 1)
        t = self.tables
        t.vectors[news_idx] = vectors
        t.clicks[news_idx] = 0
        t.impressions[news_idx] = 0
        t.displays[news_idx] = 0
        t.first_seen[news_idx] = float(first_seen)
        t.first_seen_known[news_idx] = True
        t.category[news_idx] = 0 if category_idx is None else np.asarray(category_idx, dtype=np.int64)
        t.subcategory[news_idx] = 0 if subcategory_idx is None else np.asarray(subcategory_idx, dtype=np.int64)

    def _check_idx(self, idx: np.ndarray, what: str) -> None:
        if idx.size and (idx.min() < 0 or idx.max() > self.n_news):
            raise NewsrecError(f"rerank: {what} news_idx {int(idx.max() if idx.max() > self.n_news else idx.min())} "
                               f"is unknown to the re-ranker (valid 1..{self.n_news}; add fresh news "
                               f"with add_news first)")

    def features_for(self, log: LogCounts, *, history_idx: np.ndarray, history_mask: np.ndarray,
                     candidate_idx: np.ndarray, retrieval_scores: np.ndarray, now_seconds: np.ndarray) -> np.ndarray:
        """``feature_rows`` over this re-ranker's tables: float32 [B, C, F]."""
        return feature_rows(log, self.tables, now_seconds=now_seconds, history_idx=history_idx,
                            history_mask=history_mask, candidate_idx=candidate_idx,
                            retrieval_scores=retrieval_scores, prior=self.prior)

    @torch.inference_mode()
    def score_batch(self, log: LogCounts, *, history_idx: np.ndarray, history_mask: np.ndarray,
                    candidate_idx: np.ndarray, retrieval_scores: np.ndarray, now_seconds: np.ndarray) -> np.ndarray:
        """Scores float32 [B, C] (arguments as in ``features_for``)."""
        feats = self.features_for(log, history_idx=history_idx, history_mask=history_mask,
                                  candidate_idx=candidate_idx, retrieval_scores=retrieval_scores,
                                  now_seconds=now_seconds)
        vecs = self.tables.vectors
        dev = self.device
        scores = self.model(torch.from_numpy(vecs[history_idx]).to(dev),
                            torch.from_numpy(history_mask).to(dev),
                            torch.from_numpy(vecs[candidate_idx]).to(dev),
                            torch.from_numpy(feats).to(dev))
        return scores.float().cpu().numpy()

    def rerank(self, history_idx: np.ndarray, candidate_idx: np.ndarray, retrieval_scores: np.ndarray,
               now: float | datetime | None = None) -> np.ndarray:
        """Two-stage scores float32 [C] for one user after the log (serving).

        history_idx int [N] (oldest first; the most recent ``history_len`` are read),
        candidate_idx int [C], retrieval_scores float [C] (the first stage's scores of those
        candidates), now: the request time (seconds since the epoch or a datetime; default and
        earliest: the log's end).
        """
        return self.rerank_many([history_idx], [candidate_idx], [retrieval_scores], [now])[0]

    def rerank_many(self, histories: list[np.ndarray], candidates: list[np.ndarray],
                    retrieval_scores: list[np.ndarray],
                    nows: list[float | datetime | None] | None = None) -> list[np.ndarray]:
        """``rerank`` for several users in one batched call (the service's concurrent requests):
        one list entry per user, each as in ``rerank``; returns float32 [C_b] per user. Histories
        and candidate lists of different lengths are right-padded; padding changes no score."""
        users = len(histories)
        nows = nows if nows is not None else [None] * users
        if not (len(candidates) == len(retrieval_scores) == len(nows) == users):
            raise NewsrecError("rerank: one history, candidate list, score list and time per user")
        clicks = Histories.of_lists(histories)
        cands = [np.asarray(c, dtype=np.int64).reshape(-1) for c in candidates]
        firsts = [np.asarray(r, dtype=np.float64).reshape(-1) for r in retrieval_scores]
        for cand, first in zip(cands, firsts):
            if first.shape != cand.shape:
                raise NewsrecError(f"rerank: {len(first)} retrieval scores for {len(cand)} candidates")
            self._check_idx(cand, "candidate")
        self._check_idx(clicks.recent(self.history_len).values, "history")
        end = self.log_end()
        now_s = np.array([end if now is None else to_seconds(now) for now in nows], dtype=np.float64)
        if (now_s < end).any():
            raise NewsrecError(f"rerank: a request time {_iso(float(now_s.min()))} is before the end of the "
                               f"re-ranker's log ({_iso(end)}); its counts would include later showings")
        if max((len(c) for c in cands), default=0) == 0:
            return [np.zeros(0, dtype=np.float32) for _ in range(users)]
        history_idx, history_mask = clicks.padded(history_len=self.history_len)
        candidate_idx = right_padded(cands, np.int64)  # padding: news 0, its scores dropped
        first_scores = right_padded(firsts, np.float64)
        scores = self.score_batch(self.totals(), history_idx=history_idx, history_mask=history_mask,
                                  candidate_idx=candidate_idx, retrieval_scores=first_scores, now_seconds=now_s)
        return [scores[b, :len(cand)] for b, cand in enumerate(cands)]

    def score_impressions(self, impressions: Impressions, *, retrieval_scores: np.ndarray, log: LogCounts,
                          batch_size: int | None = None, show_progress: bool = True) -> np.ndarray:
        """Two-stage scores of every candidate of ``impressions``, float32 aligned with
        ``impressions.candidates`` ([M], same shape as the first stage's scores).

        retrieval_scores: float [M], the first stage's scores of the same candidates. ``log``: what
        the log tells before each impression's own time (an ``EventLog``, e.g.
        ``EventLog.of_dataset``). Impressions are scored ``batch_size`` at a time (default
        ``rerank.eval_batch_size``), padded to the longest candidate list of the batch.
        """
        from newsrec.utils.progress import progress

        retrieval_scores = np.asarray(retrieval_scores, dtype=np.float64)
        if retrieval_scores.shape != impressions.candidates.shape:
            raise NewsrecError(f"score_impressions: {retrieval_scores.shape[0]} retrieval scores for "
                               f"{impressions.candidates.shape[0]} candidates")
        self._check_idx(impressions.candidates, "candidate")
        self._check_idx(impressions.history, "history")
        histories = Histories.of_impressions(impressions)
        batch_size = batch_size or self.config.rerank.eval_batch_size
        out = np.zeros(len(impressions.candidates), dtype=np.float32)
        now_all = datetime64_to_seconds(impressions.time)
        bar = progress(total=len(impressions), desc="re-ranking", unit="imp", disable=not show_progress or None)
        order = np.argsort(impressions.candidate_counts, kind="stable")  # similar lengths: little padding
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            hist_idx, hist_mask = histories.padded(rows, history_len=self.history_len)
            cand_idx, cand_mask, flat = padded_candidates(impressions, rows)
            ret = np.zeros(cand_idx.shape, dtype=np.float64)
            ret[cand_mask] = retrieval_scores[flat]
            scores = self.score_batch(log, history_idx=hist_idx, history_mask=hist_mask, candidate_idx=cand_idx,
                                      retrieval_scores=ret, now_seconds=now_all[rows])
            out[flat] = scores[cand_mask]
            bar.update(len(rows))
        bar.close()
        return out


# ------------------------------------------------------------------------------------------------
# two-stage scoring of impressions


def score_impressions_two_stage(retriever: Any, reranker: LoadedReranker, impressions: Impressions, *,
                                log: LogCounts, batch_size: int | None = None,
                                device: str | torch.device = "cpu", first_stage_scores: np.ndarray | None = None,
                                show_progress: bool = True) -> np.ndarray:
    """Two-stage scores of every candidate of ``impressions``: float32 [M] aligned with
    ``impressions.candidates`` (the same shape as the first stage's ``score_impressions``).

    retriever: the first stage (a ``LoadedModel``); its news vectors are the ones stored with the
    re-ranker (same model, checked by fingerprint on load). ``first_stage_scores`` [M] skips
    recomputing the first stage when the caller already has them. ``log``: as in
    ``LoadedReranker.score_impressions``.
    """
    from newsrec.inference.scoring import score_impressions

    batch = batch_size or reranker.config.rerank.eval_batch_size
    if first_stage_scores is None:
        vectors = torch.from_numpy(reranker.tables.vectors[:int(reranker.manifest["n_news"]) + 1])
        first_stage_scores = score_impressions(retriever.model, None, impressions,
                                               history_len=retriever.config.data.history_len,
                                               batch_size=batch * 4, device=device, news_vectors=vectors,
                                               show_progress=False)
    return reranker.score_impressions(impressions, retrieval_scores=first_stage_scores, log=log,
                                      batch_size=batch, show_progress=show_progress)


@dataclass
class TwoStageScores:
    """Scores float32 [M] of a split's candidates with the stages chosen, whether the re-ranker was
    used, and the one line saying why (see ``two_stage_decision``)."""

    scores: np.ndarray
    reranked: bool
    decision: str


def two_stage_scores(reranker_dir: str | Path, *, retriever_dir: str | Path, dataset: DatasetArtifact,
                     impressions: Impressions, first_stage_scores: np.ndarray, use: str | None = None,
                     device: str | torch.device = "cpu", show_progress: bool = True) -> TwoStageScores:
    """Two-stage scores of a dataset split's impressions — the re-ranker of ``reranker_dir``,
    trained on the first stage of ``retriever_dir``, given that stage's scores [M] and the dataset's
    log before each impression — where ``use`` (``rerank.use``: auto | always | never; None = the
    re-ranker's own config) allows; else the first stage's scores unchanged. ``evaluate`` and
    ``submit`` both call this."""
    loaded, why = open_two_stage(reranker_dir, retriever_dir=retriever_dir, use=use, map_location=str(device))
    if loaded is None:
        return TwoStageScores(np.asarray(first_stage_scores, dtype=np.float32), False, why)
    scores = score_impressions_two_stage(
        None, loaded, impressions, first_stage_scores=first_stage_scores, device=device,
        log=EventLog.of_dataset(dataset, {impressions.split: impressions}), show_progress=show_progress)
    return TwoStageScores(scores, True, why)


def to_seconds(when: float | datetime) -> float:
    """Seconds since the epoch of a datetime (naive = UTC, as dataset times are) or a number."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    return float(when)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")
