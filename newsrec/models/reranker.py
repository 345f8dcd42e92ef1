"""The second stage: a candidate-aware Fastformer re-ranker over retrieved candidates.

Inputs are the *frozen* first-stage news vectors (the retriever's news encoder, ``D`` wide), so the
re-ranker never encodes text and is cheap at serve time. For each (user, candidate) pair:

1. the clicked news ``x_n`` and the candidate ``c`` are projected to the re-ranker width ``d``
   (optionally ``num_layers - 1`` plain Fastformer layers read the history first, once per user);
2. ``CandidateSeededFastformer`` reads the history in the light of the candidate: the additive
   attention that forms Fastformer's global query is seeded by the candidate (it weighs each click
   by its relation to the candidate), the global key follows from it as in Fastformer, and the
   outputs are pooled by an attention also seeded by the candidate → a candidate-aware user vector
   ``u_c [d]``. The history is projected once per user and never repeated per candidate: the cost
   is O(N·d² + C·d² + C·N·d) for N clicks and C candidates;
3. a small MLP over ``[u_c, c', u_c ⊙ c', features]`` gives a correction added to the first-stage
   score: ``score = a · retrieval_score + MLP(...)`` with ``a`` starting at 1 and the MLP's last
   layer at 0, so an untrained re-ranker ranks exactly as the first stage.

Features per candidate (``FEATURE_NAMES``, normalised inside the model by statistics of the
training set): the first-stage score; popularity (shrunk click-through from labelled past
impressions, as a logit offset from the mean, and the log of its impression count — see
``newsrec.data.popularity``); exposure (how often the news was shown before now, in any log — no
label needed, so cold news have it too — and that count per hour in the pool); freshness (log
hours since the news entered the pool, and whether that time is known); the share of the history in
the candidate's category and subcategory; the log history length.

A re-ranker directory (``save_reranker``)::

    config.yaml           the resolved config it was trained with
    reranker.safetensors  weights (no pickle)
    reranker.json         schema version, the retriever it belongs to (its model.json sha256), the
                          dataset (manifest sha256), feature names, mean click-through, reference time
    news_tables.npz       per news_idx: frozen first-stage vectors, train clicks/impressions,
                          showings over every split, first-seen seconds, category/subcategory
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
from newsrec.data.popularity import datetime64_to_seconds, shrunk_ctr
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.models.fastformer import LayerStack
from newsrec.utils.io import atomic_dir, read_manifest, sha256_file, write_json

RERANKER_SCHEMA_VERSION = 2
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "reranker.safetensors"
MANIFEST_FILE = "reranker.json"
TABLES_FILE = "news_tables.npz"
RETRIEVER_MANIFEST = "model.json"  # the first-stage model directory's manifest

FEATURE_NAMES = (
    "retrieval_score",
    "popularity_logit",
    "log_impressions",
    "log_exposure",
    "log_exposure_rate",
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

    vectors: float32 [n, D] frozen first-stage news vectors; clicks, impressions: int64 [n] train
    counts popularity is computed from; displays: int64 [n] showings in every split of the dataset
    (no labels needed: the exposure of a news when serving after those logs); first_seen: float64
    [n] seconds since the epoch when the news entered the pool; first_seen_known: bool [n];
    category, subcategory: int64 [n].
    """

    vectors: np.ndarray
    clicks: np.ndarray
    impressions: np.ndarray
    displays: np.ndarray
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
        for name in ("clicks", "impressions", "displays", "first_seen", "first_seen_known", "category",
                     "subcategory"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.zeros(extra, dtype=arr.dtype)]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in
                ("vectors", "clicks", "impressions", "displays", "first_seen", "first_seen_known",
                 "category", "subcategory")}


