"""The ``newsrec evaluate`` stage: score a labelled split through the inference layer
(``newsrec.inference.scoring.score_impressions``; with a re-ranker,
``newsrec.inference.rerank.two_stage_scores``) and report the official metrics with breakdowns.
``--check-slow N`` re-scores N impressions with the full model per impression
(``score_impressions_slow``) and fails if they differ.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from newsrec.data.artifact import DatasetArtifact, Impressions
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.eval import metrics as M
from newsrec.inference.rerank import two_stage_scores
from newsrec.inference.scoring import encode_all_news, score_impressions, score_impressions_slow
from newsrec.train.distributed import resolve_device

HISTORY_BUCKETS = ((0, 0), (1, 9), (10, 49), (50, 199), (200, None))  # inclusive bounds of clicks


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
        two_stage = two_stage_scores(reranker, retriever_dir=inputs.model_dir, dataset=inputs.dataset,
                                     impressions=impressions, first_stage_scores=first_stage, use=rerank_use,
                                     device=inputs.device, show_progress=show_progress)
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
