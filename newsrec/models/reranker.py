"""The second stage: a candidate-aware Fastformer re-ranker over retrieved candidates.

Inputs are the *frozen* first-stage news vectors (the retriever's news encoder, ``D`` wide), so the
re-ranker never encodes text and is cheap at serve time. For each (user, candidate) pair:

1. tokens: the candidate ``c`` and each clicked news ``x_n`` of the history are projected to the
   re-ranker width ``d``; each history token is read *in the light of the candidate*:
   ``t_n = W_h x_n + W_c c + (W_h' x_n) ⊙ (W_c' c)``, and the candidate token ``W_k c`` is put in
   front of the history, so the Fastformer's additive attention that forms the global query is
   seeded by the candidate and weighs each click by its relation to the candidate.
2. ``FastformerAttention`` layers (``newsrec.models.fastformer.LayerStack``) over the N + 1 tokens,
   then additive-attention pooling → a candidate-aware user vector ``u_c [d]``. Cost is linear in N.
3. A small MLP over ``[u_c, c', u_c ⊙ c', features]`` gives a correction added to the first-stage
   score: ``score = a · retrieval_score + MLP(...)`` with ``a`` starting at 1 and the MLP's last
   layer at 0, so an untrained re-ranker ranks exactly as the first stage.

Features per candidate (``FEATURE_NAMES``, normalised inside the model by statistics of the
training set): the first-stage score, popularity (shrunk click-through, as a logit offset from the
mean, and the log of its impression count — see ``newsrec.data.popularity``), freshness (log hours
since the news entered the pool, and whether that time is known), the share of the history in the
candidate's category and subcategory, and the log history length.

A re-ranker directory (``save_reranker``)::

    config.yaml           the resolved config it was trained with
    reranker.safetensors  weights (no pickle)
    reranker.json         schema version, the retriever it belongs to (its model.json sha256), the
                          dataset (manifest sha256), feature names, mean click-through, reference time
    news_tables.npz       per news_idx: frozen first-stage vectors, train clicks/impressions,
                          first-seen seconds, category/subcategory
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from newsrec.config import Config, RerankConfig, config_from_yaml_text
from newsrec.data.popularity import shrunk_ctr
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.models.attention import AdditivePooling
from newsrec.models.fastformer import LayerStack
from newsrec.utils.io import atomic_dir, read_json, sha256_file, write_json

RERANKER_SCHEMA_VERSION = 1
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "reranker.safetensors"
MANIFEST_FILE = "reranker.json"
TABLES_FILE = "news_tables.npz"
RETRIEVER_MANIFEST = "model.json"  # the first-stage model directory's manifest

FEATURE_NAMES = (
    "retrieval_score",
    "popularity_logit",
    "log_impressions",
    "log_age_hours",
    "age_unknown",
    "category_share",
    "subcategory_share",
    "log_history_len",
)
RETRIEVAL_FEATURE = 0
MAX_AGE_HOURS = 24.0 * 30  # ages beyond a month (and unknown ages) are clipped here


# ------------------------------------------------------------------------------------------------
# features


@dataclass
class NewsTables:
    """What the re-ranker knows about each news, indexed by news_idx (row 0 = padding news).

    vectors: float32 [n, D] frozen first-stage news vectors; clicks, impressions: int64 [n] counts
    popularity is computed from; first_seen: float64 [n] seconds since the epoch when the news
    entered the pool; first_seen_known: bool [n]; category, subcategory: int64 [n].
    """

    vectors: np.ndarray
    clicks: np.ndarray
    impressions: np.ndarray
    first_seen: np.ndarray
    first_seen_known: np.ndarray
    category: np.ndarray
    subcategory: np.ndarray

    def __len__(self) -> int:
        return len(self.vectors)

    def grow(self, size: int) -> None:
        """Extend every table to ``size`` rows (new rows: zero vectors, no counts, unknown age)."""
        extra = size - len(self)
        if extra <= 0:
            return
        self.vectors = np.concatenate([self.vectors, np.zeros((extra, self.vectors.shape[1]), np.float32)])
        for name in ("clicks", "impressions", "first_seen", "first_seen_known", "category", "subcategory"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.zeros(extra, dtype=arr.dtype)]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in
                ("vectors", "clicks", "impressions", "first_seen", "first_seen_known", "category",
                 "subcategory")}


def build_features(*, retrieval_scores: np.ndarray, clicks: np.ndarray, impressions: np.ndarray,
                   age_seconds: np.ndarray, age_known: np.ndarray, candidate_category: np.ndarray,
                   candidate_subcategory: np.ndarray, history_category: np.ndarray,
                   history_subcategory: np.ndarray, history_mask: np.ndarray, prior: float,
                   mean_ctr: float) -> np.ndarray:
    """Candidate features, float32 ``[B, C, F]`` in the order of ``FEATURE_NAMES``.

    Per candidate ``[B, C]``: retrieval_scores, clicks / impressions (counts the popularity is
    shrunk from), age_seconds (now − first seen), age_known (bool), candidate_(sub)category.
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
    columns = [retrieval_scores, popularity_logit, np.log1p(impressions), np.log1p(age_hours),
               (~np.asarray(age_known, dtype=bool)).astype(np.float64), category_share,
               subcategory_share, log_hist]
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# the model