def build_features(*, retrieval_scores: np.ndarray, clicks: np.ndarray, impressions: np.ndarray,
                   exposure: np.ndarray, age_seconds: np.ndarray, age_known: np.ndarray,
                   candidate_category: np.ndarray,
                   candidate_subcategory: np.ndarray, history_category: np.ndarray,
                   history_subcategory: np.ndarray, history_mask: np.ndarray, prior: float,
                   mean_ctr: float) -> np.ndarray:
    """Candidate features, float32 ``[B, C, F]`` in the order of ``FEATURE_NAMES``.

    Per candidate ``[B, C]``: retrieval_scores, clicks / impressions (labelled counts the popularity
    is shrunk from), exposure (showings before now in any log, labelled or not), age_seconds (now −
    first seen), age_known (bool), candidate_(sub)category.
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
    exposure = np.asarray(exposure, dtype=np.float64)
    exposure_rate = exposure / np.maximum(age_hours, 1.0)  # showings per hour in the pool
    columns = [retrieval_scores, popularity_logit, np.log1p(impressions), np.log1p(exposure),
               np.log1p(exposure_rate), np.log1p(age_hours),
               (~np.asarray(age_known, dtype=bool)).astype(np.float64), category_share,
               subcategory_share, log_hist]
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# the model


class CandidateSeededFastformer(nn.Module):
    """A Fastformer layer over a user's history, read once per candidate, without repeating the
    history per candidate.

    For history tokens ``x_n [B, N, d]`` (mask ``[B, N]``) and candidate tokens ``y_c [B, C, d]``,
    H heads of size ``e = d / H``:

    1. ``Q = x W_q``, ``K = x W_k``, ``V = x W_v`` — once per user, not per candidate.
    2. Global query seeded by the candidate: ``α_{c,n} = softmax_n(Q_n · (w_α + S_α y_c) / √e)``
       per head, ``g_c = Σ_n α_{c,n} Q_n``.
    3. Global key as in Fastformer: ``β_{c,n} = softmax_n((g_c ⊙ K_n) · w_β / √e)``,
       ``k_c = Σ_n β_{c,n} (g_c ⊙ K_n) = g_c ⊙ Σ_n β_{c,n} K_n``.
    4. Per-position outputs ``o_{c,n} = W_o (k_c ⊙ V_n) + Q_n``, pooled by attention whose query is
       also seeded by the candidate: ``γ_{c,n} = softmax_n(o_{c,n} · r_c / √d)``,
       ``r_c = w_γ + S_γ y_c``. ``o`` is linear in ``V_n`` and ``Q_n``, so the scores are
       ``V_n · (k_c ⊙ W_oᵀ r_c) + Q_n · r_c`` (the bias term is constant over n and drops out) and
       ``u_c = W_o (k_c ⊙ Σ γ V_n) + b_o + Σ γ Q_n`` — the ``[B, C, N, d]`` tensor is never formed.

    Output: a candidate-aware user vector ``u_c [B, C, d]``. Cost O(N·d² + C·d² + C·N·d) per user
    instead of O(C·N·d²) for a Fastformer run per candidate. Padded clicks get weight exactly 0; a
    history without clicks gives ``u_c = b_o``.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        d = hidden_size
        self.num_heads = num_heads
        self.head_dim = d // num_heads
        self.query = nn.Linear(d, d)  # W_q
        self.key = nn.Linear(d, d)  # W_k
        self.value = nn.Linear(d, d)  # W_v
        self.output = nn.Linear(d, d)  # W_o
        self.query_score = nn.Parameter(torch.zeros(d))  # w_α (per head: its e entries)
        self.key_score = nn.Parameter(torch.zeros(d))  # w_β
        self.pool_score = nn.Parameter(torch.zeros(d))  # w_γ
        self.query_seed = nn.Linear(d, d)  # S_α
        self.pool_seed = nn.Linear(d, d)  # S_γ

    def forward(self, x: Tensor, mask: Tensor, y: Tensor) -> Tensor:
        b, n, d = x.shape
        c = y.shape[1]
        h, e = self.num_heads, self.head_dim
        keep = mask[:, None, None, :]  # (B, 1, 1, N)
        q = self.query(x).view(b, n, h, e)
        k = self.key(x).view(b, n, h, e)
        v = self.value(x)  # (B, N, d)
        seed = (self.query_score + self.query_seed(y)).view(b, c, h, e)  # (B, C, H, e)
        alpha = _softmax_n(torch.einsum("bnhe,bche->bchn", q, seed) / math.sqrt(e), keep)
        g = torch.einsum("bchn,bnhe->bche", alpha, q)  # global query per candidate (B, C, H, e)
        beta = _softmax_n(torch.einsum("bnhe,bche->bchn", k, g * self.key_score.view(h, e))
                          / math.sqrt(e), keep)
        gk = g * torch.einsum("bchn,bnhe->bche", beta, k)  # global key (B, C, H, e)
        gk = gk.reshape(b, c, d)
        r = self.pool_score + self.pool_seed(y)  # (B, C, d)
        through_output = gk * (r @ self.output.weight)  # k_c ⊙ W_oᵀ r_c  (B, C, d)
        scores = (torch.bmm(through_output, v.transpose(1, 2))
                  + torch.bmm(r, q.reshape(b, n, d).transpose(1, 2))) / math.sqrt(d)  # (B, C, N)
        gamma = _softmax_n(scores, mask[:, None, :])  # (B, C, N)
        pooled_v = torch.bmm(gamma, v)  # (B, C, d)
        pooled_q = torch.bmm(gamma, q.reshape(b, n, d))
        return self.output(gk * pooled_v) + pooled_q


