"""The Fastformer layer (Wu et al., arXiv 2108.09084) as in the authors' code, and the layer stack
both encoders use.

``FastformerAttention`` for input ``X [B, N, in_dim]``, H heads of size ``d_h = d / H``:

1. ``Q = X W_q``, ``K = X W_k`` (Linear in_dim → d).
2. ``α = softmax_N(Q W_α / √d_h)`` with padded positions masked (W_α: Linear d → H, one score per
   head from the full d-dim query).
3. global query per head ``q^h = Σ_i α_i^h Q_i^h``.
4. ``P = K ⊙ q``; ``β = softmax_N(P W_β / √d_h)`` (masked); global key ``k^h = Σ_i β_i^h P_i^h``.
5. ``U = k ⊙ V``; output ``R = W_o U + Q``.

``V = Q`` by default (``value_from_query=True``, as the official code); ``False`` adds a separate
value projection W_v. Padded positions get softmax weight exactly 0 (their scores are replaced, not
offset), so they never change real positions' outputs; a row of only padding stays finite. Every
step is linear in N: no N×N tensor exists.

``LayerStack`` wraps either this layer or multi-head self-attention (``kind="mhsa"``, the NRMS
baseline) in the same optional dropout / residual LayerNorm / feed-forward block, with optional
parameter sharing across layers. Padded positions of the stack's output are zero.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from newsrec.models.attention import Dropout, MultiHeadSelfAttention, masked_softmax

ATTENTION_KINDS = ("fastformer", "mhsa")


class FastformerAttention(nn.Module):
    """One Fastformer layer. ``x [B, N, in_dim]``, ``mask [B, N]`` bool (True = real) → ``[B, N, d]``."""

    def __init__(self, in_dim: int, hidden_size: int, num_heads: int, *, value_from_query: bool = True) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.hidden_size = hidden_size
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query = nn.Linear(in_dim, hidden_size)  # W_q
        self.key = nn.Linear(in_dim, hidden_size)  # W_k
        self.value = None if value_from_query else nn.Linear(in_dim, hidden_size)  # W_v
        self.query_score = nn.Linear(hidden_size, num_heads)  # W_α
        self.key_score = nn.Linear(hidden_size, num_heads)  # W_β
        self.output = nn.Linear(hidden_size, hidden_size)  # W_o

    @property
    def value_from_query(self) -> bool:
        return self.value is None

    def _pool(self, x: Tensor, score_layer: nn.Linear, mask: Tensor) -> Tensor:
        """Per-head additive attention over positions: ``x [B, N, d]`` → ``[B, 1, d]``."""
        b, n, _ = x.shape
        weights = masked_softmax(score_layer(x) * self.scale, mask, dim=1)  # (B, N, H)
        heads = x.view(b, n, self.num_heads, self.head_dim)  # (B, N, H, dh)
        pooled = torch.einsum("bnh,bnhd->bhd", weights.to(heads.dtype), heads)  # (B, H, dh)
        return pooled.reshape(b, 1, self.hidden_size)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        query = self.query(x)  # (B, N, d)
        key = self.key(x)  # (B, N, d)
        global_query = self._pool(query, self.query_score, mask)  # (B, 1, d)
        mixed = key * global_query  # P = K ⊙ q   (B, N, d)
        global_key = self._pool(mixed, self.key_score, mask)  # (B, 1, d)
        value = query if self.value is None else self.value(x)  # (B, N, d)
        return self.output(value * global_key) + query  # R = W_o (k ⊙ V) + Q


def build_attention(kind: str, in_dim: int, hidden_size: int, num_heads: int, *,
                    value_from_query: bool = True) -> nn.Module:
    """The token-mixing layer of ``kind`` ("fastformer" | "mhsa"), same call signature for both."""
    if kind == "fastformer":
        return FastformerAttention(in_dim, hidden_size, num_heads, value_from_query=value_from_query)
    if kind == "mhsa":
        return MultiHeadSelfAttention(in_dim, hidden_size, num_heads)
    raise ValueError(f"unknown attention kind {kind!r} (expected one of {', '.join(ATTENTION_KINDS)})")


class EncoderLayer(nn.Module):
    """Attention + optional BERT-style wrapping. ``x [B, N, in_dim]`` → ``[B, N, d]``.

    - ``layer_norm=False`` (default, the authors' choice for news recommendation):
      ``h = dropout(attn(x))`` — Fastformer already adds the query as residual.
    - ``layer_norm=True``: ``h = LayerNorm(x + dropout(attn(x)))`` (the residual ``x`` only when
      ``in_dim == d``).
    - ``feed_forward=True`` adds ``h = h + dropout(FF(h))`` (gelu, 4·d inner), followed by a
      LayerNorm when ``layer_norm``.
    """

    def __init__(self, attention: nn.Module, in_dim: int, hidden_size: int, *, layer_norm: bool,
                 feed_forward: bool, dropout: float) -> None:
        super().__init__()
        self.attention = attention
        self.residual = layer_norm and in_dim == hidden_size
        self.attn_norm = nn.LayerNorm(hidden_size) if layer_norm else None
        self.feed_forward = (nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(),
                                           nn.Linear(4 * hidden_size, hidden_size))
                             if feed_forward else None)
        self.ff_norm = nn.LayerNorm(hidden_size) if (layer_norm and feed_forward) else None
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.dropout(self.attention(x, mask))
        if self.attn_norm is not None:
            h = self.attn_norm(h + x if self.residual else h)
        if self.feed_forward is not None:
            h = h + self.dropout(self.feed_forward(h))
            if self.ff_norm is not None:
                h = self.ff_norm(h)
        return h


class LayerStack(nn.Module):
    """``num_layers`` encoder layers of one attention kind. ``x [B, N, in_dim]``, ``mask [B, N]`` →
    ``[B, N, d]`` with padded positions zeroed.

    With ``share_layers`` every layer reuses one parameter set (when ``in_dim != d`` the first
    layer, which changes the width, has its own and the remaining layers share one). Unique layers
    are stored once, so a state dict holds no aliased tensors.
    """

    def __init__(self, *, kind: str, in_dim: int, hidden_size: int, num_heads: int, num_layers: int,
                 share_layers: bool = False, value_from_query: bool = True, layer_norm: bool = False,
                 feed_forward: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        self.kind = kind

        def make(layer_in: int) -> EncoderLayer:
            attn = build_attention(kind, layer_in, hidden_size, num_heads, value_from_query=value_from_query)
            return EncoderLayer(attn, layer_in, hidden_size, layer_norm=layer_norm,
                                feed_forward=feed_forward, dropout=dropout)

        if share_layers:
            unique = [make(in_dim)]
            if in_dim != hidden_size and num_layers > 1:
                unique.append(make(hidden_size))
            order = [0] + [len(unique) - 1] * (num_layers - 1)
        else:
            unique = [make(in_dim if i == 0 else hidden_size) for i in range(num_layers)]
            order = list(range(num_layers))
        self.layers = nn.ModuleList(unique)
        self.order = tuple(order)  # which unique layer runs at each depth

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for i in self.order:
            x = self.layers[i](x, mask)
        return x * mask.unsqueeze(-1).to(x.dtype)
