"""The re-ranking stage: ``newsrec train --stage rerank --retriever MODEL_DIR``.

``fit_reranker`` trains the candidate-aware re-ranker (``newsrec.models.reranker``) on the train
impressions, on top of a trained, frozen first stage:

1. the first stage encodes every news once (``encode_all_news``) and every train user once;
2. training samples are NRMS-style: each click with ``rerank.npratio`` non-clicks of the same
   impression (drawn afresh each epoch) plus ``rerank.hard_negatives`` *retrieved* negatives — news
   the first stage ranks in its top ``rerank.hard_negative_pool`` for that user among the news
   available at the impression's time (first seen no later than it), never clicked by the user;
3. popularity features of a training impression come from train impressions strictly *before* its
   time (``PrefixCounts``: no label leakage, and news appearing for the first time get the prior
   mean as they do at dev time); dev, test and serving use counts over the whole train split;
4. loss: softmax cross-entropy of the click against its negatives; AdamW;
5. dev evaluation of first stage vs two stage on the impressions' own candidates, overall and on
   cold candidates (news unseen in train); everything logged to MLflow like the first stage.

``score_impressions_two_stage`` scores a split's impressions with the two-stage model (for
``evaluate`` / ``submit``); ``evaluate_retrieved`` compares both stages on retrieved candidates.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from newsrec.config import Config
from newsrec.data import schema
from newsrec.data.artifact import DatasetArtifact, Impressions, open_dataset
from newsrec.data.popularity import (PrefixCounts, datetime64_to_seconds, first_seen_seconds,
                                     news_counts_from_artifact, unseen_in_train)
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.models.reranker import (LoadedReranker, NewsTables, Reranker, build_features,
                                     padded_candidates, padded_histories, save_reranker)
from newsrec.train.distributed import resolve_device
from newsrec.utils.io import sha256_file
from newsrec.utils.progress import progress


@dataclass
class RerankFitResult:
    """What ``fit_reranker`` produced: the directory, dev metrics of both stages, the MLflow run."""

    out_dir: Path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"first_stage", "two_stage", ...}
    run_id: str | None = None
    train_samples: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# first-stage helpers (the retriever is frozen)


@torch.inference_mode()
def encode_users(model: Any, news_vectors: torch.Tensor, impressions: Impressions, *, history_len: int,
                 batch_size: int, device: torch.device, desc: str = "encoding users") -> torch.Tensor:
    """First-stage user vectors of every impression: float32 [n, D] (on CPU).

    news_vectors [n_news + 1, D] from ``encode_all_news``; the most recent ``history_len`` clicks.
    """
    out = torch.zeros(len(impressions), news_vectors.shape[1])
    vecs = news_vectors.to(device)
    for start in progress(range(0, len(impressions), batch_size), desc=desc, unit="batch"):
        rows = np.arange(start, min(start + batch_size, len(impressions)))
        hist, mask = padded_histories(impressions, rows, max_len=history_len)
        users = model.encode_user(vecs[torch.from_numpy(hist).to(device)], torch.from_numpy(mask).to(device))
        out[start:start + len(rows)] = users.float().cpu()
    return out


@torch.inference_mode()
def first_stage_candidate_scores(model: Any, user_vectors: torch.Tensor, news_vectors: torch.Tensor,
                                 impressions: Impressions, *, batch_size: int) -> np.ndarray:
    """``model.score`` of each candidate: float32 [M] aligned with ``impressions.candidates``."""
    out = np.zeros(len(impressions.candidates), dtype=np.float32)
    for start in range(0, len(impressions), batch_size):
        rows = np.arange(start, min(start + batch_size, len(impressions)))
        cand, mask, flat = padded_candidates(impressions, rows)
        scores = model.score(user_vectors[torch.from_numpy(rows)], news_vectors[torch.from_numpy(cand)])
        out[flat] = scores.float().numpy()[mask]
    return out


def available_mask(first_seen: np.ndarray, first_seen_known: np.ndarray, now_seconds: np.ndarray) -> np.ndarray:
    """Which news are in the pool at each moment: bool [B, n_news + 1]. A news is available once it
    was first shown (news never shown as candidates — older ones — always are); row 0 never."""
    ok = (~first_seen_known)[None, :] | (first_seen[None, :] <= now_seconds[:, None])
    ok[:, 0] = False
    return ok


@torch.inference_mode()
def retrieve_top(model: Any, user_vectors: torch.Tensor, news_vectors: torch.Tensor, impressions: Impressions,
                 *, k: int, first_seen: np.ndarray, first_seen_known: np.ndarray,
                 exclude_candidates: bool, batch_size: int = 256,
                 desc: str = "retrieving") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` news by first-stage score for each impression's user, among the news available
    at the impression's time, excluding the user's history (and, with ``exclude_candidates``, the
    impression's own candidates). Returns (news_idx int64 [n, k], scores float32 [n, k]); slots left
    when fewer news qualify hold news_idx 0 and score -inf.
    """
    n_all = news_vectors.shape[0]
    k = min(k, n_all - 1)
    now = datetime64_to_seconds(impressions.time)
    top_idx = np.zeros((len(impressions), k), dtype=np.int64)
    top_scores = np.full((len(impressions), k), -np.inf, dtype=np.float32)
    for start in progress(range(0, len(impressions), batch_size), desc=desc, unit="batch"):
        rows = np.arange(start, min(start + batch_size, len(impressions)))
        users = user_vectors[torch.from_numpy(rows)]  # (b, D)
        scores = (users @ news_vectors.T).float()  # (b, n): the first stage's score is a dot product
        allowed = torch.from_numpy(available_mask(first_seen, first_seen_known, now[rows]))
        hist, hmask = padded_histories(impressions, rows, max_len=1 << 30)
        allowed.scatter_(1, torch.from_numpy(np.where(hmask, hist, 0)), False)
        if exclude_candidates:
            cand, _, _ = padded_candidates(impressions, rows)
            allowed.scatter_(1, torch.from_numpy(cand), False)
        scores = scores.masked_fill(~allowed, -math.inf)
        values, idx = torch.topk(scores, k, dim=1)
        idx = torch.where(torch.isfinite(values), idx, torch.zeros_like(idx))
        top_idx[rows] = idx.numpy()
        top_scores[rows] = values.numpy()
    return top_idx, top_scores


