"""The re-ranking stage: ``newsrec train --stage rerank --retriever MODEL_DIR``.

``fit_reranker`` trains the candidate-aware re-ranker (``newsrec.models.reranker``) over a trained,
frozen first stage, and decides whether it may be used:

1. the train log is cut by time: the re-ranker learns from its latest ``rerank.train_fraction``
   (the slice); the latest ``rerank.guard_fraction`` of the slice is held out (the guard slice);
2. the first-stage scores it learns from are out-of-sample (``rerank.first_stage``): the
   retriever's own, where the slice is later than every impression it trained on (at the defaults
   the slice is the retriever's held-out slice, which only chose its epoch), else those of a first
   stage with the retriever's config fit on the train log before the slice. The retriever itself
   scores dev, test and serving requests, which it never saw either. The re-ranker reads the
   retriever's news vectors (those it will meet at serving);
3. feature rows come from ``newsrec.inference.features.feature_rows`` over the log as the re-ranker
   would see it after the train split: labels (clicks, for popularity) of the train log before the
   slice only, showings of every split strictly before each impression's time — so training rows
   hold news shown since the labels end, with exposure and no clicks, as dev, test and serving do;
4. samples are NRMS-style: each click with ``rerank.npratio`` non-clicks of the same impression
   (drawn afresh each epoch) plus ``rerank.hard_negatives`` (default 0) retrieved negatives —
   news the first stage ranks in its top ``rerank.hard_negative_pool`` for that user among the
   news available at the impression's time, never any news the user clicked anywhere in the train
   log (they teach "never shown" as "not clicked", which hurt every impression ranking measured;
   docs/decisions.md); softmax cross-entropy; AdamW at a constant rate after a warm-up of at most
   one epoch. Features that are constant over the training rows are dropped;
5. after each epoch the two-stage model is measured on the guard slice; training stops after
   ``rerank.patience`` epochs without a better guard AUC (at most ``rerank.epochs``) and the best
   epoch is kept. The verdict is cross-fitted so that choosing the epoch does not flatter it: the
   guard's users are split in two halves, and each half is scored by the epoch that was best on
   the other (``cross_fitted``). The guard records both stages' metrics, the paired per-impression
   gains with their standard errors, and whether the two-stage model won (``guard_comparison``: AUC
   gain above ``rerank.guard_auc_margin`` by ``rerank.guard_auc_z`` standard errors, nDCG@10 not
   surely worse, by ``rerank.guard_ndcg_z``). ``rerank.use`` = auto uses the two-stage model only
   then;
6. dev metrics of both stages are reported (never used to choose anything); all goes to MLflow and
   the re-ranker's manifest.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from newsrec.config import Config
from newsrec.data import schema
from newsrec.data.artifact import DatasetArtifact, Impressions, concat_impressions, open_dataset
from newsrec.data.popularity import datetime64_to_seconds, unseen_in_train
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.eval.metrics import (METRIC_NAMES, compute_metrics, impression_metrics, select_candidates,
                                  summarize)
from newsrec.inference.features import (FEATURE_NAMES, EventLog, LogCounts, news_tables, padded_candidates,
                                        right_padded)
from newsrec.inference.histories import padded_histories
from newsrec.inference.rerank import LoadedReranker, save_reranker
from newsrec.inference.scoring import (encode_all_news, encode_impression_users, score_candidates, score_pool,
                                       score_impressions)
from newsrec.models.reranker import Reranker
from newsrec.train.distributed import resolve_device
from newsrec.utils.io import sha256_file
from newsrec.utils.progress import progress


@dataclass
class RerankFitResult:
    """What ``fit_reranker`` produced: the directory, the guard and dev metrics, the MLflow run."""

    out_dir: Path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # dev: {"first_stage", "two_stage", ...}
    guard: dict[str, Any] = field(default_factory=dict)  # {"first_stage", "two_stage", "won", ...}
    run_id: str | None = None
    train_samples: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# first-stage helpers (the retriever is frozen)


def _first_stage_scores(model: Any, user_vectors: torch.Tensor, news_vectors: torch.Tensor,
                        impressions: Impressions) -> np.ndarray:
    """``score_candidates`` of each impression's candidates with its user: float32 [M]."""
    user_of_candidate = np.repeat(np.arange(len(impressions)), impressions.candidate_counts)
    return score_candidates(model, user_vectors, news_vectors, user_of_candidate, impressions.candidates)


def available_mask(first_seen: np.ndarray, first_seen_known: np.ndarray, now_seconds: np.ndarray) -> np.ndarray:
    """Which news are in the pool at each moment: bool [B, n_news + 1]. A news is available once it
    was first shown (news never shown as candidates — older ones — always are); row 0 never."""
    ok = (~first_seen_known)[None, :] | (first_seen[None, :] <= now_seconds[:, None])
    ok[:, 0] = False
    return ok


