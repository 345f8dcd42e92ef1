"""First-stage scoring, the one path every entry point takes: encode news, encode users from their
histories (``newsrec.inference.histories``), score candidates by ``model.score``.

``encode_all_news`` encodes every news of an artifact once (row 0, the padding news, is zeros);
``encode_news`` encodes news from their feature arrays (fresh news at serving). ``encode_users``
turns histories into user vectors over any table of news vectors; ``score_candidates`` scores
(user, candidate) pairs. ``score_histories`` puts them together for histories with candidate lists
(the MLflow model), ``score_impressions`` for a split's impressions (training's dev evaluation,
``evaluate``, ``submit``, ``score``, the re-ranker's first stage). ``retrieve`` finds each user's
top news in a retriever (a FAISS index, exact search). ``score_impressions_slow`` runs the full
model per impression and is the reference the fast path is checked against.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.config import ModelConfig
from newsrec.data.artifact import DatasetArtifact, Impressions
from newsrec.data.features import NewsFeatures, news_features
from newsrec.inference.histories import Histories
from newsrec.models.inputs import NewsInputs
from newsrec.utils.progress import progress


def _quiet(show_progress: bool) -> bool | None:
    """tqdm's ``disable``: True hides the bar, None lets tqdm hide it when stderr is not a terminal."""
    return None if show_progress else True


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode + no autograd for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# news


def model_news_features(model: nn.Module, dataset: DatasetArtifact) -> NewsFeatures:
    """The news inputs ``model`` reads over ``dataset`` (for a PLM model, the cached states of the
    backbone it was trained with)."""
    model_cfg = getattr(model, "cfg", None) or ModelConfig()  # a model without settings reads words
    return news_features(dataset, model_cfg, plm_fingerprint=getattr(model, "plm_fingerprint", None))


def encode_news(model: nn.Module, arrays: Mapping[str, np.ndarray], *, device: str | torch.device = "cpu") -> Tensor:
    """News vectors float32 [B, D] of B news given as feature arrays (``NewsFeatures.gather`` or
    ``.fresh``), in eval mode without autograd."""
    with inference_mode(model):
        return model.encode_news(NewsInputs.from_arrays(arrays, torch.device(device))).float()


def encode_all_news(model: nn.Module, dataset: DatasetArtifact, *, batch_size: int = 1024,
                    device: str | torch.device = "cpu", show_progress: bool = True,
                    features: NewsFeatures | None = None) -> Tensor:
    """News vectors float32 [n_news + 1, D] on ``device``; row 0 (the padding news) is zeros.
    ``features``: the model's news inputs when already open (``model_news_features``)."""
    device = torch.device(device)
    if features is None:
        features = model_news_features(model, dataset)
    n_news = dataset.n_news
    out = torch.zeros(n_news + 1, model.news_dim, dtype=torch.float32, device=device)
    starts = range(1, n_news + 1, batch_size)
    for start in progress(starts, desc="encode news", unit="batch", disable=_quiet(show_progress)):
        rows = np.arange(start, min(start + batch_size, n_news + 1))
        out[start:start + len(rows)] = encode_news(model, features.gather(rows), device=device)
    return out


# ---------------------------------------------------------------------------------------------
# users


def encode_users(model: nn.Module, news_vectors: Tensor, histories: Histories, *, history_len: int | None,
                 batch_size: int = 1024, show_progress: bool = False) -> Tensor:
    """User vectors float32 [n, U] (on ``news_vectors``' device; ``U = model.user_dim``) of
    ``histories``, whose values index ``news_vectors`` [V, D] (row 0 = the padding news). Each reads its most recent
    ``history_len`` clicks (``Histories.padded``). Histories are grouped by length so that each
    batch pads little; padding changes no user vector."""
    device = news_vectors.device
    lengths = np.minimum(histories.lengths, history_len) if history_len is not None else histories.lengths
    n = len(histories)
    users = torch.zeros(n, getattr(model, "user_dim", news_vectors.shape[1]), dtype=torch.float32, device=device)
    order = np.argsort(lengths, kind="stable")
    with inference_mode(model):
        for b in progress(range(0, n, batch_size), desc="encode users", unit="batch",
                          disable=_quiet(show_progress)):
            rows = order[b:b + batch_size]
            idx, mask = histories.padded(rows, history_len=history_len)  # (B, N) each
            idx_t = torch.from_numpy(idx).to(device)
            mask_t = torch.from_numpy(mask).to(device)
            users[torch.from_numpy(rows).to(device)] = model.encode_user(news_vectors[idx_t], mask_t).float()
    return users