def _softmax_n(scores: Tensor, keep: Tensor) -> Tensor:
    """Softmax over the last axis with padded positions (``keep`` False, broadcastable) at weight
    exactly 0; a row with no real position gets all zeros."""
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * keep.to(scores.dtype)


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
        self.history_proj = nn.Linear(news_dim, d)
        self.candidate_proj = nn.Linear(news_dim, d)
        # layers before the last read the history alone (once per user); the last one per candidate
        self.history_layers = (LayerStack(kind="fastformer", in_dim=d, hidden_size=d, num_heads=cfg.num_heads,
                                          num_layers=cfg.num_layers - 1, dropout=cfg.dropout)
                               if cfg.num_layers > 1 else None)
        self.seeded = CandidateSeededFastformer(d, cfg.num_heads)
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

    def user_vectors(self, history_vectors: Tensor, history_mask: Tensor,
                     candidate_vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Candidate-aware user vectors [B, C, d] (one per user and candidate) and the projected
        candidates [B, C, d], for history_vectors [B, N, D], history_mask [B, N] and
        candidate_vectors [B, C, D]."""
        hist = self.history_proj(history_vectors)  # (B, N, d)
        if self.history_layers is not None:
            hist = self.history_layers(hist, history_mask)
        cand = self.candidate_proj(candidate_vectors)  # (B, C, d)
        return self.seeded(hist, history_mask, cand), cand

    def forward(self, history_vectors: Tensor, history_mask: Tensor, candidate_vectors: Tensor,
                features: Tensor) -> Tensor:
        users, cand = self.user_vectors(history_vectors, history_mask, candidate_vectors)  # (B, C, d) each
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
        t.displays[news_idx] = 0
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
                     retrieval_scores: np.ndarray, now_seconds: np.ndarray,
                     exposure: np.ndarray | None = None) -> np.ndarray:
        """Features float32 [B, C, F] for histories int [B, N] (mask [B, N]), candidates int [B, C],
        retrieval scores [B, C] and "now" per user (seconds since the epoch, [B]). ``exposure``
        [B, C]: showings of each candidate before now; default: every showing in the dataset's
        logs (serving, after them)."""
        t = self.tables
        age = now_seconds[:, None] - t.first_seen[candidate_idx]
        if exposure is None:
            exposure = t.displays[candidate_idx]
        return build_features(
            retrieval_scores=retrieval_scores, clicks=t.clicks[candidate_idx],
            impressions=t.impressions[candidate_idx], exposure=exposure, age_seconds=age,
            age_known=t.first_seen_known[candidate_idx], candidate_category=t.category[candidate_idx],
            candidate_subcategory=t.subcategory[candidate_idx], history_category=t.category[history_idx],
            history_subcategory=t.subcategory[history_idx], history_mask=history_mask,
            prior=float(self.manifest["popularity_prior"]), mean_ctr=self.mean_ctr)

    @torch.inference_mode()
    def score_batch(self, *, history_idx: np.ndarray, history_mask: np.ndarray, candidate_idx: np.ndarray,
                    retrieval_scores: np.ndarray, now_seconds: np.ndarray,
                    exposure: np.ndarray | None = None) -> np.ndarray:
        """Scores float32 [B, C] (arguments as in ``features_for``)."""
        feats = self.features_for(history_idx=history_idx, history_mask=history_mask,
                                  candidate_idx=candidate_idx, retrieval_scores=retrieval_scores,
                                  now_seconds=now_seconds, exposure=exposure)
        vecs = self.tables.vectors
        dev = self.device
        scores = self.model(torch.from_numpy(vecs[history_idx]).to(dev),
                            torch.from_numpy(history_mask).to(dev),
                            torch.from_numpy(vecs[candidate_idx]).to(dev),
                            torch.from_numpy(feats).to(dev))
        return scores.float().cpu().numpy()

    def rerank(self, history_idx: np.ndarray, candidate_idx: np.ndarray, retrieval_scores: np.ndarray,
               now: datetime | None = None, exposure: np.ndarray | None = None) -> np.ndarray:
        """Two-stage scores float32 [C] for one user.

        history_idx int [N] (oldest first; the most recent ``history_len`` are used),
        candidate_idx int [C], retrieval_scores float [C] (the first stage's scores of those
        candidates), now: the request time (default: the reference now, see ``reference_now``),
        exposure int [C]: showings of each candidate so far (default: all showings in the dataset's
        logs, which serving comes after).
        """
        return self.rerank_many([history_idx], [candidate_idx], [retrieval_scores], [now],
                                None if exposure is None else [exposure])[0]

    def rerank_many(self, histories: list[np.ndarray], candidates: list[np.ndarray],
                    retrieval_scores: list[np.ndarray], nows: list[datetime | None] | None = None,
                    exposures: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """``rerank`` for several users in one batched call (the service's concurrent requests):
        one list entry per user, each as in ``rerank``; returns float32 [C_b] per user. Histories
        and candidate lists of different lengths are right-padded; padding changes no score."""
        users = len(histories)
        nows = nows if nows is not None else [None] * users
        if not (len(candidates) == len(retrieval_scores) == len(nows) == users) or (
                exposures is not None and len(exposures) != users):
            raise NewsrecError("rerank: one history, candidate list, score list and time per user")
        hists = [np.asarray(h, dtype=np.int64).reshape(-1)[-self.history_len:] for h in histories]
        cands = [np.asarray(c, dtype=np.int64).reshape(-1) for c in candidates]
        firsts = [np.asarray(r, dtype=np.float64).reshape(-1) for r in retrieval_scores]
        for hist, cand, first in zip(hists, cands, firsts):
            if first.shape != cand.shape:
                raise NewsrecError(f"rerank: {len(first)} retrieval scores for {len(cand)} candidates")
            self._check_idx(hist, "history")
            self._check_idx(cand, "candidate")
        if max((len(c) for c in cands), default=0) == 0:
            return [np.zeros(0, dtype=np.float32) for _ in range(users)]
        history_idx = right_padded(hists, np.int64, min_width=1)
        candidate_idx = right_padded(cands, np.int64)  # padding: news 0, its scores dropped
        first_scores = right_padded(firsts, np.float64)
        shown = (None if exposures is None else
                 right_padded([np.asarray(e).reshape(-1) for e in exposures], np.int64))
        now_s = np.array([self.reference_now() if now is None else _to_seconds(now) for now in nows])
        scores = self.score_batch(history_idx=history_idx, history_mask=history_idx > 0,
                                  candidate_idx=candidate_idx, retrieval_scores=first_scores,
                                  now_seconds=now_s, exposure=shown)
        return [scores[b, :len(cand)] for b, cand in enumerate(cands)]

    def exposure_counter(self, impressions: Any) -> Any:
        """``exposure(news_idx [B, C], now_seconds [B]) -> int64 [B, C]``: showings of each news
        before each moment, for scoring ``impressions`` (an ``Impressions``) — the showings of the
        train split (all before any other split) plus those of ``impressions`` strictly before the
        moment. Scoring the train split itself counts its own earlier showings only."""
        from newsrec.data.popularity import PrefixCounts

        within = PrefixCounts(impressions, clicks=False)
        base = (np.zeros_like(self.tables.impressions) if impressions.split == "train"
                else self.tables.impressions)

        def exposure(news_idx: np.ndarray, now_seconds: np.ndarray) -> np.ndarray:
            _, shown = within.at(news_idx, np.floor(now_seconds)[:, None])
            return base[news_idx] + shown

        return exposure

    def score_impressions(self, impressions: Any, *, retrieval_scores: np.ndarray, batch_size: int = 256,
                          show_progress: bool = True, shown_in: Any = None) -> np.ndarray:
        """Two-stage scores of every candidate of ``impressions`` (an ``Impressions``), float32
        aligned with ``impressions.candidates`` ([M], same shape as the first stage's scores).

        retrieval_scores: float [M], the first stage's scores of the same candidates. "Now" of each
        impression is its own time; the exposure of a candidate is its showings before that time
        (``exposure_counter`` over ``shown_in``, the log of what was shown — default ``impressions``
        itself; pass the real log when ``impressions`` holds other candidates, e.g. retrieved ones).
        Impressions are scored ``batch_size`` at a time, padded to the longest candidate list of the
        batch.
        """
        from newsrec.utils.progress import progress

        retrieval_scores = np.asarray(retrieval_scores, dtype=np.float64)
        if retrieval_scores.shape != impressions.candidates.shape:
            raise NewsrecError(f"score_impressions: {retrieval_scores.shape[0]} retrieval scores for "
                               f"{impressions.candidates.shape[0]} candidates")
        self._check_idx(impressions.candidates, "candidate")
        self._check_idx(impressions.history, "history")
        out = np.zeros(len(impressions.candidates), dtype=np.float32)
        now_all = datetime64_to_seconds(impressions.time)
        exposure = self.exposure_counter(impressions if shown_in is None else shown_in)
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
                                      retrieval_scores=ret, now_seconds=now_all[rows],
                                      exposure=exposure(cand_idx, now_all[rows]))
            out[flat] = scores[cand_mask]
            bar.update(len(rows))
        bar.close()
        return out


def right_padded(rows: list[np.ndarray], dtype: Any, *, min_width: int = 0) -> np.ndarray:
    """``rows`` (1-d arrays) stacked left-aligned into [B, W], 0 after each row's end;
    W = the longest row (at least ``min_width``)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    mask = np.arange(max(int(lengths.max(initial=0)), min_width))[None, :] < lengths[:, None]
    out = np.zeros(mask.shape, dtype=dtype)
    if lengths.sum():
        out[mask] = np.concatenate(rows)
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
