"""The NRMS-style recommender: news encoder + user encoder, click score = dot(user, news).

No loss lives here: training code turns scores into a loss, evaluation and serving reuse
``encode_news`` / ``encode_user`` / ``score`` unchanged (encode every news once, every user once).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.config import ModelConfig
from newsrec.models.encoders import NewsEncoder, UserEncoder


class NewsRecommender(nn.Module):
    """``encode_news`` → ``[B, D]``, ``encode_user`` → ``[B, D]``, ``score`` → ``[B, C]``; ``D = news_dim``.

    ``model.encoder`` picks the token-mixing layer of both encoders (Fastformer or the MHSA
    baseline); everything else is the same code path. Weights are initialised N(0, init_std),
    biases 0, LayerNorms to identity; word embeddings from ``word_vectors`` when given.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, n_categories: int, n_subcategories: int,
                 word_vectors: np.ndarray | None = None, max_history: int = 50) -> None:
        super().__init__()
        self.cfg = cfg
        self.news_dim = cfg.hidden_size
        self.news_encoder = NewsEncoder(cfg, vocab_size=vocab_size, n_categories=n_categories,
                                        n_subcategories=n_subcategories)
        self.user_encoder = UserEncoder(cfg, max_history=max_history)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.news_encoder.word_embedding.weight[0].zero_()  # padding word
        if word_vectors is not None:
            self.news_encoder.load_word_vectors(word_vectors, freeze=cfg.freeze_embeddings)
        elif cfg.freeze_embeddings:
            self.news_encoder.word_embedding.weight.requires_grad_(False)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, UserEncoder):
            nn.init.normal_(module.empty_history, mean=0.0, std=std)

    def encode_news(self, title_tokens: Tensor, category: Tensor | None = None,
                    subcategory: Tensor | None = None) -> Tensor:
        """``title_tokens [B, T]`` int64 (0 = pad), ``category``/``subcategory [B]`` (None = unknown)
        → news vectors ``[B, D]``. A title of only padding gives a finite vector."""
        return self.news_encoder(title_tokens, category, subcategory)

    def encode_user(self, history_vectors: Tensor, history_mask: Tensor) -> Tensor:
        """``history_vectors [B, N, D]`` (clicks oldest → newest, padding at the end),
        ``history_mask [B, N]`` bool (True = click) → user vectors ``[B, D]``. A row without
        clicks gives the learned empty-history vector."""
        return self.user_encoder(history_vectors, history_mask)

    def score(self, user_vectors: Tensor, candidate_vectors: Tensor) -> Tensor:
        """``user_vectors [B, D]``, ``candidate_vectors [B, C, D]`` → click scores ``[B, C]`` (dot products)."""
        return torch.bmm(candidate_vectors, user_vectors.unsqueeze(-1)).squeeze(-1)

    def n_params(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
