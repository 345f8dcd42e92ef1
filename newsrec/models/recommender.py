"""The NRMS-style recommender: news encoder + user encoder, click score = dot(user, news).

No loss lives here: training code turns scores into a loss, evaluation and serving reuse
``encode_news`` / ``encode_user`` / ``score`` unchanged (encode every news once, every user once).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.config import ModelConfig
from newsrec.errors import ArtifactError
from newsrec.models.encoders import UNK_WORD_ID, NewsEncoder, UserEncoder
from newsrec.models.inputs import NewsInputs


class CategoryLift(nn.Module):
    """The wide part of the dot product: how much more often than usual a history clicks the
    candidate's category and subcategory, as a block of the user and news vectors.

    News side: the one-hot category ``[n_cat]`` and subcategory ``[n_sub]`` (fixed, not learned).
    User side: for every category ``k``, ``w_cat · log((share_k + a) / (base_k + a))`` where
    ``share_k`` is the fraction of the history's clicks in ``k`` and ``base_k`` the fraction of all
    history clicks of the training log in ``k`` (buffers, saved with the weights); likewise
    subcategories with ``w_sub``. Their dot product is the hand-made share-lift score under learned
    weights, so the deep part only has to learn what the categories do not already say. The unknown
    category (index 0) and an empty history contribute 0.
    """

    def __init__(self, n_categories: int, n_subcategories: int, *, smoothing: float,
                 category_base: np.ndarray | None = None, subcategory_base: np.ndarray | None = None) -> None:
        super().__init__()
        self.n_categories = n_categories
        self.n_subcategories = n_subcategories
        self.smoothing = smoothing
        self.register_buffer("category_base", _base_buffer(category_base, n_categories))
        self.register_buffer("subcategory_base", _base_buffer(subcategory_base, n_subcategories))
        self.weight = nn.Parameter(torch.ones(2))

    @property
    def width(self) -> int:
        return self.n_categories + self.n_subcategories

    def news_block(self, category: Tensor, subcategory: Tensor) -> Tensor:
        """``category``/``subcategory [B]`` int64 → ``[B, n_cat + n_sub]`` one-hot rows."""
        return torch.cat([nn.functional.one_hot(category.clamp(0, self.n_categories - 1), self.n_categories),
                          nn.functional.one_hot(subcategory.clamp(0, self.n_subcategories - 1),
                                                self.n_subcategories)], dim=-1).float()

    def user_block(self, history_blocks: Tensor, history_mask: Tensor) -> Tensor:
        """``history_blocks [B, N, n_cat + n_sub]`` (the clicks' news blocks), ``history_mask [B, N]``
        → ``[B, n_cat + n_sub]`` weighted log-lifts (0 for an empty history and the unknown keys)."""
        keep = history_mask.to(history_blocks.dtype).unsqueeze(-1)
        counts = (history_blocks * keep).sum(dim=1)  # (B, n_cat + n_sub)
        length = keep.sum(dim=1).clamp(min=1.0)  # (B, 1)
        share = counts / length
        a = self.smoothing
        base = torch.cat([self.category_base, self.subcategory_base]).to(share.dtype)
        lift = torch.log((share + a) / (base + a))
        known = torch.ones_like(base)
        known[0] = 0.0
        known[self.n_categories] = 0.0
        weights = torch.cat([self.weight[0].expand(self.n_categories), self.weight[1].expand(self.n_subcategories)])
        has_click = history_mask.any(dim=1, keepdim=True).to(share.dtype)
        return lift * known * weights.to(share.dtype) * has_click


class TitleMatch(nn.Module):
    """A second wide part of the dot product: how close the candidate's title is to the history's
    titles in the words they use, the classic content-based score, as a block of the user and news
    vectors.

    News side: the latent semantic vector of the title (LSA): its TF-IDF row projected on the top
    ``dim`` right singular vectors of the TF-IDF matrix of all the dataset's titles, L2-normalised.
    With the idf folded into the projection that is ``normalise(sum of word_vectors[word])`` over
    the title's words; ``<pad>`` and ``<unk>`` rows are zero. User side: the mean of the history's
    blocks, divided by ``spread`` and under a learned weight. Their dot product is that weight times
    the mean LSA cosine between the candidate's title and the history's titles, in units of
    ``spread``: the standard deviation of that cosine around its impression's mean over the training
    log (``set_spread``; no labels read). The weight starts at 0, so an untrained block changes no
    score, and is ``WEIGHT_GAIN`` × its parameter: a scalar under Adam moves about one learning rate
    per step, and this one has to travel O(1) (to ~0.9 where users follow the words of titles,
    below 0 where categories already say it) within the first epochs. It needs no training to read
    a cold news: a word counts as soon as it is in the vocabulary. ``word_vectors`` and ``spread``
    are buffers, saved with the weights.
    """

    WEIGHT_GAIN = 10.0

    def __init__(self, vocab_size: int, dim: int, *, word_vectors: np.ndarray | None = None) -> None:
        super().__init__()
        self.dim = dim
        if word_vectors is None:  # filled from saved weights
            table = torch.zeros(vocab_size, dim)
        else:
            word_vectors = np.asarray(word_vectors, dtype=np.float32)
            if word_vectors.shape != (vocab_size, dim) or not np.isfinite(word_vectors).all():
                raise ValueError(f"title-match word vectors: expected finite [{vocab_size}, {dim}], "
                                 f"got {word_vectors.shape}")
            table = torch.from_numpy(word_vectors)
        self.register_buffer("word_vectors", table)
        self.register_buffer("spread", torch.ones(1))
        self.weight = nn.Parameter(torch.zeros(1))  # the block's weight is WEIGHT_GAIN × this

    @property
    def width(self) -> int:
        return self.dim

    def news_block(self, title_tokens: Tensor) -> Tensor:
        """``title_tokens [B, T]`` word ids → ``[B, dim]`` unit rows (zero for a title without a known word)."""
        block = self.word_vectors[title_tokens].sum(dim=1)  # (B, dim)
        return block / block.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def user_block(self, history_blocks: Tensor, history_mask: Tensor) -> Tensor:
        """``history_blocks [B, N, dim]``, ``history_mask [B, N]`` → ``[B, dim]``: the weighted mean
        block of the clicks (0 for an empty history)."""
        keep = history_mask.to(history_blocks.dtype).unsqueeze(-1)
        mean = (history_blocks * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return mean * (self.WEIGHT_GAIN * self.weight / self.spread).to(mean.dtype)

    @torch.no_grad()
    def set_spread(self, title_tokens: np.ndarray, history: list[np.ndarray], candidates: list[np.ndarray]) -> None:
        """``spread`` := the standard deviation of the match cosine around each impression's mean,
        over impressions given as their clicks and candidates (news_idx rows of ``title_tokens``
        ``[n_news + 1, T]``); left at 1 when it cannot be measured (no impression with a history
        and two candidates, or all cosines equal)."""
        centred = []
        for clicks, shown in zip(history, candidates):
            if len(clicks) == 0 or len(shown) < 2:
                continue
            profile = self.news_block(torch.from_numpy(title_tokens[clicks].astype(np.int64))).mean(dim=0)
            scores = self.news_block(torch.from_numpy(title_tokens[shown].astype(np.int64))) @ profile
            centred.append(scores - scores.mean())
        if centred:
            spread = float(torch.cat(centred).std())
            if np.isfinite(spread) and spread > 1e-6:
                self.spread.fill_(spread)


def _base_buffer(values: np.ndarray | None, n: int) -> Tensor:
    if values is None:  # filled from saved weights
        return torch.full((n,), 1.0 / max(n, 1))
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,) or not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"category base rates: expected {n} finite non-negative values, got shape {values.shape}")
    return torch.as_tensor(values, dtype=torch.float32)


class NewsRecommender(nn.Module):
    """``encode_news`` → ``[B, D]``, ``encode_user`` → ``[B, U]``, ``score`` → ``[B, C]``; ``D = news_dim``,
    ``U = user_dim`` (= D with one user vector; with ``user_interests = K``, K deep parts and one
    copy of the wide parts: ``interest_queries`` unfolds it into K vectors of width D).

    ``model.encoder`` picks the token-mixing layer of both encoders (Fastformer or the MHSA
    baseline); everything else is the same code path. Weights are initialised N(0, init_std),
    biases 0, LayerNorms to identity; word embeddings from ``word_vectors`` when given.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, n_categories: int, n_subcategories: int,
                 word_vectors: np.ndarray | None = None, max_history: int = 50, n_entities: int = 0,
                 entity_vectors: np.ndarray | None = None, entity_dim: int | None = None, plm_dim: int = 0,
                 plm_layers: nn.Module | None = None, category_base: np.ndarray | None = None,
                 subcategory_base: np.ndarray | None = None, title_match_vectors: np.ndarray | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.deep_dim = cfg.hidden_size
        self.category_lift = (CategoryLift(n_categories, n_subcategories, smoothing=cfg.category_lift_smoothing,
                                           category_base=category_base, subcategory_base=subcategory_base)
                              if cfg.category_lift else None)
        self.title_match = (TitleMatch(vocab_size, cfg.title_match_dim, word_vectors=title_match_vectors)
                            if cfg.title_match_dim else None)
        self.news_dim = cfg.hidden_size + sum(block.width for block in self._wide_blocks())
        self.interests = cfg.user_interests
        self.user_dim = self.news_dim + (self.interests - 1) * self.deep_dim
        self.plm_dim = plm_dim
        self.plm_fingerprint: str | None = None  # identity of the PLM whose states it reads (set by io)
        if entity_vectors is not None:
            entity_dim = int(entity_vectors.shape[1])
        self.news_encoder = NewsEncoder(cfg, vocab_size=vocab_size, n_categories=n_categories,
                                        n_subcategories=n_subcategories, n_entities=n_entities,
                                        entity_dim=entity_dim, plm_dim=plm_dim, plm_layers=None)
        self.user_encoder = UserEncoder(cfg, max_history=max_history)
        self.apply(self._init_weights)
        # the PLM's own blocks keep their pretrained weights: attached after the initialisation
        self.news_encoder.plm_layers = plm_layers
        embedding = self.news_encoder.word_embedding
        if embedding is not None:
            with torch.no_grad():
                embedding.weight[0].zero_()  # padding word
            if word_vectors is not None:
                self.news_encoder.load_word_vectors(word_vectors, freeze=cfg.freeze_embeddings)
            elif cfg.freeze_embeddings:
                embedding.weight.requires_grad_(False)
            if not cfg.word_dropout:
                # without word dropout no training title holds <unk>: its row would stay a random
                # vector added to every cold title with unknown words; zero carries no such noise
                with torch.no_grad():
                    embedding.weight[UNK_WORD_ID].zero_()
        if self.news_encoder.entity_embedding is not None:
            if entity_vectors is not None:
                self.news_encoder.load_entity_vectors(entity_vectors)
            else:
                with torch.no_grad():
                    self.news_encoder.entity_embedding.weight[0].zero_()

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

    def encode_news(self, news: NewsInputs | Tensor, category: Tensor | None = None,
                    subcategory: Tensor | None = None) -> Tensor:
        """``NewsInputs`` of B news → news vectors ``[B, D]``. A title-token tensor ``[B, T]`` int64
        (0 = pad) with ``category``/``subcategory [B]`` (None = unknown) is accepted as a shorthand
        for a words model. A title of only padding gives a finite vector."""
        if isinstance(news, Tensor):
            unknown = torch.zeros(news.shape[0], dtype=torch.long, device=news.device)
            news = NewsInputs(category=unknown if category is None else category,
                              subcategory=unknown if subcategory is None else subcategory, title_tokens=news)
        deep = self.news_encoder(news)
        parts = [deep]
        if self.category_lift is not None:
            parts.append(self.category_lift.news_block(news.category, news.subcategory).to(deep.dtype))
        if self.title_match is not None:
            if news.title_tokens is None:
                raise ArtifactError("the title match (model.title_match_dim) reads title words but the news "
                                    "inputs hold none")
            parts.append(self.title_match.news_block(news.title_tokens).to(deep.dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else deep

    def encode_user(self, history_vectors: Tensor, history_mask: Tensor) -> Tensor:
        """``history_vectors [B, N, D]`` (clicks oldest → newest, padding at the end),
        ``history_mask [B, N]`` bool (True = click) → user vectors ``[B, U]``: the deep part (K of
        them, one after the other, with ``user_interests = K``), then the wide blocks. A row without
        clicks gives the learned empty-history vector (and a zero category-lift block)."""
        deep = self.user_encoder(history_vectors[..., :self.deep_dim], history_mask)  # (B, d) or (B, K, d)
        parts = [deep.flatten(1)]
        start = self.deep_dim
        for block in self._wide_blocks():
            wide = block.user_block(history_vectors[..., start:start + block.width].float(), history_mask)
            parts.append(wide.to(deep.dtype))
            start += block.width
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _wide_blocks(self) -> list[nn.Module]:
        """The wide parts present, in the order their blocks follow the deep part of a vector."""
        return [block for block in (self.category_lift, self.title_match) if block is not None]

    def _deep_interests(self, user_vectors: Tensor) -> Tensor:
        """User vectors ``[B, U]`` → their K deep parts ``[B, K, d]`` (a view)."""
        return user_vectors[:, :self.interests * self.deep_dim].view(-1, self.interests, self.deep_dim)

    def interest_queries(self, user_vectors: Tensor) -> Tensor:
        """User vectors ``[B, U]`` → ``[B, K, D]``: interest k's deep part with the user's wide
        blocks, so that ``score`` = the maximum over k of a plain dot product with a news vector."""
        deep = self._deep_interests(user_vectors)  # (B, K, d)
        wide = user_vectors[:, None, deep.shape[1] * self.deep_dim:].expand(-1, deep.shape[1], -1)
        return torch.cat([deep, wide], dim=-1)

    def interest_overlap(self, user_vectors: Tensor) -> Tensor:
        """``[B]``: the mean cosine between two distinct interest vectors (deep parts) of each user
        (0 with one interest)."""
        k = self.interests
        if k == 1:
            return user_vectors.new_zeros(user_vectors.shape[0])
        deep = nn.functional.normalize(self._deep_interests(user_vectors), dim=-1)
        cosines = deep @ deep.transpose(1, 2)  # (B, K, K), ones on the diagonal
        return (cosines.sum(dim=(1, 2)) - k) / (k * (k - 1))

    def score(self, user_vectors: Tensor, candidate_vectors: Tensor) -> Tensor:
        """``user_vectors [B, U]``, ``candidate_vectors [B, C, D]`` → click scores ``[B, C]``: the dot
        product (with K interests, the largest of the K dot products)."""
        if self.interests == 1:
            return torch.bmm(candidate_vectors, user_vectors.unsqueeze(-1)).squeeze(-1)
        queries = self.interest_queries(user_vectors)  # (B, K, D)
        return torch.bmm(candidate_vectors, queries.transpose(1, 2)).amax(dim=-1)

    def score_pool(self, user_vectors: Tensor, news_vectors: Tensor) -> Tensor:
        """``user_vectors [B, U]`` against every row of ``news_vectors [P, D]`` → scores ``[B, P]``,
        each equal to ``score`` of that (user, news) pair."""
        if self.interests == 1:
            return user_vectors @ news_vectors.T
        return (self.interest_queries(user_vectors) @ news_vectors.T).amax(dim=1)

    def n_params(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