@torch.inference_mode()
def retrieve_top(model: Any, user_vectors: torch.Tensor, news_vectors: torch.Tensor, impressions: Impressions,
                 *, k: int, first_seen: np.ndarray, first_seen_known: np.ndarray,
                 exclude_candidates: bool, excluded: tuple[np.ndarray, np.ndarray] | None = None,
                 batch_size: int = 256, desc: str = "retrieving") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` news by first-stage score for each impression's user, among the news available
    at the impression's time, excluding the user's history (with ``exclude_candidates``, the
    impression's own candidates; with ``excluded`` = (news_idx, offsets [n + 1]) in CSR, those news
    of each impression). Returns (news_idx int64 [n, k], scores float32 [n, k]); slots left when
    fewer news qualify hold news_idx 0 and score -inf.
    """
    n_all = news_vectors.shape[0]
    k = min(k, n_all - 1)
    now = datetime64_to_seconds(impressions.time)
    top_idx = np.zeros((len(impressions), k), dtype=np.int64)
    top_scores = np.full((len(impressions), k), -np.inf, dtype=np.float32)
    for start in progress(range(0, len(impressions), batch_size), desc=desc, unit="batch"):
        rows = np.arange(start, min(start + batch_size, len(impressions)))
        users = user_vectors[torch.from_numpy(rows)]  # (b, U)
        scores = score_pool(model, users, news_vectors).float()  # (b, n): the first stage's score of each news
        allowed = torch.from_numpy(available_mask(first_seen, first_seen_known, now[rows]))
        hist, hmask = padded_histories(impressions, rows, history_len=None)  # every click: never retrieved
        allowed.scatter_(1, torch.from_numpy(np.where(hmask, hist, 0)), False)
        if exclude_candidates:
            cand, _, _ = padded_candidates(impressions, rows)
            allowed.scatter_(1, torch.from_numpy(cand), False)
        if excluded is not None:
            values, offsets = excluded
            rows_excluded = right_padded([values[offsets[r]:offsets[r + 1]] for r in rows], np.int64)
            allowed.scatter_(1, torch.from_numpy(rows_excluded), False)
        scores = scores.masked_fill(~allowed, -math.inf)
        values, idx = torch.topk(scores, k, dim=1)
        idx = torch.where(torch.isfinite(values), idx, torch.zeros_like(idx))
        top_idx[rows] = idx.numpy()
        top_scores[rows] = values.numpy()
    return top_idx, top_scores




# ------------------------------------------------------------------------------------------------
# the time slices and the out-of-sample first stage


@dataclass(frozen=True)
class TimeSlices:
    """Rows of the train log (int64, time order kept): ``early`` (before the re-ranker's slice:
    the labels it may count, the first stage's fit), ``fit`` (the re-ranker learns from them) and
    ``guard`` (the latest: epoch selection and the guard). ``slice_start`` and ``guard_start``:
    seconds since the epoch where the later parts begin."""

    early: np.ndarray
    fit: np.ndarray
    guard: np.ndarray
    slice_start: float
    guard_start: float


def time_slices(times: np.ndarray, *, train_fraction: float, guard_fraction: float) -> TimeSlices:
    """Cut a log by time (datetime64 [n]): the latest ``train_fraction`` of its rows form the
    re-ranker's slice, the latest ``guard_fraction`` of the slice its guard. Rows at the same
    second stay together. ArrayError-free: raises NewsrecError when a part comes out empty."""
    sec = np.floor(datetime64_to_seconds(times))
    order = np.sort(sec)
    n = len(order)
    n_slice = max(1, math.ceil(n * train_fraction))
    slice_start = float(order[n - n_slice]) if n else 0.0
    in_slice = order[order >= slice_start]
    n_guard = max(1, math.ceil(len(in_slice) * guard_fraction))
    guard_start = float(in_slice[len(in_slice) - n_guard]) if len(in_slice) else 0.0
    early = np.flatnonzero(sec < slice_start)
    fit = np.flatnonzero((sec >= slice_start) & (sec < guard_start))
    guard = np.flatnonzero(sec >= guard_start)
    for name, rows in (("before the re-ranker's slice", early), ("to train the re-ranker on", fit),
                       ("for its guard", guard)):
        if len(rows) == 0:
            raise NewsrecError(f"the train log ({n} impressions) leaves no impression {name} with "
                               f"rerank.train_fraction={train_fraction} and rerank.guard_fraction="
                               f"{guard_fraction}; change them or use a longer log")
    return TimeSlices(early=early, fit=fit, guard=guard, slice_start=slice_start, guard_start=guard_start)


def retriever_trained_until(manifest: dict[str, Any]) -> float | None:
    """Seconds since the epoch of the latest impression the retriever whose manifest this is trained
    on (its held-out slice, which only chose its epoch, excluded); None when that is not recorded
    (no held-out slice: it trained on its whole fit log, whose end the manifest does not give)."""
    holdout = (manifest.get("extra") or {}).get("holdout") or {}
    until = holdout.get("train_time_to")
    if holdout.get("selection") != "holdout" or not until:
        return None
    return float(datetime64_to_seconds(np.array([np.datetime64(until, "s")]))[0])


def first_stage_source(setting: str, retriever_manifest: dict[str, Any], slice_start: float) -> str:
    """Which first stage scores the re-ranker's slice (starting at ``slice_start`` seconds):
    "retriever" or "refit", by ``rerank.first_stage``. The retriever qualifies only when the slice
    begins after the second of its last training impression (rows of that second may be its own)."""
    until = retriever_trained_until(retriever_manifest)
    out_of_sample = until is not None and slice_start > until
    if setting == "refit" or (setting == "auto" and not out_of_sample):
        return "refit"
    if not out_of_sample:
        raise NewsrecError(
            "rerank.first_stage=retriever: the retriever trained on impressions of the re-ranker's slice "
            + (f"(its training rows end {np.datetime64(int(until), 's')}, the slice begins "
               f"{np.datetime64(int(slice_start), 's')})" if until is not None
               else "(it kept no held-out slice)")
            + "; its scores there are in-sample: use rerank.first_stage=refit or auto")
    return "retriever"


def fit_first_stage_before(retriever: Any, dataset: DatasetArtifact, rows: np.ndarray, workdir: Path) -> Any:
    """A first stage with ``retriever``'s config fit on the train impressions ``rows`` only (no
    tracking, no dev split: nothing of dev chooses anything). Returns the trained module."""
    from newsrec.inference.model_io import load_model
    from newsrec.train.loop import fit

    data = workdir / "data"
    data.mkdir(parents=True)
    for path in dataset.root.iterdir():
        if path.name.startswith("behaviors-"):
            continue
        (data / path.name).symlink_to(path.resolve())
    dataset.behaviors("train")[np.asarray(rows, dtype=np.int64)].write_parquet(data / schema.behaviors_file("train"))
    # the slice's dataset holds only these train rows, whatever the retriever itself was fit on
    config = dataclasses.replace(retriever.config,
                                 tracking=dataclasses.replace(retriever.config.tracking, enabled=False),
                                 train=dataclasses.replace(retriever.config.train, fit_splits="train"))
    fit(config, data_dir=data, out_dir=workdir / "model")
    return load_model(workdir / "model").model


def clicked_by_user(impressions: Impressions, rows_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every news each user clicked anywhere in ``impressions`` (clicks in its impressions and the
    histories it shows), in CSR (news_idx int64, offsets [len(rows_users) + 1]) aligned with
    ``rows_users`` (object [m], the user of each row to answer for)."""
    users, codes = np.unique(impressions.user_id.astype(str), return_inverse=True)
    hist_user = np.repeat(codes, impressions.history_lengths)
    clicked = impressions.labels > 0
    cand_user = np.repeat(codes, impressions.candidate_counts)[clicked]
    pairs = np.unique(np.stack([np.concatenate([hist_user, cand_user]),
                                np.concatenate([impressions.history, impressions.candidates[clicked]])
                                .astype(np.int64)]), axis=1)
    starts = np.searchsorted(pairs[0], np.arange(len(users) + 1))
    where = np.searchsorted(users, rows_users.astype(str))
    known = (where < len(users)) & (users[np.minimum(where, len(users) - 1)] == rows_users.astype(str))
    pieces = [pairs[1, starts[w]:starts[w + 1]] if ok else np.zeros(0, np.int64) for w, ok in zip(where, known)]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int64)), offsets


# ------------------------------------------------------------------------------------------------
# training rows


@dataclass
class TrainingData:
    """Everything a training batch is cut from (arrays aligned with ``impressions``)."""

    impressions: Impressions
    now: np.ndarray  # float64 [n] impression time, seconds
    retrieval: np.ndarray  # float32 [M] out-of-sample first-stage score of each candidate
    hard_idx: np.ndarray  # int64 [n, K] retrieved news the user never clicked (0 = none)
    hard_scores: np.ndarray  # float32 [n, K]
    log: LogCounts  # the log the rows see
    samples: np.ndarray  # int64 [S] candidate positions (into M) of clicks: one sample each
    sample_row: np.ndarray  # int64 [S] impression of each sample


def training_rows(data: TrainingData, reranker: LoadedReranker, sample_ids: np.ndarray, *, npratio: int,
                  hard_negatives: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One batch: candidates [B, C] = click, ``npratio`` impression non-clicks, ``hard_negatives``
    retrieved ones; features from ``reranker.features_for`` (the path every score takes)."""
    imps = data.impressions
    b = len(sample_ids)
    c = 1 + npratio + hard_negatives
    cand = np.zeros((b, c), dtype=np.int64)
    mask = np.zeros((b, c), dtype=bool)
    ret = np.zeros((b, c), dtype=np.float64)
    rows = data.sample_row[sample_ids]
    for j, (pos, row) in enumerate(zip(data.samples[sample_ids], rows)):
        lo, hi = imps.candidate_offsets[row], imps.candidate_offsets[row + 1]
        negatives = lo + np.flatnonzero(imps.labels[lo:hi] == 0)
        if len(negatives) > npratio:
            negatives = rng.choice(negatives, npratio, replace=False)
        picks = np.concatenate([[pos], negatives]).astype(np.int64)
        n = len(picks)
        cand[j, :n] = imps.candidates[picks]
        ret[j, :n] = data.retrieval[picks]
        mask[j, :n] = True
        if hard_negatives:
            pool = np.flatnonzero(data.hard_idx[row] > 0)
            chosen = rng.choice(pool, min(hard_negatives, len(pool)), replace=False) if len(pool) else pool
            slot = slice(1 + npratio, 1 + npratio + len(chosen))
            cand[j, slot] = data.hard_idx[row, chosen]
            ret[j, slot] = data.hard_scores[row, chosen]
            mask[j, slot] = True
    hist, hist_mask = padded_histories(imps, rows, history_len=reranker.history_len)
    feats = reranker.features_for(data.log, history_idx=hist, history_mask=hist_mask, candidate_idx=cand,
                                  retrieval_scores=ret, now_seconds=data.now[rows])
    return {"history": hist, "history_mask": hist_mask, "candidates": cand, "candidate_mask": mask,
            "features": feats}


def _batch_loss(model: Reranker, batch: dict[str, np.ndarray], vectors: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """Softmax cross-entropy of the click (column 0) against the real negatives of each row."""
    scores = model(vectors[torch.from_numpy(batch["history"])].to(device),
                   torch.from_numpy(batch["history_mask"]).to(device),
                   vectors[torch.from_numpy(batch["candidates"])].to(device),
                   torch.from_numpy(batch["features"]).to(device))
    cand_mask = torch.from_numpy(batch["candidate_mask"]).to(device)
    scores = scores.masked_fill(~cand_mask, torch.finfo(scores.dtype).min)
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=device)
    return F.cross_entropy(scores, target)


def _with_click(impressions: Impressions, rows: np.ndarray, max_impressions: int = 0) -> np.ndarray:
    """``rows`` of labelled impressions holding a click and a candidate, the most recent
    ``max_impressions`` of them (0 = all)."""
    clicks = np.add.reduceat(impressions.labels.astype(np.int64), impressions.candidate_offsets[:-1]) \
        if len(impressions.labels) else np.zeros(len(impressions), dtype=np.int64)
    clicks = np.where(impressions.candidate_counts > 0, clicks, 0)
    rows = rows[clicks[rows] > 0]
    if max_impressions and len(rows) > max_impressions:
        order = np.argsort(impressions.time[rows], kind="stable")
        rows = np.sort(rows[order[-max_impressions:]])
    return rows


def feature_stats(data: TrainingData, reranker: LoadedReranker, rng: np.random.Generator, *, npratio: int,
                  hard_negatives: int, batch_size: int, n_batches: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Means and standard deviations (float64 [F]) of the features over real candidates of a
    few training batches."""
    rows = []
    for _ in range(n_batches):
        ids = rng.choice(len(data.samples), min(batch_size, len(data.samples)), replace=False)
        batch = training_rows(data, reranker, ids, npratio=npratio, hard_negatives=hard_negatives, rng=rng)
        rows.append(batch["features"][batch["candidate_mask"]])
    feats = np.concatenate(rows).astype(np.float64)
    return feats.mean(axis=0), feats.std(axis=0)


# ------------------------------------------------------------------------------------------------
# scoring and evaluation


def compare_on_impressions(labels: np.ndarray, offsets: np.ndarray, first_stage: np.ndarray,
                           two_stage: np.ndarray, cold: np.ndarray) -> dict[str, dict[str, Any]]:
    """Metrics of both stages on the impressions' candidates, overall and on cold candidates only
    (each impression restricted to its candidates where ``cold`` [M] is True)."""
    out = {"first_stage": compute_metrics(labels, first_stage, offsets),
           "two_stage": compute_metrics(labels, two_stage, offsets)}
    lab_c, first_c, off_c = select_candidates(labels, first_stage, offsets, cold)
    _, two_c, _ = select_candidates(labels, two_stage, offsets, cold)
    out["first_stage_cold"] = compute_metrics(lab_c, first_c, off_c)
    out["two_stage_cold"] = compute_metrics(lab_c, two_c, off_c)
    return out


def evaluate_retrieved(retriever: Any, reranker: LoadedReranker, impressions: Impressions, *, retrieve_k: int,
                       log: LogCounts, batch_size: int = 64,
                       device: str | torch.device = "cpu") -> dict[str, dict[str, Any]]:
    """Both stages on *retrieved* candidates: for each impression, the first stage retrieves its top
    ``retrieve_k`` news available at that time (history excluded); a retrieved news is relevant when
    the impression shows it clicked. The first stage ranks by its score, the two-stage model re-ranks
    the same list. ``log``: what the log tells before each impression (``EventLog.of_dataset``). Returns {"first_stage", "two_stage"} metrics (impressions where no click was
    retrieved count as ``no_click``) plus "recall" (share of clicks retrieved)."""
    model = getattr(retriever, "model", retriever)
    history_len = retriever.config.data.history_len
    vectors = torch.from_numpy(reranker.tables.vectors)
    n_news = int(reranker.manifest["n_news"])
    users = encode_impression_users(model, vectors[: n_news + 1].to(device), impressions, history_len=history_len,
                                    batch_size=batch_size * 4).cpu()
    t = reranker.tables
    top_idx, top_scores = retrieve_top(model, users, vectors[: n_news + 1], impressions, k=retrieve_k,
                                       first_seen=t.first_seen[: n_news + 1],
                                       first_seen_known=t.first_seen_known[: n_news + 1],
                                       exclude_candidates=False)
    k = top_idx.shape[1]
    clicked = np.zeros(top_idx.shape, dtype=np.int8)
    for i in range(len(impressions)):
        cands, labels = impressions.candidates_of(i), impressions.labels_of(i)
        clicked[i] = np.isin(top_idx[i], cands[labels > 0])
    valid = np.isfinite(top_scores)
    counts = valid.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    retrieved = Impressions(split=impressions.split, impression_id=impressions.impression_id,
                            user_id=impressions.user_id, time=impressions.time,
                            history=impressions.history, history_offsets=impressions.history_offsets,
                            candidates=top_idx[valid].astype(np.int32), candidate_offsets=offsets,
                            labels=clicked[valid])
    first = top_scores[valid].astype(np.float32)
    two = reranker.score_impressions(retrieved, retrieval_scores=first, log=log, batch_size=batch_size)
    total_clicks = int(sum(int(impressions.labels_of(i).sum()) for i in range(len(impressions))))
    return {"first_stage": compute_metrics(retrieved.labels, first, offsets),
            "two_stage": compute_metrics(retrieved.labels, two, offsets),
            "recall": {"clicks_retrieved": int(clicked.sum()), "clicks": total_clicks,
                       "recall": clicked.sum() / max(total_clicks, 1), "retrieve_k": k}}




# ------------------------------------------------------------------------------------------------
# the stage


def paired_gain(first: np.ndarray, two: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-impression differences ``two − first`` (float [n] each,
    NaN where a metric is undefined), over the impressions where both are defined. The standard
    error is inf below two impressions."""
    ok = np.isfinite(first) & np.isfinite(two)
    d = two[ok] - first[ok]
    if len(d) == 0:
        return 0.0, math.inf
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf


def guard_halves(user_id: np.ndarray) -> np.ndarray:
    """int8 [n]: the half (0 or 1) of each guard impression, by a stable hash of its user, so that a
    user's impressions stay together; by alternating impressions when the users fall in one half."""
    half = np.array([zlib.crc32(str(u).encode("utf-8")) & 1 for u in user_id], dtype=np.int8)
    if len(half) > 1 and half.min() == half.max():
        half = (np.arange(len(half)) % 2).astype(np.int8)
    return half


def cross_fitted(per_epoch: list[dict[str, np.ndarray]], half: np.ndarray) -> tuple[dict[str, np.ndarray], list[int]]:
    """The two-stage model's per-impression guard metrics (``impression_metrics`` of each epoch in
    ``per_epoch``) where each impression's come from the epoch with the best mean AUC on the *other*
    half (``half`` int8 [n]) — so the verdict on an impression never rests on its own choice of
    epoch. Returns the metrics and the epochs (1-based) chosen on half 0 and half 1."""
    chosen = []
    for h in (0, 1):
        means = [float(np.nanmean(m["auc"][half == h])) if np.isfinite(m["auc"][half == h]).any() else -math.inf
                 for m in per_epoch]
        chosen.append(int(np.argmax(means)))
    out = dict(per_epoch[0])
    for name in METRIC_NAMES:
        # impressions of half 0 take the epoch chosen on half 1, and the other way round
        out[name] = np.where(half == 0, per_epoch[chosen[1]][name], per_epoch[chosen[0]][name])
    return out, [c + 1 for c in chosen]


def guard_comparison(first: dict[str, np.ndarray], two: dict[str, np.ndarray], *, auc_margin: float,
                     auc_z: float, ndcg_tolerance: float, ndcg_z: float) -> dict[str, Any]:
    """Both stages on the guard slice (per-impression metrics of the same impressions, as
    ``impression_metrics`` gives them) and whether the two-stage model won there.

    The gains are means of paired per-impression differences (two-stage − first stage; AUC over
    impressions with a click and a non-click, nDCG@10 over impressions with a click), each with its
    standard error ``se``. The two-stage model wins when ``auc_gain − auc_z·se > auc_margin`` and
    ``ndcg10_gain + ndcg_z·se >= −ndcg_tolerance`` (its nDCG@10 is not surely worse). A slice of a
    few hundred impressions measures a gain to ±0.005–0.02; a bare comparison of two nDCG means
    there is a coin toss whenever the true difference is smaller. Returns {"first_stage",
    "two_stage" (``summarize``), "auc_gain", "auc_se", "ndcg10_gain", "ndcg10_se" (None below two
    impressions, which never win), "won"}.
    """
    auc_gain, auc_se = paired_gain(first["auc"], two["auc"])
    ndcg_gain, ndcg_se = paired_gain(first["ndcg@10"], two["ndcg@10"])
    measured = math.isfinite(auc_se) and math.isfinite(ndcg_se)
    won = bool(measured and auc_gain - auc_z * auc_se > auc_margin
               and ndcg_gain + ndcg_z * ndcg_se >= -ndcg_tolerance)
    finite = lambda se: se if math.isfinite(se) else None  # noqa: E731  (None: fewer than two impressions)
    return {"first_stage": summarize(first), "two_stage": summarize(two), "auc_gain": auc_gain,
            "auc_se": finite(auc_se), "ndcg10_gain": ndcg_gain, "ndcg10_se": finite(ndcg_se), "won": won}


def fit_reranker(config: Config, *, retriever_dir: str | Path, data_dir: str | Path,
                 out_dir: str | Path) -> RerankFitResult:
    """Train the re-ranker on ``data_dir``'s train log over the frozen first stage in
    ``retriever_dir``; write RERANKER_DIR ``out_dir`` (see ``newsrec.inference.rerank``)."""
    from newsrec.inference.model_io import check_compatible, load_model
    from newsrec.train import tracking

    started = time.perf_counter()
    rcfg = config.rerank
    dataset = open_dataset(data_dir)
    if "train" not in dataset.splits:
        raise ArtifactError(f"{dataset.root}: no train split; the re-ranker trains on train impressions")
    retriever = load_model(retriever_dir)
    check_compatible(retriever.manifest, dataset)
    device = resolve_device(config.train.device)
    torch.manual_seed(rcfg.seed)
    rng = np.random.default_rng(rcfg.seed)
    batch_eval = config.train.eval_batch_size
    cpu = torch.device("cpu")

    with tracking.start_run(config.tracking, run_name="rerank") as run:
        tracking.log_params(config.flat())
        tracking.log_params({"stage": "rerank", "retriever_dir": str(Path(retriever_dir).resolve()),
                             "data_dir": str(dataset.root.resolve())})
        tracking.set_tags(tracking.system_info(device=str(device), world_size=1))

        all_train = dataset.impressions("train")
        if all_train.labels is None:
            raise ArtifactError(f"{dataset.root}: the train split has no labels")
        opened = {"train": all_train}
        dev = dataset.impressions("dev") if "dev" in dataset.splits else None
        if dev is not None:
            opened["dev"] = dev
        full_log = EventLog.of_dataset(dataset, opened)
        parts = time_slices(all_train.time, train_fraction=rcfg.train_fraction, guard_fraction=rcfg.guard_fraction)
        # the log the re-ranker learns in: labels before its slice, showings of every split
        train_log = EventLog(all_train.select(parts.early), concat_impressions(
            [opened[s] if s in opened else dataset.impressions(s) for s in dataset.splits], split="log",
            drop_mixed_labels=True))

        news_vectors = encode_all_news(retriever.model.to(device), dataset, batch_size=batch_eval,
                                       device=device).detach().float().cpu()
        retriever.model.cpu()
        tables = news_tables(dataset, news_vectors.numpy(), full_log)
        history_len = rcfg.history_len or config.data.history_len
        model = Reranker(rcfg, news_dim=news_vectors.shape[1], n_features=len(FEATURE_NAMES))
        reranker = LoadedReranker(model=model, config=config, tables=tables, manifest={
            "n_news": dataset.n_news, "mean_ctr": full_log.mean_ctr, "popularity_prior": rcfg.popularity_prior,
            "log_end": full_log.end_seconds})

        # out-of-sample first-stage scores of the slice
        source = first_stage_source(rcfg.first_stage, retriever.manifest, parts.slice_start)
        tracking.log_params({"rerank.first_stage_source": source})
        if source == "refit":
            with tempfile.TemporaryDirectory(prefix="newsrec-first-stage-") as work:
                first_model = fit_first_stage_before(retriever, dataset, parts.early, Path(work)).cpu().eval()
            first_vectors = encode_all_news(first_model, dataset, batch_size=batch_eval, device=cpu).float()
        else:
            first_model, first_vectors = retriever.model.eval(), news_vectors
        first_history_len = retriever.config.data.history_len

        fit_rows = _with_click(all_train, parts.fit, rcfg.max_train_impressions)
        guard_rows = _with_click(all_train, parts.guard)
        if len(fit_rows) == 0 or len(guard_rows) == 0:
            raise NewsrecError(f"{dataset.root}: no clicked impression in the re-ranker's "
                               f"{'training slice' if len(fit_rows) == 0 else 'guard slice'}")
        train, guard = all_train.select(fit_rows), all_train.select(guard_rows)
        users = encode_impression_users(first_model, first_vectors, train, history_len=first_history_len,
                                        batch_size=batch_eval)
        retrieval = _first_stage_scores(first_model, users, first_vectors, train)
        guard_users = encode_impression_users(first_model, first_vectors, guard, history_len=first_history_len,
                                              batch_size=batch_eval)
        guard_first = _first_stage_scores(first_model, guard_users, first_vectors, guard)
        if rcfg.hard_negatives:
            hard_idx, hard_scores = retrieve_top(
                first_model, users, first_vectors, train, k=rcfg.hard_negative_pool,
                first_seen=tables.first_seen, first_seen_known=tables.first_seen_known,
                exclude_candidates=True, excluded=clicked_by_user(all_train, train.user_id),
                desc="retrieving hard negatives")
        else:
            hard_idx = np.zeros((len(train), 1), dtype=np.int64)
            hard_scores = np.zeros((len(train), 1), dtype=np.float32)
        samples = np.flatnonzero(train.labels > 0)
        sample_row = np.searchsorted(train.candidate_offsets, samples, side="right") - 1
        data = TrainingData(train, datetime64_to_seconds(train.time), retrieval, hard_idx, hard_scores,
                            train_log, samples, sample_row)
        rows_kw = dict(npratio=rcfg.npratio, hard_negatives=rcfg.hard_negatives)

        mean, std = feature_stats(data, reranker, rng, batch_size=rcfg.batch_size, **rows_kw)
        used = model.set_feature_stats(mean, std)
        dropped = [n for n, u in zip(FEATURE_NAMES, used) if not u]
        tracking.log_params({"rerank.features_dropped": ",".join(dropped) or "none",
                             "rerank.slice_start": parts.slice_start, "rerank.guard_start": parts.guard_start})
        model.to(device)
        reranker.device = device
        vectors = torch.from_numpy(tables.vectors)
        optimizer = torch.optim.AdamW(model.parameters(), lr=rcfg.lr, weight_decay=rcfg.weight_decay)
        steps_per_epoch = math.ceil(len(samples) / rcfg.batch_size)
        # linear warm-up over (at most) the first epoch, then constant: where training stops is the
        # guard's call (patience), so the rate never depends on how many epochs were allowed
        warmup = max(1, min(100, steps_per_epoch))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        first_per = impression_metrics(guard.labels, guard_first, guard.candidate_offsets)
        per_epoch: list[dict[str, np.ndarray]] = []  # the two-stage model's guard metrics, epoch by epoch
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        step = 0
        for epoch in range(rcfg.epochs):
            model.train()
            order = rng.permutation(len(samples))
            bar = progress(range(steps_per_epoch), desc=f"rerank epoch {epoch + 1}/{rcfg.epochs}", unit="step")
            running = 0.0
            for i in bar:
                ids = order[i * rcfg.batch_size:(i + 1) * rcfg.batch_size]
                batch = training_rows(data, reranker, ids, rng=rng, **rows_kw)
                loss = _batch_loss(model, batch, vectors, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
                optimizer.step()
                schedule.step()
                step += 1
                running = 0.9 * running + 0.1 * loss.item() if i else loss.item()
                bar.set_postfix(loss=f"{running:.4f}")
                if step % config.train.log_every_steps == 0:
                    tracking.log_metrics({"rerank_loss": running}, step=step)
            model.eval()
            two = reranker.score_impressions(guard, retrieval_scores=guard_first, log=train_log,
                                             batch_size=rcfg.eval_batch_size, show_progress=False)
            per_epoch.append(impression_metrics(guard.labels, two, guard.candidate_offsets))
            two_metrics = summarize(per_epoch[-1])
            tracking.log_metrics({"rerank_epoch_loss": running, "guard_two_stage_auc": two_metrics["auc"],
                                  "guard_two_stage_ndcg10": two_metrics["ndcg@10"]}, step=step)
            if best is None or two_metrics["auc"] > best[0]:
                best = (two_metrics["auc"], epoch + 1, copy.deepcopy(model.state_dict()))
            elif rcfg.patience and epoch + 1 - best[1] >= rcfg.patience:
                break
        _, best_epoch, state = best
        model.load_state_dict(state)
        model.cpu().eval()
        reranker.device = cpu
        two_per, verdict_epochs = cross_fitted(per_epoch, guard_halves(guard.user_id))
        verdict = guard_comparison(first_per, two_per, auc_margin=rcfg.guard_auc_margin, auc_z=rcfg.guard_auc_z,
                                   ndcg_tolerance=rcfg.guard_ndcg_tolerance, ndcg_z=rcfg.guard_ndcg_z)
        won = verdict["won"]
        guard_record = {**verdict, "impressions": int(len(guard)), "best_epoch": best_epoch,
                        "verdict_epochs": verdict_epochs,
                        "epochs_run": epoch + 1, "auc_margin": rcfg.guard_auc_margin, "auc_z": rcfg.guard_auc_z,
                        "ndcg_tolerance": rcfg.guard_ndcg_tolerance, "ndcg_z": rcfg.guard_ndcg_z,
                        "first_stage_source": source}
        tracking.log_metrics({"guard_first_stage_auc": verdict["first_stage"]["auc"],
                              "guard_first_stage_ndcg10": verdict["first_stage"]["ndcg@10"],
                              # cross-fitted: not the per-epoch series logged under guard_two_stage_*
                              "guard_crossfit_two_stage_auc": verdict["two_stage"]["auc"],
                              "guard_crossfit_two_stage_ndcg10": verdict["two_stage"]["ndcg@10"],
                              "guard_auc_gain_se": verdict["auc_se"], "guard_ndcg10_gain_se": verdict["ndcg10_se"],
                              "guard_won": float(won), "rerank_best_epoch": best_epoch})

        metrics: dict[str, dict[str, Any]] = {}
        if dev is not None and dev.labels is not None:  # reported, never used to choose
            first = score_impressions(retriever.model, dataset, dev, history_len=first_history_len,
                                      batch_size=batch_eval, news_vectors=news_vectors, show_progress=False)
            two = reranker.score_impressions(dev, retrieval_scores=first, log=full_log,
                                             batch_size=rcfg.eval_batch_size)
            cold = unseen_in_train(dataset)[dev.candidates]
            metrics = compare_on_impressions(dev.labels, dev.candidate_offsets, first, two, cold)
            for name, values in metrics.items():
                tracking.log_metrics({f"dev_{name}_{k}": v for k, v in values.items()})
        save_reranker(out_dir, model, config, retriever_dir=retriever_dir, dataset_root=dataset.root,
                      dataset_manifest_sha256=sha256_file(dataset.root / schema.MANIFEST), tables=tables,
                      mean_ctr=full_log.mean_ctr, log_end=full_log.end_seconds,
                      extra={"guard": guard_record, "metrics": metrics, "mlflow_run_id": run.run_id,
                             "train_samples": int(len(samples)), "train_impressions": int(len(train)),
                             "slice_start": parts.slice_start, "guard_start": parts.guard_start})
        tracking.log_artifact(out_dir, artifact_path="reranker")
    return RerankFitResult(out_dir=Path(out_dir), metrics=metrics, guard=guard_record, run_id=run.run_id,
                           train_samples=int(len(samples)), seconds=time.perf_counter() - started)
