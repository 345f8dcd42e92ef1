"""News and user encoders: the same ``LayerStack`` (Fastformer or MHSA) + additive-attention pooling.

News encoder: ``NewsInputs`` → a news vector ``[B, D]``. The title is read either as word ids
(``text_encoder=words``: embeddings ``[B, T, E]``, during training a share ``word_dropout`` of the
words replaced by ``<unk>``) or as a pretrained language model's token states (``text_encoder=plm``:
``[B, L, H]``, through its top blocks when they are fine-tuned); a layer stack and additive pooling
turn either into the title vector ``[B, D]``. Further views, each ``[B, D]``: the category and
subcategory embeddings (``use_category``) and the title's entities (``use_entities``: entity vectors
projected to ``D`` and pooled). ``news_views=sum`` adds the views (a user–news dot product then
gains learned user–category and user–entity affinity terms); ``news_views=attention`` weighs them
per news by additive attention (NAML's view attention; a news without entities leaves that view out).

User encoder: clicked-news vectors ``[B, N, D]`` (oldest → newest, right-padded) → optional recency
position embeddings → layer stack → pooling ``[B, D]`` (``user_interests = K > 1``: K poolings, one
vector per interest, ``[B, K, D]``); a user without any click gets a learned "empty history" vector.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.config import ModelConfig
from newsrec.errors import ArtifactError
from newsrec.models.attention import AdditivePooling, Dropout
from newsrec.models.fastformer import LayerStack
from newsrec.models.inputs import NewsInputs

UNK_WORD_ID = 1  # the dataset artifact's "<unk>" word (0 is padding)


def _stack(cfg: ModelConfig, *, in_dim: int, num_layers: int) -> LayerStack:
    return LayerStack(kind=cfg.encoder, in_dim=in_dim, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                      num_layers=num_layers, share_layers=cfg.share_layers,
                      value_from_query=cfg.value_from_query, layer_norm=cfg.layer_norm,
                      feed_forward=cfg.feed_forward, dropout=cfg.dropout)


# news per encoder call when a large batch is split by text length (measured at MIND shapes on 2
# cores: 780 news forward and backward 1.3-1.6x faster in 256-news calls sorted by length)
LENGTH_CHUNK = 256


def _trim_padding(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``x [B, T, ...]`` and ``mask [B, T]`` without the trailing positions that are padding in every
    row (at least one position kept). Exact: padded positions never change real ones' outputs, and
    titles average ~12 of MIND's 30 word slots, so this saves a large share of the encoder's work."""
    real = mask.any(dim=0).nonzero()
    width = int(real[-1]) + 1 if len(real) else 1
    if width == mask.shape[1]:
        return x, mask
    return x[:, :width], mask[:, :width]


