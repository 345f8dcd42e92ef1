"""Fast evaluation: encode every news once, every distinct user history once, then dot products.

``score_impressions`` is what training (per-epoch dev metrics), ``newsrec evaluate``, ``newsrec
submit`` and ``newsrec score`` use. ``score_impressions_slow`` runs the full model per impression
(candidate titles and history titles encoded directly) and is the reference the fast path is
checked against (``newsrec evaluate --check-slow N``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.config import ModelConfig
from newsrec.data.artifact import DatasetArtifact, Impressions
from newsrec.data.features import NewsFeatures, news_features
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.eval import metrics as M
from newsrec.models.inputs import NewsInputs
from newsrec.train.distributed import resolve_device
from newsrec.utils.progress import progress

HISTORY_BUCKETS = ((0, 0), (1, 9), (10, 49), (50, 199), (200, None))  # inclusive bounds of clicks


def _quiet(show_progress: bool) -> bool | None:
    """tqdm's ``disable``: True hides the bar, None lets tqdm hide it when stderr is not a terminal."""
    return None if show_progress else True


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode + no autograd for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def model_news_features(model: nn.Module, dataset: DatasetArtifact) -> NewsFeatures:
    """The news inputs ``model`` reads over ``dataset`` (for a PLM model, the cached states of the
    backbone it was trained with)."""
    model_cfg = getattr(model, "cfg", None) or ModelConfig()  # a model without settings reads words
    return news_features(dataset, model_cfg, plm_fingerprint=getattr(model, "plm_fingerprint", None))


def _news_inputs(features: NewsFeatures, rows: np.ndarray, device: torch.device) -> NewsInputs:
    """The encoder's inputs for news_idx ``rows`` on ``device``."""
    return NewsInputs.from_arrays(features.gather(rows), device)


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
    with _inference(model):
        for start in progress(starts, desc="encode news", unit="batch", disable=_quiet(show_progress)):
            rows = np.arange(start, min(start + batch_size, n_news + 1))
            out[start:start + len(rows)] = model.encode_news(_news_inputs(features, rows, device)).float()
    return out


@dataclass
class DistinctHistories:
    """Each impression's history truncated to the most recent ``history_len`` clicks, deduplicated.

    ``values``/``offsets``: CSR of the distinct histories (news_idx, oldest first);
    ``of_impression``: int64 [n_impressions], which distinct history each impression uses.
    """

    values: np.ndarray
    offsets: np.ndarray
    of_impression: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


def truncated_history_bounds(impressions: Impressions, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) int64 [n]: each impression's most recent ``history_len`` clicks."""
    end = impressions.history_offsets[1:]
    start = np.maximum(impressions.history_offsets[:-1], end - history_len)
    return start, end