def news_tables(dataset: DatasetArtifact, news_vectors: np.ndarray,
                opened: dict[str, Impressions]) -> tuple[NewsTables, float]:
    """Serving-time tables (click counts over all of train, showings over every split) and the train
    mean click-through. ``opened``: splits the caller already holds (the others are read here)."""
    counts = news_counts_from_artifact(dataset)
    seen, known = first_seen_seconds(dataset)
    cat, sub = dataset.news_categories
    displays = np.zeros(dataset.n_news + 1, dtype=np.int64)
    for split in dataset.splits:
        shown = (opened[split] if split in opened else dataset.impressions(split)).candidates
        displays += np.bincount(shown, minlength=dataset.n_news + 1)[:len(displays)]
    tables = NewsTables(vectors=np.ascontiguousarray(news_vectors, dtype=np.float32), clicks=counts.clicks,
                        impressions=counts.impressions, displays=displays, first_seen=seen,
                        first_seen_known=known,
                        category=cat.astype(np.int64), subcategory=sub.astype(np.int64))
    return tables, counts.mean_ctr


# ------------------------------------------------------------------------------------------------
# training samples


@dataclass
class _TrainData:
    """Everything a training batch is cut from (arrays aligned with ``impressions``)."""

    impressions: Impressions
    now: np.ndarray  # float64 [n] impression time, seconds
    retrieval: np.ndarray  # float32 [M] first-stage score of each candidate
    prefix_clicks: np.ndarray  # int64 [M] clicks of the candidate before the impression
    prefix_shown: np.ndarray  # int64 [M]
    hard_idx: np.ndarray  # int64 [n, K] retrieved non-clicked news (0 = none)
    hard_scores: np.ndarray  # float32 [n, K]
    prefix: PrefixCounts
    samples: np.ndarray  # int64 [S] candidate positions (into M) of clicks: one sample each
    sample_row: np.ndarray  # int64 [S] impression of each sample


