"""Attention building blocks shared by the encoders: masked softmax, additive-attention pooling, the
multi-head self-attention layer of the NRMS baseline, and dropout.

Masks follow one convention everywhere: a bool tensor ``[B, N]``, True = a real position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_fill_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Scores ``[B, N, ...]`` with padded positions (mask ``[B, N]`` False) set to the most negative
    finite value of their dtype, so a softmax over N gives them weight exactly 0.

    A row with no real position keeps equal (finite) scores: its softmax is uniform, never NaN.
    """
    keep = mask.view(mask.shape + (1,) * (scores.dim() - mask.dim()))
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)


def masked_softmax(scores: Tensor, mask: Tensor, *, dim: int = 1) -> Tensor:
    """Softmax over positions (``dim``) of scores ``[B, N, ...]`` ignoring padded positions."""
    return torch.softmax(masked_fill_scores(scores, mask), dim=dim)


class Dropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout(p)``: in training each element is kept with probability
    1 - p and scaled by 1 / (1 - p). The keep mask is drawn from uniform floats (``torch.rand``):
    on a 2-core CPU that is ~1.6x faster forward and backward than ``nn.Dropout``'s Bernoulli
    sampler, which took a fifth of a training step at MIND shapes."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p} must be in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AdditivePooling(nn.Module):
    """Additive-attention pooling ``a = softmax(w2ᵀ tanh(W1 x))`` over positions, padding masked.

    ``x [B, N, D]``, ``mask [B, N]`` → ``[B, D]``. With ``n_queries = K > 1``, K learned query
    vectors ``w2`` each pool the positions their own way (poly attention, as MINER's user encoder):
    → ``[B, K, D]``. A row without any real position pools to zeros. Cost is linear in N.
    """

    def __init__(self, hidden_size: int, pooling_hidden: int, *, n_queries: int = 1) -> None:
        super().__init__()
        self.n_queries = n_queries
        self.proj = nn.Linear(hidden_size, pooling_hidden)
        self.score = nn.Linear(pooling_hidden, n_queries)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        scores = self.score(torch.tanh(self.proj(x)))  # (B, N, K)
        weights = masked_softmax(scores, mask, dim=1)  # (B, N, K)
        weights = weights * mask.unsqueeze(-1).to(weights.dtype)  # all-padding rows -> 0
        pooled = torch.bmm(weights.transpose(1, 2).to(x.dtype), x)  # (B, K, D)
        return pooled.squeeze(1) if self.n_queries == 1 else pooled


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention (the NRMS baseline layer), a drop-in for ``FastformerAttention``.

    ``x [B, N, in_dim]``, ``mask [B, N]`` → ``[B, N, hidden_size]``. Uses
    ``F.scaled_dot_product_attention`` with a boolean key mask (never materialises weights for the
    caller); rows with no real position attend to every position instead of none, so they stay
    finite. Padded positions' outputs are left as computed (``LayerStack`` zeroes them); they never
    influence real positions.
    """

    def __init__(self, in_dim: int, hidden_size: int, num_heads: int, *, value_from_query: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(in_dim, hidden_size)
        self.key = nn.Linear(in_dim, hidden_size)
        # value_from_query is a Fastformer option; MHSA always has its own value projection.
        self.value = nn.Linear(in_dim, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, dh)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        any_real = mask.any(dim=1, keepdim=True)  # (B, 1)
        key_mask = mask | ~any_real  # empty rows attend everywhere: finite, then zeroed below
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        attended = attended.transpose(1, 2).reshape(b, n, -1)  # (B, N, hidden)
        return self.output(attended)