# ---------------------------------------------------------------------------------------------
# scores


def score_candidates(model: nn.Module, user_vectors: Tensor, news_vectors: Tensor, user_of_candidate: np.ndarray,
                     candidates: np.ndarray, *, chunk: int = 262_144) -> np.ndarray:
    """float32 [M]: ``model.score`` of each (user, candidate) pair — user row ``user_of_candidate``
    [M] of ``user_vectors``, news row ``candidates`` [M] of ``news_vectors`` — in chunks of
    ``chunk`` pairs."""
    out = np.empty(len(candidates), dtype=np.float32)
    device = news_vectors.device
    with inference_mode(model):
        for s in range(0, len(candidates), chunk):
            users = user_vectors[torch.from_numpy(np.asarray(user_of_candidate[s:s + chunk], dtype=np.int64)).to(device)]
            news = news_vectors[torch.from_numpy(np.asarray(candidates[s:s + chunk], dtype=np.int64)).to(device)]
            out[s:s + len(users)] = model.score(users, news.unsqueeze(1)).squeeze(1).float().cpu().numpy()
    return out


def score_pool(model: nn.Module | None, user_vectors: Tensor, news_vectors: Tensor) -> Tensor:
    """Scores ``[B, P]`` of users ``[B, U]`` against every news of ``news_vectors [P, D]``:
    ``model.score_pool`` (the best interest's dot product), or the plain dot product for a model
    without one."""
    pool = getattr(model, "score_pool", None)
    return user_vectors @ news_vectors.T if pool is None else pool(user_vectors, news_vectors)


def retrieve(model: nn.Module, retriever: Any, user_vectors: Tensor | np.ndarray, k: int, *,
             exclude: list[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each user's top ``k`` news by ``model.score`` from ``retriever`` (``search(queries [B, D], k,
    exclude=)`` → ``.keys``/``.scores`` [B, k], best first, key −1 and score −inf past the end):
    keys int64 [n, k] and scores float32 [n, k] for user vectors [n, U]; ``exclude``: per user, keys
    never returned. With K interests each interest's vector searches on its own and the lists are
    merged by maximum: the top ``k`` of the maximum over interests lie in the union of the
    interests' top ``k`` lists, so with an exact retriever the merge is exact too."""
    users = user_vectors if isinstance(user_vectors, Tensor) else torch.from_numpy(np.asarray(user_vectors))
    interests = getattr(model, "interests", 1)
    if interests == 1:
        found = retriever.search(users.float().cpu().numpy(), k, exclude=exclude)
        return np.asarray(found.keys, dtype=np.int64), np.asarray(found.scores, dtype=np.float32)
    n = users.shape[0]
    with torch.inference_mode():
        queries = model.interest_queries(users.float()).reshape(n * interests, -1).cpu().numpy()
    found = retriever.search(queries, k, exclude=None if exclude is None else
                             [e for e in exclude for _ in range(interests)])
    return merge_by_maximum(np.asarray(found.keys, dtype=np.int64).reshape(n, -1),
                            np.asarray(found.scores, dtype=np.float32).reshape(n, -1), k)