class Reranker(nn.Module):
    """Candidate-aware Fastformer re-ranker over frozen first-stage news vectors.

    ``forward(history_vectors [B, N, D], history_mask [B, N] bool, candidate_vectors [B, C, D],
    features [B, C, F]) -> scores [B, C]``. Padding clicks (mask False) change nothing; a history
    with no click is valid.
    """

    def __init__(self, cfg: RerankConfig, *, news_dim: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        n_features = len(FEATURE_NAMES)
        self.news_dim = news_dim
        self.history_proj = nn.Linear(news_dim, d)  # W_h
        self.candidate_proj = nn.Linear(news_dim, d)  # W_c
        self.history_gate = nn.Linear(news_dim, d)  # W_h'
        self.candidate_gate = nn.Linear(news_dim, d)  # W_c'
        self.candidate_token = nn.Linear(news_dim, d)  # W_k: the token seeding the global query
        self.layers = LayerStack(kind="fastformer", in_dim=d, hidden_size=d, num_heads=cfg.num_heads,
                                 num_layers=cfg.num_layers, dropout=cfg.dropout)
        self.pooling = AdditivePooling(d, d)
        self.head = nn.Sequential(nn.Linear(3 * d + n_features, d), nn.GELU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(d, 1))
        self.retrieval_weight = nn.Parameter(torch.ones(()))
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head[-1].weight)  # start as the first stage: score = retrieval score

    def set_feature_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Normalisation of the features (float [F] each), from the training samples."""
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def user_vectors(self, history_vectors: Tensor, history_mask: Tensor, candidate_vectors: Tensor) -> Tensor:
        """Candidate-aware user vectors: one per (user, candidate) pair.

        history_vectors [B, N, D], history_mask [B, N], candidate_vectors [B, C, D] → [B, C, d].
        """
        b, n, _ = history_vectors.shape
        c = candidate_vectors.shape[1]
        hist = self.history_proj(history_vectors)  # (B, N, d)
        hist_gate = self.history_gate(history_vectors)  # (B, N, d)
        cand = self.candidate_proj(candidate_vectors)  # (B, C, d)
        cand_gate = self.candidate_gate(candidate_vectors)  # (B, C, d)
        tokens = hist[:, None] + cand[:, :, None] + hist_gate[:, None] * cand_gate[:, :, None]  # (B, C, N, d)
        seed = self.candidate_token(candidate_vectors)[:, :, None]  # (B, C, 1, d)
        tokens = torch.cat([seed, tokens], dim=2).reshape(b * c, n + 1, -1)  # (B·C, N+1, d)
        mask = torch.cat([history_mask.new_ones(b, 1), history_mask], dim=1)  # (B, N+1)
        mask = mask[:, None].expand(b, c, n + 1).reshape(b * c, n + 1)
        out = self.layers(tokens, mask)  # (B·C, N+1, d)
        return self.pooling(out, mask).view(b, c, -1)  # (B, C, d)

    def forward(self, history_vectors: Tensor, history_mask: Tensor, candidate_vectors: Tensor,
                features: Tensor) -> Tensor:
        users = self.user_vectors(history_vectors, history_mask, candidate_vectors)  # (B, C, d)
        cand = self.candidate_proj(candidate_vectors)  # (B, C, d)
        normed = (features - self.feature_mean) / self.feature_std  # (B, C, F)
        correction = self.head(torch.cat([users, cand, users * cand, normed], dim=-1)).squeeze(-1)
        return self.retrieval_weight * features[..., RETRIEVAL_FEATURE] + correction  # (B, C)


# ------------------------------------------------------------------------------------------------
# save / load


def retriever_fingerprint(retriever_dir: str | Path) -> str:
    """sha256 of the first-stage model's ``model.json`` (names that exact model)."""
    path = Path(retriever_dir) / RETRIEVER_MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{retriever_dir}: not a model directory (no {RETRIEVER_MANIFEST}); "
                            f"train one with `newsrec train`")
    return sha256_file(path)


