"""The second stage's module: a candidate-aware Fastformer re-ranker over retrieved candidates.

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
3. the score is ``a · z(s) + w · f + MLP([u_c, c', u_c ⊙ c', f])``: ``s = features[..., 0]`` is the
   first stage's score and ``z(s)`` its standardised value (by the training rows' mean and std, as
   every feature), ``f`` the standardised features, ``w · f`` their direct linear say, and the
   small MLP the candidate-aware correction. ``a`` starts at 1, ``w`` and the MLP's last layer at
   0, so an untrained re-ranker ranks exactly as the first stage (a positive scale and shift keep
   every impression's order). Standardising ``s`` puts ``a`` and ``w`` on one scale: with the raw
   score (whose spread is several units) a feature had to grow a weight many times larger, at
   the same learning rate, to move a ranking at all.

Features arrive as a tensor (``newsrec.inference.features`` makes them); the module normalises them
by statistics of its training rows and multiplies out the ones those rows left constant
(``feature_used``), so a feature that never varied in training cannot move a score at serving.
This module holds the network and its weights' I/O; the re-ranker directory, its news tables and
its runtime are ``newsrec.inference.rerank``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from newsrec.config import RerankConfig
from newsrec.errors import ArtifactError
from newsrec.models.attention import Dropout
from newsrec.models.fastformer import LayerStack

RETRIEVAL_FEATURE = 0  # features[..., 0] is the first stage's score


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

    def __init__(self, cfg: RerankConfig, *, news_dim: int, n_features: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.news_dim = news_dim
        self.n_features = n_features
        self.history_proj = nn.Linear(news_dim, d)
        self.candidate_proj = nn.Linear(news_dim, d)
        # layers before the last read the history alone (once per user); the last one per candidate
        self.history_layers = (LayerStack(kind="fastformer", in_dim=d, hidden_size=d, num_heads=cfg.num_heads,
                                          num_layers=cfg.num_layers - 1, dropout=cfg.dropout)
                               if cfg.num_layers > 1 else None)
        self.seeded = CandidateSeededFastformer(d, cfg.num_heads)
        self.head = nn.Sequential(nn.Linear(3 * d + n_features, d), nn.GELU(), Dropout(cfg.dropout),
                                  nn.Linear(d, 1))
        self.retrieval_weight = nn.Parameter(torch.ones(()))
        self.feature_linear = nn.Linear(n_features, 1, bias=False)  # the features' direct, linear say
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.register_buffer("feature_used", torch.ones(n_features))  # 0 = constant in training: dropped
        self.register_buffer("retrieval_standardised", torch.ones(()))  # 0: the raw score (older weights)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head[-1].weight)  # start as the first stage: score = retrieval score
        nn.init.zeros_(self.feature_linear.weight)

    def set_feature_stats(self, mean: np.ndarray, std: np.ndarray, *, min_std: float = 1e-6) -> np.ndarray:
        """Normalisation of the features (float [F] each) from the training rows; a feature whose
        std is below ``min_std`` there is dropped (its normalised value is 0 whatever it holds).
        Returns the bool [F] mask of features used."""
        std = np.asarray(std, dtype=np.float64)
        used = std >= min_std
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(np.where(used, std, 1.0), dtype=torch.float32))
        self.feature_used.copy_(torch.as_tensor(used, dtype=torch.float32))
        return used

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
        normed = (features - self.feature_mean) / self.feature_std * self.feature_used  # (B, C, F)
        correction = self.head(torch.cat([users, cand, users * cand, normed], dim=-1)).squeeze(-1)
        linear = self.feature_linear(normed).squeeze(-1)
        retrieval = features[..., RETRIEVAL_FEATURE]
        standardised = (retrieval - self.feature_mean[RETRIEVAL_FEATURE]) / self.feature_std[RETRIEVAL_FEATURE]
        retrieval = torch.lerp(retrieval, standardised, self.retrieval_standardised)
        return self.retrieval_weight * retrieval + linear + correction  # (B, C)


# ------------------------------------------------------------------------------------------------
# weights


# state entries a re-ranker saved before they existed lacks, and the value that scores as it did
LEGACY_STATE = {"feature_linear.weight": 0.0, "retrieval_standardised": 0.0}


def save_weights(model: Reranker, path: str | Path) -> None:
    """The module's state as safetensors (no pickle)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_weights(cfg: RerankConfig, path: str | Path, *, news_dim: int, n_features: int,
                 map_location: str = "cpu") -> Reranker:
    """A ``Reranker`` built from ``cfg`` with the weights at ``path``, in eval mode. Weights saved
    before the linear feature path and the standardised first-stage score existed load with the
    values that score exactly as they did (``LEGACY_STATE``)."""
    model = Reranker(cfg, news_dim=news_dim, n_features=n_features)
    state = load_file(str(path), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    for name in [m for m in missing if m in LEGACY_STATE]:
        own[name].fill_(LEGACY_STATE[name])
    missing = [m for m in missing if m not in LEGACY_STATE]
    if missing or unexpected:
        raise ArtifactError(f"{path}: weights do not fit the configured re-ranker "
                            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model.to(map_location).eval()