def merge_by_maximum(keys: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (key, score) lists [n, m] (key −1 = none) → each row's ``k`` best distinct keys by
    their largest score, best first (ties: the earlier entry), padded with −1 / −inf."""
    n, m = keys.shape
    scores = np.where(keys >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")
    keys, scores = np.take_along_axis(keys, order, 1), np.take_along_axis(scores, order, 1)
    # in score order, a (row, key) pair's first entry is its largest score; later ones are dropped
    pairs = np.arange(n)[:, None] * (int(keys.max(initial=0)) + 2) + keys + 1
    first = np.zeros(n * m, dtype=bool)
    first[np.unique(pairs.ravel(), return_index=True)[1]] = True
    drop = ~first.reshape(n, m) | (keys < 0)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept entries first, in score order
    dropped = np.take_along_axis(drop, keep, 1)
    out_keys = np.where(dropped, -1, np.take_along_axis(keys, keep, 1))
    out_scores = np.where(dropped, -np.inf, np.take_along_axis(scores, keep, 1)).astype(np.float32)
    if out_keys.shape[1] < k:
        pad = k - out_keys.shape[1]
        out_keys = np.pad(out_keys, ((0, 0), (0, pad)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_keys, out_scores


def score_histories(model: nn.Module, news_vectors: Tensor, histories: Histories, candidates: np.ndarray,
                    candidate_counts: np.ndarray, *, history_len: int | None, batch_size: int = 1024,
                    show_progress: bool = False) -> np.ndarray:
    """Click scores float32 [M] of ``candidates`` (flat, ``candidate_counts`` [n] per history) for
    ``histories`` [n]: each distinct (truncated) history is encoded once, then one ``model.score``
    per candidate."""
    distinct, of_row = histories.distinct(history_len)
    user_vectors = encode_users(model, news_vectors, distinct, history_len=None, batch_size=batch_size,
                                show_progress=show_progress)
    user_of_candidate = np.repeat(of_row, np.asarray(candidate_counts, dtype=np.int64))
    return score_candidates(model, user_vectors, news_vectors, user_of_candidate, candidates)


def encode_impression_users(model: nn.Module, news_vectors: Tensor, impressions: Impressions, *,
                            history_len: int, batch_size: int = 1024, show_progress: bool = False) -> Tensor:
    """User vectors float32 [n_impressions, U], one per impression (distinct histories encoded once)."""
    distinct, of_row = Histories.of_impressions(impressions).distinct(history_len)
    users = encode_users(model, news_vectors, distinct, history_len=None, batch_size=batch_size,
                         show_progress=show_progress)
    return users[torch.from_numpy(of_row).to(users.device)]


def score_impressions(model: nn.Module, dataset: DatasetArtifact | None, impressions: Impressions, *,
                      history_len: int, batch_size: int = 1024, device: str | torch.device = "cpu",
                      news_vectors: Tensor | None = None, show_progress: bool = True) -> np.ndarray:
    """Click scores float32 [M] aligned with ``impressions.candidates``.

    Each news is encoded once (or ``news_vectors`` [n_news + 1, D] are reused; then ``dataset`` may
    be None), each distinct truncated history once, then one ``model.score`` per candidate. Equal
    to scoring every impression with the full model (``score_impressions_slow``) up to float rounding.
    """
    device = torch.device(device)
    if news_vectors is None:
        news_vectors = encode_all_news(model, dataset, batch_size=batch_size, device=device,
                                       show_progress=show_progress)
    return score_histories(model, news_vectors.to(device), Histories.of_impressions(impressions),
                           impressions.candidates, impressions.candidate_counts, history_len=history_len,
                           batch_size=batch_size, show_progress=show_progress)


def score_impressions_slow(model: nn.Module, dataset: DatasetArtifact, impressions: Impressions,
                           rows: np.ndarray, *, history_len: int, device: str | torch.device = "cpu"
                           ) -> np.ndarray:
    """The full model, one impression at a time: encode its candidates' and its history's news from
    their inputs directly, then the user, then the scores. float32 scores of ``rows``' candidates,
    concatenated in ``rows`` order."""
    device = torch.device(device)
    features = model_news_features(model, dataset)
    histories = Histories.of_impressions(impressions)
    out: list[np.ndarray] = []
    with inference_mode(model):
        for i in np.asarray(rows, dtype=np.int64):
            candidates = impressions.candidates_of(int(i)).astype(np.int64)
            idx, mask = histories.padded(np.array([i]), history_len=history_len)  # (1, N)
            history = idx[mask]
            candidate_vectors = model.encode_news(NewsInputs.from_arrays(features.gather(candidates), device))
            history_vectors = torch.zeros(idx.shape[1], model.news_dim, device=device)  # (N, D)
            if len(history):
                history_vectors[:len(history)] = model.encode_news(
                    NewsInputs.from_arrays(features.gather(history), device))
            user = model.encode_user(history_vectors.unsqueeze(0), torch.from_numpy(mask).to(device))  # (1, U)
            out.append(model.score(user, candidate_vectors.unsqueeze(0))[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