def save_reranker(out_dir: str | Path, model: Reranker, config: Config, *, retriever_dir: str | Path,
                  dataset_root: str | Path, dataset_manifest_sha256: str, tables: NewsTables,
                  mean_ctr: float, reference_time: float, extra: dict[str, Any] | None = None) -> Path:
    """Write a re-ranker directory atomically (layout in the module docstring)."""
    manifest = {
        "schema_version": RERANKER_SCHEMA_VERSION,
        "kind": "newsrec-reranker",
        "retriever": {"path": str(Path(retriever_dir).resolve()),
                      "model_json_sha256": retriever_fingerprint(retriever_dir)},
        "dataset": {"path": str(Path(dataset_root).resolve()), "manifest_sha256": dataset_manifest_sha256},
        "news_dim": model.news_dim,
        "n_news": len(tables) - 1,
        "features": list(FEATURE_NAMES),
        "mean_ctr": float(mean_ctr),
        "popularity_prior": float(config.rerank.popularity_prior),
        "reference_time": float(reference_time),
        **(extra or {}),
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / WEIGHTS_FILE))
        np.savez(tmp / TABLES_FILE, **tables.arrays())
        write_json(tmp / MANIFEST_FILE, manifest)
    return Path(out_dir)


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
    def history_len(self) -> int:
        return self.config.rerank.history_len or self.config.data.history_len

    def reference_now(self) -> float:
        """Seconds since the epoch used as "now" when none is given: the latest moment the training
        data knows (the last time a news entered the pool)."""
        return float(self.manifest["reference_time"])

    # ---- fresh news
    def add_news(self, news_idx: np.ndarray, vectors: np.ndarray, *, category_idx: np.ndarray | None = None,
                 subcategory_idx: np.ndarray | None = None, first_seen: datetime | None = None) -> None:
        """Register news that are not in the dataset artifact (added live by the service).

        news_idx int [M] (each > the artifact's n_news), vectors float32 [M, D] from the retriever's
        news encoder, category/subcategory int [M] (0 = unknown). They get no clicks (popularity =
        the prior mean) and entered the pool at ``first_seen`` (default: the reference now).
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
        seen = self.reference_now() if first_seen is None else _to_seconds(first_seen)
        t = self.tables
        t.vectors[news_idx] = vectors
        t.clicks[news_idx] = 0
        t.impressions[news_idx] = 0
        t.first_seen[news_idx] = seen
        t.first_seen_known[news_idx] = True
        t.category[news_idx] = 0 if category_idx is None else np.asarray(category_idx, dtype=np.int64)
        t.subcategory[news_idx] = 0 if subcategory_idx is None else np.asarray(subcategory_idx, dtype=np.int64)

    # ---- scoring
    def _check_idx(self, idx: np.ndarray, what: str) -> None:
        if idx.size and (idx.min() < 0 or idx.max() > self.n_news):
            raise NewsrecError(f"rerank: {what} news_idx {int(idx.max() if idx.max() > self.n_news else idx.min())} "
                               f"is unknown to the re-ranker (valid 1..{self.n_news}; add fresh news "
                               f"with add_news first)")

    def features_for(self, *, history_idx: np.ndarray, history_mask: np.ndarray, candidate_idx: np.ndarray,
                     retrieval_scores: np.ndarray, now_seconds: np.ndarray) -> np.ndarray:
        """Features float32 [B, C, F] for histories int [B, N] (mask [B, N]), candidates int [B, C],
        retrieval scores [B, C] and "now" per user (seconds since the epoch, [B])."""
        t = self.tables
        age = now_seconds[:, None] - t.first_seen[candidate_idx]
        return build_features(
            retrieval_scores=retrieval_scores, clicks=t.clicks[candidate_idx],
            impressions=t.impressions[candidate_idx], age_seconds=age,
            age_known=t.first_seen_known[candidate_idx], candidate_category=t.category[candidate_idx],
            candidate_subcategory=t.subcategory[candidate_idx], history_category=t.category[history_idx],
            history_subcategory=t.subcategory[history_idx], history_mask=history_mask,
            prior=float(self.manifest["popularity_prior"]), mean_ctr=self.mean_ctr)

    @torch.inference_mode()
    def score_batch(self, *, history_idx: np.ndarray, history_mask: np.ndarray, candidate_idx: np.ndarray,
                    retrieval_scores: np.ndarray, now_seconds: np.ndarray) -> np.ndarray:
        """Scores float32 [B, C] (shapes as in ``features_for``)."""
        feats = self.features_for(history_idx=history_idx, history_mask=history_mask,
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
               now: datetime | None = None) -> np.ndarray:
        """Two-stage scores float32 [C] for one user.

        history_idx int [N] (oldest first; the most recent ``history_len`` are used),
        candidate_idx int [C], retrieval_scores float [C] (the first stage's scores of those
        candidates), now: the request time (default: the reference now, see ``reference_now``).
        """
        history_idx = np.asarray(history_idx, dtype=np.int64).reshape(-1)[-self.history_len:]
        candidate_idx = np.asarray(candidate_idx, dtype=np.int64).reshape(-1)
        retrieval_scores = np.asarray(retrieval_scores, dtype=np.float64).reshape(-1)
        if retrieval_scores.shape != candidate_idx.shape:
            raise NewsrecError(f"rerank: {len(retrieval_scores)} retrieval scores for "
                               f"{len(candidate_idx)} candidates")
        self._check_idx(history_idx, "history")
        self._check_idx(candidate_idx, "candidate")
        now_s = self.reference_now() if now is None else _to_seconds(now)
        hist = history_idx if len(history_idx) else np.zeros(1, dtype=np.int64)
        mask = (hist > 0)[None]
        if len(candidate_idx) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.score_batch(history_idx=hist[None], history_mask=mask, candidate_idx=candidate_idx[None],
                                retrieval_scores=retrieval_scores[None], now_seconds=np.array([now_s]))[0]

    def score_impressions(self, impressions: Any, *, retrieval_scores: np.ndarray, batch_size: int = 256,
                          show_progress: bool = True) -> np.ndarray:
        """Two-stage scores of every candidate of ``impressions`` (an ``Impressions``), float32
        aligned with ``impressions.candidates`` ([M], same shape as the first stage's scores).

        retrieval_scores: float [M], the first stage's scores of the same candidates. "Now" of each
        impression is its own time. Impressions are scored ``batch_size`` at a time, padded to the
        longest candidate list of the batch.
        """
        from newsrec.utils.progress import progress

        retrieval_scores = np.asarray(retrieval_scores, dtype=np.float64)
        if retrieval_scores.shape != impressions.candidates.shape:
            raise NewsrecError(f"score_impressions: {retrieval_scores.shape[0]} retrieval scores for "
                               f"{impressions.candidates.shape[0]} candidates")
        self._check_idx(impressions.candidates, "candidate")
        self._check_idx(impressions.history, "history")
        out = np.zeros(len(impressions.candidates), dtype=np.float32)
        now_all = impressions.time.astype("datetime64[us]").astype(np.int64) / 1e6
        counts = impressions.candidate_counts
        bar = progress(total=len(impressions), desc="re-ranking", unit="imp", disable=not show_progress or None)
        # sort by candidate count so padding stays small
        order = np.argsort(counts, kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            hist_idx, hist_mask = padded_histories(impressions, rows, max_len=self.history_len)
            cand_idx, cand_mask, flat = padded_candidates(impressions, rows)
            ret = np.zeros(cand_idx.shape, dtype=np.float64)
            ret[cand_mask] = retrieval_scores[flat]
            scores = self.score_batch(history_idx=hist_idx, history_mask=hist_mask, candidate_idx=cand_idx,
                                      retrieval_scores=ret, now_seconds=now_all[rows])
            out[flat] = scores[cand_mask]
            bar.update(len(rows))
        bar.close()
        return out


def padded_histories(impressions: Any, rows: np.ndarray, *, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Most recent ``max_len`` clicks of each impression in ``rows``, right-padded with 0.

    Returns (history_idx int64 [B, N], mask bool [B, N]) with N = the longest kept history (≥ 1).
    """
    starts = impressions.history_offsets[rows]
    ends = impressions.history_offsets[rows + 1]
    starts = np.maximum(starts, ends - max_len)
    lengths = ends - starts
    width = max(int(lengths.max()) if len(rows) else 0, 1)
    pos = np.arange(width)
    mask = pos[None, :] < lengths[:, None]
    hist = np.zeros(mask.shape, dtype=np.int64)
    hist[mask] = impressions.history[(starts[:, None] + pos[None, :])[mask]]
    return hist, mask


def padded_candidates(impressions: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def load_reranker(reranker_dir: str | Path, *, retriever_dir: str | Path | None = None,
                  map_location: str = "cpu") -> LoadedReranker:
    """Open a re-ranker directory. With ``retriever_dir``, refuse it unless it is the exact
    first-stage model the re-ranker was trained on (same model.json sha256)."""
    root = Path(reranker_dir)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: not a re-ranker directory (no {MANIFEST_FILE}); train one with "
                            f"`newsrec train --stage rerank --retriever MODEL_DIR`")
    manifest = read_json(manifest_path)
    if manifest.get("schema_version") != RERANKER_SCHEMA_VERSION or manifest.get("kind") != "newsrec-reranker":
        raise ArtifactError(f"{manifest_path}: re-ranker schema version {manifest.get('schema_version')}, "
                            f"this newsrec reads {RERANKER_SCHEMA_VERSION}; retrain the re-ranker")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TABLES_FILE):
        if not (root / name).is_file():
            raise ArtifactError(f"{root}: incomplete re-ranker directory, {name} is missing")
    if retriever_dir is not None:
        check_retriever(manifest, retriever_dir, where=str(root))
    if list(manifest.get("features", [])) != list(FEATURE_NAMES):
        raise ArtifactError(f"{manifest_path}: features {manifest.get('features')} differ from this "
                            f"newsrec's {list(FEATURE_NAMES)}; retrain the re-ranker")
    config = config_from_yaml_text((root / CONFIG_FILE).read_text(encoding="utf-8"))
    model = Reranker(config.rerank, news_dim=int(manifest["news_dim"]))
    state = load_file(str(root / WEIGHTS_FILE), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{root / WEIGHTS_FILE}: weights do not fit the configured re-ranker "
                            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.to(map_location).eval()
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


def _to_seconds(when: datetime) -> float:
    if when.tzinfo is None:  # dataset times are naive UTC
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
