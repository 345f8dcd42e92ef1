"""News and user encoders: the same ``LayerStack`` (Fastformer or MHSA) + additive-attention pooling.

News encoder: title tokens ``[B, T]`` → word embeddings ``[B, T, E]`` → layer stack ``[B, T, D]`` →
pooling ``[B, D]``; with ``use_category`` the category and subcategory embeddings (``D`` each) are
*added* to the text vector, so the news vector stays ``D`` wide and a user–news dot product gains a
learned user–category affinity term.

User encoder: clicked-news vectors ``[B, N, D]`` (oldest → newest, right-padded) → optional recency
position embeddings → layer stack → pooling ``[B, D]``; a user without any click gets a learned
"empty history" vector.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.config import ModelConfig
from newsrec.errors import ArtifactError
from newsrec.models.attention import AdditivePooling
from newsrec.models.fastformer import LayerStack


def _stack(cfg: ModelConfig, *, in_dim: int, num_layers: int) -> LayerStack:
    return LayerStack(kind=cfg.encoder, in_dim=in_dim, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                      num_layers=num_layers, share_layers=cfg.share_layers,
                      value_from_query=cfg.value_from_query, layer_norm=cfg.layer_norm,
                      feed_forward=cfg.feed_forward, dropout=cfg.dropout)


class NewsEncoder(nn.Module):
    """``title_tokens [B, T]`` int64 (0 = pad) (+ ``category``/``subcategory [B]``) → ``[B, D]``."""

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, n_categories: int, n_subcategories: int) -> None:
        super().__init__()
        self.word_embedding = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.stack = _stack(cfg, in_dim=cfg.embedding_dim, num_layers=cfg.num_layers)
        self.pooling = AdditivePooling(cfg.hidden_size, cfg.pooling_hidden)
        if cfg.use_category:
            self.category_embedding = nn.Embedding(n_categories, cfg.hidden_size)
            self.subcategory_embedding = nn.Embedding(n_subcategories, cfg.hidden_size)
        else:
            self.category_embedding = self.subcategory_embedding = None

    def load_word_vectors(self, word_vectors: np.ndarray, *, freeze: bool) -> None:
        """Copy ``word_vectors [vocab_size, E]`` into the embedding table (ArtifactError on a shape mismatch)."""
        expected = tuple(self.word_embedding.weight.shape)
        if tuple(word_vectors.shape) != expected:
            raise ArtifactError(
                f"word vectors of shape {tuple(word_vectors.shape)} do not fit the word embedding "
                f"{expected} (vocab_size, model.embedding_dim); set model.embedding_dim="
                f"{word_vectors.shape[-1] if word_vectors.ndim == 2 else '?'} or re-ingest with matching vectors")
        with torch.no_grad():
            self.word_embedding.weight.copy_(torch.from_numpy(np.asarray(word_vectors, dtype=np.float32)))
        self.word_embedding.weight.requires_grad_(not freeze)

    def forward(self, title_tokens: Tensor, category: Tensor | None = None,
                subcategory: Tensor | None = None) -> Tensor:
        mask = title_tokens != 0  # (B, T)
        words = self.dropout(self.word_embedding(title_tokens))  # (B, T, E)
        text = self.pooling(self.stack(words, mask), mask)  # (B, D)
        if self.category_embedding is not None:
            # Missing categories count as index 0, the artifact's "<unk>" category.
            if category is None:
                category = torch.zeros(title_tokens.shape[0], dtype=torch.long, device=title_tokens.device)
            if subcategory is None:
                subcategory = torch.zeros_like(category)
            text = text + self.category_embedding(category) + self.subcategory_embedding(subcategory)
        return text


class UserEncoder(nn.Module):
    """``history_vectors [B, N, D]``, ``history_mask [B, N]`` (True = click, right-padded) → ``[B, D]``.

    With ``position_embeddings`` each click gets an embedding of its recency (0 = most recent),
    clamped at ``max_history - 1`` for longer histories.
    """

    def __init__(self, cfg: ModelConfig, *, max_history: int) -> None:
        super().__init__()
        num_layers = cfg.user_num_layers or cfg.num_layers
        self.dropout = nn.Dropout(cfg.dropout)
        self.max_history = max_history
        self.position_embedding = (nn.Embedding(max_history, cfg.hidden_size)
                                   if cfg.position_embeddings else None)
        self.stack = _stack(cfg, in_dim=cfg.hidden_size, num_layers=num_layers)
        self.pooling = AdditivePooling(cfg.hidden_size, cfg.pooling_hidden)
        self.empty_history = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, history_vectors: Tensor, history_mask: Tensor) -> Tensor:
        x = history_vectors
        if self.position_embedding is not None:
            n = x.shape[1]
            lengths = history_mask.sum(dim=1, keepdim=True)  # (B, 1)
            recency = lengths - 1 - torch.arange(n, device=x.device)  # (B, N); < 0 on padding
            recency = recency.clamp(0, self.max_history - 1)
            x = x + self.position_embedding(recency)
        x = self.dropout(x)
        user = self.pooling(self.stack(x, history_mask), history_mask)  # (B, D)
        has_click = history_mask.any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_click, user, self.empty_history.to(user.dtype))