class NewsEncoder(nn.Module):
    """``NewsInputs`` of B news → ``[B, D]`` (see the module docstring).

    ``n_entities``/``entity_dim`` size the entity table (``use_entities``); ``plm_dim`` is the width
    of the PLM states and ``plm_layers`` the PLM's fine-tuned top blocks (``text_encoder=plm``), a
    module ``(states [B, L, H], mask [B, L]) → [B, L, H]``.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, n_categories: int, n_subcategories: int,
                 n_entities: int = 0, entity_dim: int | None = None, plm_dim: int = 0,
                 plm_layers: nn.Module | None = None) -> None:
        super().__init__()
        self.text_encoder = cfg.text_encoder
        self.word_dropout = cfg.word_dropout
        if cfg.text_encoder == "words":
            self.word_embedding = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=0)
            text_dim = cfg.embedding_dim
            self.plm_layers = None
        else:
            if plm_dim <= 0:
                raise ArtifactError("model.text_encoder=plm: the width of the PLM states is unknown")
            self.word_embedding = None
            self.plm_layers = plm_layers
            text_dim = plm_dim
            # PLM states share a large common direction; standardising each dimension with the
            # statistics of the training news (``set_text_statistics``) speeds learning up markedly
            self.register_buffer("text_shift", torch.zeros(plm_dim))
            self.register_buffer("text_scale", torch.ones(plm_dim))
        self.dropout = Dropout(cfg.dropout)
        self.stack = _stack(cfg, in_dim=text_dim, num_layers=cfg.num_layers)
        self.pooling = AdditivePooling(cfg.hidden_size, cfg.pooling_hidden)
        if cfg.use_category:
            self.category_embedding = nn.Embedding(n_categories, cfg.hidden_size)
            self.subcategory_embedding = nn.Embedding(n_subcategories, cfg.hidden_size)
        else:
            self.category_embedding = self.subcategory_embedding = None
        if cfg.use_entities:
            if n_entities < 1:
                raise ArtifactError("model.use_entities=true needs an entity table (n_entities >= 1)")
            width = entity_dim or cfg.entity_dim
            self.entity_embedding = nn.Embedding(n_entities, width, padding_idx=0)
            self.entity_projection = nn.Linear(width, cfg.hidden_size)
            self.entity_pooling = AdditivePooling(cfg.hidden_size, cfg.pooling_hidden)
        else:
            self.entity_embedding = self.entity_projection = self.entity_pooling = None
        self.view_pooling = (AdditivePooling(cfg.hidden_size, cfg.pooling_hidden)
                             if cfg.news_views == "attention" else None)

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

    def load_entity_vectors(self, entity_vectors: np.ndarray) -> None:
        """Pretrained entity vectors ``[n_entities, dim]`` (row 0 = none), kept frozen; the projection
        to ``D`` is what trains."""
        expected = tuple(self.entity_embedding.weight.shape)
        if tuple(entity_vectors.shape) != expected:
            raise ArtifactError(f"entity vectors of shape {tuple(entity_vectors.shape)} do not fit the "
                                f"entity embedding {expected}")
        with torch.no_grad():
            self.entity_embedding.weight.copy_(torch.from_numpy(np.asarray(entity_vectors, dtype=np.float32)))
            self.entity_embedding.weight[0].zero_()
        self.entity_embedding.weight.requires_grad_(False)

    @torch.no_grad()
    def set_text_statistics(self, text_states: Tensor, text_mask: Tensor) -> None:
        """Per-dimension mean and standard deviation of the (top-block) states of real tokens of a
        sample of news ``[B, L, H]``, ``[B, L]``: the fixed standardisation of the PLM states."""
        x = text_states.to(self.text_shift.dtype)
        if self.plm_layers is not None:
            x = self.plm_layers(x, text_mask)
        tokens = x[text_mask]  # (tokens, H)
        self.text_shift.copy_(tokens.mean(dim=0))
        self.text_scale.copy_(tokens.std(dim=0).clamp_min(1e-3))

    def _text_mask(self, news: NewsInputs) -> Tensor:
        """bool ``[B, T]``: the real title words (or PLM tokens) of ``news``; ArtifactError when the
        inputs lack the text this encoder reads."""
        if self.word_embedding is not None:
            if news.title_tokens is None:
                raise ArtifactError("the news encoder reads title words (model.text_encoder=words) but the "
                                    "news inputs hold none")
            return news.title_tokens != 0
        if news.text_states is None or news.text_mask is None:
            raise ArtifactError("the news encoder reads PLM token states (model.text_encoder=plm) but "
                                "the news inputs hold none")
        return news.text_mask

    def _title(self, news: NewsInputs) -> Tensor:
        if self.word_embedding is not None:
            tokens, mask = _trim_padding(news.title_tokens, self._text_mask(news))  # (B, T')
            if self.training and self.word_dropout > 0:
                dropped = (torch.rand(tokens.shape, device=tokens.device) < self.word_dropout) & mask
                tokens = tokens.masked_fill(dropped, UNK_WORD_ID)
            x = self.word_embedding(tokens)  # (B, T, E)
        else:
            states, mask = _trim_padding(news.text_states, self._text_mask(news))  # (B, L', H), (B, L')
            dtype = self.pooling.proj.weight.dtype
            x = states.to(dtype)
            if self.plm_layers is not None:
                x = self.plm_layers(x, mask)
            x = (x - self.text_shift) / self.text_scale
        x = self.dropout(x)
        return self.pooling(self.stack(x, mask), mask)  # (B, D)

    def forward(self, news: NewsInputs) -> Tensor:
        n = len(news)
        if n <= LENGTH_CHUNK:
            return self._encode(news)
        # sorted by text length, each call's titles are about as long as its longest one
        order = torch.argsort(self._text_mask(news).sum(dim=1), stable=True)
        parts = [self._encode(news.select(rows)) for rows in order.tensor_split(-(-n // LENGTH_CHUNK))]
        return torch.cat(parts)[torch.argsort(order)]

    def _encode(self, news: NewsInputs) -> Tensor:
        text = self._title(news)  # (B, D)
        views = [text]
        present = [torch.ones(len(news), dtype=torch.bool, device=text.device)]
        if self.category_embedding is not None:
            views += [self.category_embedding(news.category), self.subcategory_embedding(news.subcategory)]
            present += present[:1] * 2
        if self.entity_embedding is not None:
            if news.entities is None:
                raise ArtifactError("the news encoder reads title entities (model.use_entities=true) but the "
                                    "news inputs hold none")
            entity_mask = news.entities != 0  # (B, E)
            entities = self.entity_projection(self.entity_embedding(news.entities))  # (B, E, D)
            views.append(self.entity_pooling(entities, entity_mask))  # zeros without entities
            present.append(entity_mask.any(dim=1))
        if len(views) == 1:
            return text
        if self.view_pooling is None:
            return torch.stack(views, dim=0).sum(dim=0)
        return self.view_pooling(torch.stack(views, dim=1), torch.stack(present, dim=1))  # (B, D)


class UserEncoder(nn.Module):
    """``history_vectors [B, N, D]``, ``history_mask [B, N]`` (True = click, right-padded) → ``[B, D]``
    (``[B, K, D]`` with ``user_interests = K > 1``).

    With ``position_embeddings`` each click gets an embedding of its recency (0 = most recent),
    clamped at ``max_history - 1`` for longer histories.
    """

    def __init__(self, cfg: ModelConfig, *, max_history: int) -> None:
        super().__init__()
        num_layers = cfg.user_num_layers or cfg.num_layers
        self.dropout = Dropout(cfg.dropout)
        self.max_history = max_history
        self.position_embedding = (nn.Embedding(max_history, cfg.hidden_size)
                                   if cfg.position_embeddings else None)
        self.stack = _stack(cfg, in_dim=cfg.hidden_size, num_layers=num_layers)
        self.pooling = AdditivePooling(cfg.hidden_size, cfg.pooling_hidden, n_queries=cfg.user_interests)
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
        user = self.pooling(self.stack(x, history_mask), history_mask)  # (B, D) or (B, K, D)
        has_click = history_mask.any(dim=1).view((-1,) + (1,) * (user.dim() - 1))  # (B, 1) or (B, 1, 1)
        return torch.where(has_click, user, self.empty_history.to(user.dtype))