def _build_batch(data: _TrainData, tables: NewsTables, sample_ids: np.ndarray, *, npratio: int,
                 hard_negatives: int, history_len: int, prior: float, mean_ctr: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One batch: candidates [B, C] = click, npratio impression non-clicks, hard negatives."""
    imps = data.impressions
    b = len(sample_ids)
    c = 1 + npratio + hard_negatives
    cand = np.zeros((b, c), dtype=np.int64)
    mask = np.zeros((b, c), dtype=bool)
    ret = np.zeros((b, c), dtype=np.float64)
    clicks = np.zeros((b, c), dtype=np.int64)
    shown = np.zeros((b, c), dtype=np.int64)
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
        clicks[j, :n] = data.prefix_clicks[picks]
        shown[j, :n] = data.prefix_shown[picks]
        mask[j, :n] = True
        if hard_negatives:
            pool = np.flatnonzero(data.hard_idx[row] > 0)
            chosen = rng.choice(pool, min(hard_negatives, len(pool)), replace=False) if len(pool) else pool
            slot = slice(1 + npratio, 1 + npratio + len(chosen))
            cand[j, slot] = data.hard_idx[row, chosen]
            ret[j, slot] = data.hard_scores[row, chosen]
            mask[j, slot] = True
    hard_cols = slice(1 + npratio, c)
    if hard_negatives:
        hc, hs = data.prefix.at(cand[:, hard_cols], np.floor(data.now[rows])[:, None])
        clicks[:, hard_cols] = np.where(mask[:, hard_cols], hc, 0)
        shown[:, hard_cols] = np.where(mask[:, hard_cols], hs, 0)
    hist, hist_mask = padded_histories(imps, rows, max_len=history_len)
    feats = build_features(
        retrieval_scores=ret, clicks=clicks, impressions=shown, exposure=shown,  # train's past = its prefix
        age_seconds=data.now[rows][:, None] - tables.first_seen[cand], age_known=tables.first_seen_known[cand],
        candidate_category=tables.category[cand], candidate_subcategory=tables.subcategory[cand],
        history_category=tables.category[hist], history_subcategory=tables.subcategory[hist],
        history_mask=hist_mask, prior=prior, mean_ctr=mean_ctr)
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


def _train_rows(impressions: Impressions, max_impressions: int) -> np.ndarray:
    """Labelled impressions with a click, the most recent ``max_impressions`` of them (0 = all)."""
    has_click = np.add.reduceat(impressions.labels.astype(np.int64),
                                impressions.candidate_offsets[:-1]) if len(impressions.labels) else np.zeros(0)
    has_click = (has_click > 0) & (impressions.candidate_counts > 0)
    rows = np.flatnonzero(has_click)
    if max_impressions and len(rows) > max_impressions:
        order = np.argsort(impressions.time[rows], kind="stable")
        rows = np.sort(rows[order[-max_impressions:]])
    return rows


# ------------------------------------------------------------------------------------------------
# scoring and evaluation


def score_impressions_two_stage(retriever: Any, reranker: LoadedReranker, impressions: Impressions, *,
                                batch_size: int | None = None, device: str | torch.device = "cpu",
                                first_stage_scores: np.ndarray | None = None,
                                show_progress: bool = True) -> np.ndarray:
    """Two-stage scores of every candidate of ``impressions``: float32 [M] aligned with
    ``impressions.candidates`` (the same shape as the first stage's ``score_impressions``).

    retriever: the first stage (a ``LoadedModel`` or a ``NewsRecommender``); its news vectors are the
    ones stored with the re-ranker (same model, checked by fingerprint on load). ``first_stage_scores``
    [M] skips recomputing the first stage when the caller already has them.
    """
    model = getattr(retriever, "model", retriever)
    history_len = _retriever_history_len(retriever, reranker)
    device = torch.device(device)
    batch = batch_size or reranker.config.rerank.eval_batch_size
    if first_stage_scores is None:
        vectors = torch.from_numpy(reranker.tables.vectors)
        users = encode_users(model, vectors, impressions, history_len=history_len, batch_size=batch * 4,
                             device=device)
        first_stage_scores = first_stage_candidate_scores(model, users, vectors, impressions, batch_size=batch * 4)
    return reranker.score_impressions(impressions, retrieval_scores=first_stage_scores, batch_size=batch,
                                      show_progress=show_progress)


def _retriever_history_len(retriever: Any, reranker: LoadedReranker) -> int:
    config = getattr(retriever, "config", None)
    return config.data.history_len if config is not None else reranker.config.data.history_len


def compare_on_impressions(labels: np.ndarray, offsets: np.ndarray, first_stage: np.ndarray,
                           two_stage: np.ndarray, cold: np.ndarray) -> dict[str, dict[str, Any]]:
    """Metrics of both stages on the impressions' candidates, overall and on cold candidates only
    (each impression restricted to its candidates where ``cold`` [M] is True)."""
    from newsrec.eval.metrics import compute_metrics, select_candidates

    out = {"first_stage": compute_metrics(labels, first_stage, offsets),
           "two_stage": compute_metrics(labels, two_stage, offsets)}
    lab_c, first_c, off_c = select_candidates(labels, first_stage, offsets, cold)
    _, two_c, _ = select_candidates(labels, two_stage, offsets, cold)
    out["first_stage_cold"] = compute_metrics(lab_c, first_c, off_c)
    out["two_stage_cold"] = compute_metrics(lab_c, two_c, off_c)
    return out


def evaluate_retrieved(retriever: Any, reranker: LoadedReranker, impressions: Impressions, *, retrieve_k: int,
                       batch_size: int = 64, device: str | torch.device = "cpu",
                       shown_in: Impressions | None = None) -> dict[str, dict[str, Any]]:
    """Both stages on *retrieved* candidates: for each impression, the first stage retrieves its top
    ``retrieve_k`` news available at that time (history excluded); a retrieved news is relevant when
    the impression shows it clicked. The first stage ranks by its score, the two-stage model re-ranks
    the same list. ``shown_in``: the whole log ``impressions`` was sampled from (exposure counts
    come from it; default ``impressions``). Returns {"first_stage", "two_stage"} metrics (impressions where no click was
    retrieved count as ``no_click``) plus "recall" (share of clicks retrieved)."""
    from newsrec.eval.metrics import compute_metrics

    model = getattr(retriever, "model", retriever)
    history_len = _retriever_history_len(retriever, reranker)
    vectors = torch.from_numpy(reranker.tables.vectors)
    n_news = int(reranker.manifest["n_news"])
    users = encode_users(model, vectors[: n_news + 1], impressions, history_len=history_len,
                         batch_size=batch_size * 4, device=torch.device(device))
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
    two = reranker.score_impressions(retrieved, retrieval_scores=first, batch_size=batch_size,
                                     shown_in=impressions if shown_in is None else shown_in)
    total_clicks = int(sum(int(impressions.labels_of(i).sum()) for i in range(len(impressions))))
    return {"first_stage": compute_metrics(retrieved.labels, first, offsets),
            "two_stage": compute_metrics(retrieved.labels, two, offsets),
            "recall": {"clicks_retrieved": int(clicked.sum()), "clicks": total_clicks,
                       "recall": clicked.sum() / max(total_clicks, 1), "retrieve_k": k}}


# ------------------------------------------------------------------------------------------------
# the stage


def fit_reranker(config: Config, *, retriever_dir: str | Path, data_dir: str | Path,
                 out_dir: str | Path) -> RerankFitResult:
    """Train the re-ranker on ``data_dir``'s train impressions over the frozen first stage in
    ``retriever_dir``; write RERANKER_DIR ``out_dir`` (see ``newsrec.models.reranker``)."""
    from newsrec.eval.evaluate import encode_all_news
    from newsrec.models.io import check_compatible, load_model
    from newsrec.train import tracking

    started = time.perf_counter()
    rcfg = config.rerank
    dataset = open_dataset(data_dir)
    if "train" not in dataset.splits:
        raise ArtifactError(f"{dataset.root}: no train split; the re-ranker trains on train impressions")
    retriever = load_model(retriever_dir)
    check_compatible(retriever.manifest, dataset)
    device = resolve_device(config.train.device)
    retriever.model.to(device)
    torch.manual_seed(rcfg.seed)
    rng = np.random.default_rng(rcfg.seed)
    history_len = rcfg.history_len or config.data.history_len
    first_history_len = retriever.config.data.history_len
    batch_eval = config.train.eval_batch_size

    with tracking.start_run(config.tracking, run_name="rerank") as run:
        tracking.log_params(config.flat())
        tracking.log_params({"stage": "rerank", "retriever_dir": str(Path(retriever_dir).resolve()),
                             "data_dir": str(dataset.root.resolve())})
        tracking.set_tags(tracking.system_info(device=str(device), world_size=1))

        news_vectors = encode_all_news(retriever.model, dataset, batch_size=batch_eval, device=device)
        news_vectors = news_vectors.detach().float().cpu()
        all_train = dataset.impressions("train")
        dev = dataset.impressions("dev") if "dev" in dataset.splits else None
        opened = {"train": all_train} | ({"dev": dev} if dev is not None else {})
        tables, mean_ctr = news_tables(dataset, news_vectors.numpy(), opened)
        if all_train.labels is None:
            raise ArtifactError(f"{dataset.root}: the train split has no labels")
        prefix = PrefixCounts(all_train)
        train = all_train.select(_train_rows(all_train, rcfg.max_train_impressions))
        if len(train) == 0:
            raise NewsrecError(f"{dataset.root}: no train impression has a click; nothing to train on")
        users = encode_users(retriever.model, news_vectors, train, history_len=first_history_len,
                             batch_size=batch_eval, device=device)
        users = users.cpu()
        retrieval = first_stage_candidate_scores(retriever.model.cpu(), users, news_vectors, train,
                                                 batch_size=batch_eval)
        pre_clicks, pre_shown = prefix.for_candidates(train)
        if rcfg.hard_negatives:
            hard_idx, hard_scores = retrieve_top(
                retriever.model, users, news_vectors, train, k=rcfg.hard_negative_pool,
                first_seen=tables.first_seen, first_seen_known=tables.first_seen_known,
                exclude_candidates=True, desc="retrieving hard negatives")
        else:
            hard_idx = np.zeros((len(train), 1), dtype=np.int64)
            hard_scores = np.zeros((len(train), 1), dtype=np.float32)
        samples = np.flatnonzero(train.labels > 0)
        sample_row = np.searchsorted(train.candidate_offsets, samples, side="right") - 1
        now = datetime64_to_seconds(train.time)
        data = _TrainData(train, now, retrieval, pre_clicks, pre_shown, hard_idx, hard_scores, prefix,
                          samples, sample_row)
        batch_kw = dict(npratio=rcfg.npratio, hard_negatives=rcfg.hard_negatives, history_len=history_len,
                        prior=rcfg.popularity_prior, mean_ctr=prefix.mean_ctr)

        model = Reranker(rcfg, news_dim=news_vectors.shape[1])
        _fit_feature_stats(model, data, tables, batch_kw, rng, batch_size=rcfg.batch_size)
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=rcfg.lr, weight_decay=rcfg.weight_decay)
        steps_per_epoch = math.ceil(len(samples) / rcfg.batch_size)
        total_steps = steps_per_epoch * rcfg.epochs
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / max(1, min(100, total_steps // 10)))
            * max(0.05, 1.0 - s / max(1, total_steps)))
        step = 0
        for epoch in range(rcfg.epochs):
            model.train()
            order = rng.permutation(len(samples))
            bar = progress(range(steps_per_epoch), desc=f"rerank epoch {epoch + 1}/{rcfg.epochs}", unit="step")
            running = 0.0
            for i in bar:
                ids = order[i * rcfg.batch_size:(i + 1) * rcfg.batch_size]
                batch = _build_batch(data, tables, ids, rng=rng, **batch_kw)
                loss = _batch_loss(model, batch, news_vectors, device)
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
            tracking.log_metrics({"rerank_epoch_loss": running}, step=step)
        model.eval()

        reference_time = float(tables.first_seen[tables.first_seen_known].max()) if tables.first_seen_known.any() else 0.0
        dataset_sha = sha256_file(dataset.root / schema.MANIFEST)
        loaded = LoadedReranker(model=model.cpu(), config=config, tables=tables, manifest={
            "n_news": dataset.n_news, "mean_ctr": mean_ctr, "popularity_prior": rcfg.popularity_prior,
            "reference_time": reference_time})
        metrics: dict[str, dict[str, Any]] = {}
        if dev is not None and dev.labels is not None:
            dev_users = encode_users(retriever.model.cpu(), news_vectors, dev, history_len=first_history_len,
                                     batch_size=batch_eval, device=torch.device("cpu"))
            first = first_stage_candidate_scores(retriever.model, dev_users, news_vectors, dev,
                                                 batch_size=batch_eval)
            two = loaded.score_impressions(dev, retrieval_scores=first, batch_size=rcfg.eval_batch_size)
            cold = unseen_in_train(dataset)[dev.candidates]
            metrics = compare_on_impressions(dev.labels, dev.candidate_offsets, first, two, cold)
            for name, values in metrics.items():
                tracking.log_metrics({f"dev_{name}_{k}": v for k, v in values.items()})
        save_reranker(out_dir, model, config, retriever_dir=retriever_dir, dataset_root=dataset.root,
                      dataset_manifest_sha256=dataset_sha, tables=tables, mean_ctr=mean_ctr,
                      reference_time=reference_time,
                      extra={"metrics": metrics, "mlflow_run_id": run.run_id, "train_samples": int(len(samples)),
                             "train_impressions": int(len(train))})
        tracking.log_artifact(out_dir, artifact_path="reranker")
    return RerankFitResult(out_dir=Path(out_dir), metrics=metrics, run_id=run.run_id,
                           train_samples=int(len(samples)), seconds=time.perf_counter() - started)


def _fit_feature_stats(model: Reranker, data: _TrainData, tables: NewsTables, batch_kw: dict[str, Any],
                       rng: np.random.Generator, *, batch_size: int, n_batches: int = 20) -> None:
    """Feature means and standard deviations over real candidates of a few training batches."""
    rows = []
    for _ in range(n_batches):
        ids = rng.choice(len(data.samples), min(batch_size, len(data.samples)), replace=False)
        batch = _build_batch(data, tables, ids, rng=rng, **batch_kw)
        rows.append(batch["features"][batch["candidate_mask"]])
    feats = np.concatenate(rows).astype(np.float64)
    model.set_feature_stats(feats.mean(axis=0), feats.std(axis=0))