def distinct_histories(impressions: Impressions, *, history_len: int) -> DistinctHistories:
    """Deduplicate the impressions' (truncated) histories: a user with many impressions and the
    same history is encoded once."""
    start, end = truncated_history_bounds(impressions, history_len)
    history = impressions.history
    index_of: dict[bytes, int] = {}
    of_impression = np.empty(len(impressions), dtype=np.int64)
    first_row: list[int] = []
    for i, (s, e) in enumerate(zip(start.tolist(), end.tolist())):
        key = history[s:e].tobytes()
        j = index_of.get(key)
        if j is None:
            j = index_of[key] = len(first_row)
            first_row.append(i)
        of_impression[i] = j
    rows = np.asarray(first_row, dtype=np.int64)
    lengths = end[rows] - start[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.repeat(start[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return DistinctHistories(values=history[gather], offsets=offsets, of_impression=of_impression)


def encode_histories(model: nn.Module, news_vectors: Tensor, values: np.ndarray, offsets: np.ndarray, *,
                     batch_size: int = 1024, show_progress: bool = True) -> Tensor:
    """User vectors float32 [n, D] for the histories in CSR (``values`` news_idx, ``offsets`` [n + 1]).

    Histories are grouped by length so that each batch pads little; clicks are right-padded
    (mask True = click), as the model's ``encode_user`` expects.
    """
    device = news_vectors.device
    lengths = np.diff(offsets)
    n = len(lengths)
    users = torch.zeros(n, news_vectors.shape[1], dtype=torch.float32, device=device)
    order = np.argsort(lengths, kind="stable")
    with _inference(model):
        for b in progress(range(0, n, batch_size), desc="encode users", unit="batch",
                          disable=_quiet(show_progress)):
            rows = order[b:b + batch_size]
            row_lengths = lengths[rows]
            width = max(int(row_lengths.max()), 1)
            # (B, N) news_idx, right-padded with 0 (the zero padding news)
            positions = np.arange(width)
            mask = positions[None, :] < row_lengths[:, None]
            idx = np.zeros(mask.shape, dtype=np.int64)
            idx[mask] = values[(offsets[rows][:, None] + positions[None, :])[mask]]
            idx_t = torch.from_numpy(idx).to(device)
            mask_t = torch.from_numpy(mask).to(device)
            users[torch.from_numpy(rows).to(device)] = model.encode_user(news_vectors[idx_t], mask_t).float()
    return users


def score_candidates(model: nn.Module, user_vectors: Tensor, news_vectors: Tensor, user_of_candidate: np.ndarray,
                     candidates: np.ndarray, *, chunk: int = 262_144) -> np.ndarray:
    """float32 [M]: ``model.score`` of each (user, candidate) pair, in chunks of ``chunk`` pairs."""
    out = np.empty(len(candidates), dtype=np.float32)
    device = news_vectors.device
    with _inference(model):
        for s in range(0, len(candidates), chunk):
            users = user_vectors[torch.from_numpy(user_of_candidate[s:s + chunk]).to(device)]  # (m, D)
            news = news_vectors[torch.from_numpy(candidates[s:s + chunk].astype(np.int64)).to(device)]
            out[s:s + len(users)] = model.score(users, news.unsqueeze(1)).squeeze(1).float().cpu().numpy()
    return out


def score_impressions(model: nn.Module, dataset: DatasetArtifact, impressions: Impressions, *,
                      history_len: int, batch_size: int = 1024, device: str | torch.device = "cpu",
                      news_vectors: Tensor | None = None, show_progress: bool = True) -> np.ndarray:
    """Click scores float32 [M] aligned with ``impressions.candidates``.

    Each news is encoded once (or ``news_vectors`` [n_news + 1, D] are reused), each distinct
    truncated history once, then one ``model.score`` per candidate. Equal to scoring every
    impression with the full model (``score_impressions_slow``) up to float rounding.
    """
    device = torch.device(device)
    if news_vectors is None:
        news_vectors = encode_all_news(model, dataset, batch_size=batch_size, device=device,
                                       show_progress=show_progress)
    news_vectors = news_vectors.to(device)
    histories = distinct_histories(impressions, history_len=history_len)
    user_vectors = encode_histories(model, news_vectors, histories.values, histories.offsets,
                                    batch_size=batch_size, show_progress=show_progress)
    user_of_candidate = np.repeat(histories.of_impression, impressions.candidate_counts)
    return score_candidates(model, user_vectors, news_vectors, user_of_candidate, impressions.candidates)


def score_impressions_slow(model: nn.Module, dataset: DatasetArtifact, impressions: Impressions,
                           rows: np.ndarray, *, history_len: int, device: str | torch.device = "cpu"
                           ) -> np.ndarray:
    """The full model, one impression at a time: encode its candidates' titles and its history's
    titles directly, then the user, then the scores. float32 scores of ``rows``' candidates,
    concatenated in ``rows`` order."""
    device = torch.device(device)
    features = model_news_features(model, dataset)
    out: list[np.ndarray] = []
    with _inference(model):
        for i in np.asarray(rows, dtype=np.int64):
            candidates = impressions.candidates_of(int(i)).astype(np.int64)
            history = impressions.history_of(int(i), history_len).astype(np.int64)
            candidate_vectors = model.encode_news(_news_inputs(features, candidates, device))  # (C, D)
            if len(history):
                history_vectors = model.encode_news(_news_inputs(features, history, device))  # (N, D)
            else:
                history_vectors = torch.zeros(1, model.news_dim, device=device)
            mask = torch.tensor([[len(history) > 0] * len(history_vectors)], device=device)
            user = model.encode_user(history_vectors.unsqueeze(0), mask)  # (1, D)
            out.append(model.score(user, candidate_vectors.unsqueeze(0))[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the `newsrec evaluate` stage


@dataclass
class InferenceInputs:
    """A loaded first-stage model with the dataset it scores (checked compatible)."""

    model: nn.Module
    config: Any  # newsrec.config.Config the model was trained with
    manifest: dict[str, Any]
    model_dir: Path
    dataset: DatasetArtifact
    device: torch.device

    @property
    def history_len(self) -> int:
        return int(self.config.data.history_len)

    @property
    def batch_size(self) -> int:
        return int(self.config.train.eval_batch_size)

    @property
    def mlflow_run_id(self) -> str | None:
        return (self.manifest.get("extra") or {}).get("mlflow_run_id") or None


def load_for_inference(model_dir: str | Path, data_dir: str | Path, *, device: str | None = None
                       ) -> InferenceInputs:
    """Load MODEL_DIR (weights only, no pickle) and the dataset artifact; refuse incompatible pairs."""
    from newsrec.inference.model_io import check_compatible, load_model

    dataset = DatasetArtifact(data_dir)
    loaded = load_model(model_dir)
    check_compatible(loaded.manifest, dataset)
    if loaded.manifest.get("title_len") not in (None, dataset.title_len):
        raise ArtifactError(f"{dataset.root}: titles are {dataset.title_len} tokens, the model was trained "
                            f"on {loaded.manifest['title_len']}; use the dataset the model was trained on")
    target = resolve_device(device or loaded.config.train.device)
    loaded.model.to(target)
    return InferenceInputs(model=loaded.model, config=loaded.config, manifest=loaded.manifest,
                           model_dir=Path(model_dir), dataset=dataset, device=target)


def labelled_split(dataset: DatasetArtifact, split: str) -> Impressions:
    impressions = dataset.impressions(split)
    if not impressions.has_labels:
        raise NewsrecError(f"{dataset.root}: split '{split}' has no labels, so it cannot be evaluated; "
                           f"evaluate on dev, or write a leaderboard file with `newsrec submit --split {split}`")
    return impressions


def seen_news_mask(dataset: DatasetArtifact) -> np.ndarray:
    """bool [n_news + 1]: news seen in training (shown in a train impression or clicked in a train
    history). Everything else is cold-start news."""
    news = dataset.news
    seen = np.zeros(dataset.n_news + 1, dtype=bool)
    idx = news["news_idx"].to_numpy()
    seen[idx] = (news["train_impressions"].to_numpy() > 0) | (news["train_history_clicks"].to_numpy() > 0)
    return seen


def history_bucket_name(low: int, high: int | None) -> str:
    if high is None:
        return f"{low}+"
    return str(low) if low == high else f"{low}-{high}"


def breakdowns(impressions: Impressions, scores: np.ndarray, *, seen: np.ndarray) -> dict[str, dict[str, Any]]:
    """Metrics by history length bucket (the user's full number of clicks) and over seen vs unseen
    candidate news (each impression restricted to those candidates)."""
    labels, offsets = impressions.labels, impressions.candidate_offsets
    per_impression = M.impression_metrics(labels, scores, offsets)
    history_lengths = impressions.history_lengths
    by_history = {}
    for low, high in HISTORY_BUCKETS:
        in_bucket = history_lengths >= low
        if high is not None:
            in_bucket &= history_lengths <= high
        by_history[history_bucket_name(low, high)] = M.summarize(per_impression, in_bucket)
    by_candidates = {}
    candidate_seen = seen[impressions.candidates]
    for name, keep in (("seen", candidate_seen), ("unseen", ~candidate_seen)):
        sel_labels, sel_scores, sel_offsets = M.select_candidates(labels, scores, offsets, keep)
        summary = M.compute_metrics(sel_labels, sel_scores, sel_offsets)
        summary["candidates"] = int(keep.sum())
        by_candidates[name] = summary
    return {"history": by_history, "candidates": by_candidates}


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]  # what metrics.json holds
    scores: np.ndarray = field(repr=False)  # float32 [M] aligned with the split's candidates
    out: Path | None = None
    run_id: str | None = None

    def table(self) -> str:
        rows = {"all": self.metrics}
        for name, values in self.metrics["breakdown"]["history"].items():
            rows[f"history {name}"] = values
        for name, values in self.metrics["breakdown"]["candidates"].items():
            rows[f"{name} news"] = values
        return M.format_table(rows)


def check_fast_equals_slow(inputs: InferenceInputs, impressions: Impressions, fast_scores: np.ndarray,
                           n: int, *, seed: int = 0, tolerance: float = 1e-5) -> dict[str, Any]:
    """Re-score ``n`` random impressions with the full model per impression and compare.

    Raises NewsrecError when any score differs by more than ``tolerance`` (absolute, or relative for
    large scores); returns ``{"impressions", "max_abs_diff", "slow_seconds_per_impression"}``.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(impressions), size=min(n, len(impressions)), replace=False))
    start = time.perf_counter()
    slow = score_impressions_slow(inputs.model, inputs.dataset, impressions, rows,
                                  history_len=inputs.history_len, device=inputs.device)
    elapsed = time.perf_counter() - start
    picked = np.concatenate([np.arange(impressions.candidate_offsets[i], impressions.candidate_offsets[i + 1])
                             for i in rows]) if len(rows) else np.zeros(0, dtype=np.int64)
    fast = fast_scores[picked]
    diff = np.abs(fast.astype(np.float64) - slow)
    limit = tolerance * np.maximum(1.0, np.abs(slow))
    if (diff > limit).any():
        worst = int(np.argmax(diff - limit))
        raise NewsrecError(f"fast and full-model scores differ by {diff[worst]:.3g} (> {tolerance:g}) on "
                           f"{int((diff > limit).sum())} of {len(diff)} candidates; the model's encoders "
                           f"are not padding-invariant or not deterministic in eval mode")
    return {"impressions": int(len(rows)), "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
            "slow_seconds_per_impression": elapsed / max(len(rows), 1)}


def json_safe(value: Any) -> Any:
    """A copy of nested dicts/lists with NaN replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def evaluate(model_dir: str | Path, data_dir: str | Path, *, split: str = "dev", out: str | Path | None = None,
             reranker: str | Path | None = None, rerank_use: str | None = None, check_slow: int = 0,
             device: str | None = None, log_to_mlflow: bool = True, show_progress: bool = True) -> EvaluationResult:
    """The ``newsrec evaluate`` stage: score a labelled split with the fast path and report metrics.

    Writes ``out`` (metrics.json) atomically when given, logs the metrics to MLflow (the model's
    training run when it is in the store, else a new run). ``reranker``: a RERANKER_DIR trained on
    this model; the two-stage model then scores the impressions' candidates where ``rerank_use``
    (auto | always | never; None = the re-ranker's ``rerank.use``) allows. ``check_slow``: also
    re-score that many impressions with the full model per impression and fail if they differ.
    """
    from newsrec.utils.io import write_json

    inputs = load_for_inference(model_dir, data_dir, device=device)
    impressions = labelled_split(inputs.dataset, split)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    news_vectors = encode_all_news(inputs.model, inputs.dataset, batch_size=inputs.batch_size,
                                   device=inputs.device, show_progress=show_progress)
    timing["encode_news_seconds"] = time.perf_counter() - start
    first_stage = score_impressions(inputs.model, inputs.dataset, impressions, history_len=inputs.history_len,
                                    batch_size=inputs.batch_size, device=inputs.device,
                                    news_vectors=news_vectors, show_progress=show_progress)
    timing["score_seconds"] = time.perf_counter() - start
    check = None
    if check_slow > 0:
        check = check_fast_equals_slow(inputs, impressions, first_stage, check_slow)
    scores = first_stage
    two_stage = None
    if reranker is not None:
        start_rerank = time.perf_counter()
        two_stage = rerank_scores(reranker, inputs, impressions, first_stage, use=rerank_use,
                                  show_progress=show_progress)
        scores = two_stage.scores
        timing["rerank_seconds"] = time.perf_counter() - start_rerank
    start_metrics = time.perf_counter()
    metrics: dict[str, Any] = M.compute_metrics(impressions.labels, scores, impressions.candidate_offsets)
    metrics["breakdown"] = breakdowns(impressions, scores, seen=seen_news_mask(inputs.dataset))
    if reranker is not None:
        metrics["first_stage"] = M.compute_metrics(impressions.labels, first_stage, impressions.candidate_offsets)
    timing["metrics_seconds"] = time.perf_counter() - start_metrics
    metrics.update({
        "split": split, "model": str(inputs.model_dir), "reranker": str(reranker) if reranker else None,
        "reranked": bool(two_stage and two_stage.reranked),
        "rerank_decision": two_stage.decision if two_stage else None,
        "data": str(inputs.dataset.root), "candidates": int(len(scores)), "timing": timing,
    })
    if check is not None:
        metrics["check_slow"] = check
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        write_json(out_path, json_safe(metrics))
    run_id = None
    if log_to_mlflow and inputs.config.tracking.enabled:
        from newsrec.train import tracking

        prefix = f"{split}_two_stage_" if metrics["reranked"] else f"{split}_"
        flat = {f"{prefix}{k}": metrics[k] for k in (*M.METRIC_NAMES, "impressions", "no_click", "no_nonclick")}
        for group, rows in metrics["breakdown"].items():
            for name, values in rows.items():
                for k in M.METRIC_NAMES:
                    flat[f"{prefix}{group}_{name}_{k}".replace("+", "plus")] = values[k]
        run_id = tracking.log_evaluation(inputs.config.tracking, run_id=inputs.mlflow_run_id, metrics=flat,
                                         artifacts=[out_path] if out_path is not None else [])
    return EvaluationResult(metrics=metrics, scores=scores, out=out_path, run_id=run_id)


@dataclass
class TwoStageScores:
    """Scores float32 [M] of a split's candidates with the stages chosen, whether the re-ranker was
    used, and the one line saying why (see ``newsrec.inference.rerank.two_stage_decision``)."""

    scores: np.ndarray
    reranked: bool
    decision: str


def rerank_scores(reranker: str | Path, inputs: InferenceInputs, impressions: Impressions,
                  first_stage: np.ndarray, *, use: str | None = None,
                  show_progress: bool = True) -> TwoStageScores:
    """Two-stage scores of the impressions' candidates (the re-ranker, trained on this very model,
    given the first stage's scores [M]) where ``use`` (``rerank.use``: auto | always | never; None
    = the re-ranker's own config) allows; else the first stage's scores unchanged."""
    from newsrec.inference.features import EventLog
    from newsrec.inference.rerank import open_two_stage

    loaded, why = open_two_stage(reranker, retriever_dir=inputs.model_dir, use=use,
                                 map_location=str(inputs.device))
    if loaded is None:
        return TwoStageScores(np.asarray(first_stage, dtype=np.float32), False, why)
    scores = loaded.score_impressions(impressions, retrieval_scores=first_stage,
                                      log=EventLog.of_dataset(inputs.dataset, {impressions.split: impressions}),
                                      show_progress=show_progress)
    return TwoStageScores(scores, True, why)
