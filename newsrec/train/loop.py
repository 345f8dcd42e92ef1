"""First-stage training: ``fit(config, data_dir=..., out_dir=...)`` — the ``newsrec train`` stage.

NRMS objective: every click of a training impression, with ``train.npratio`` non-clicks of the same
impression drawn afresh each epoch, softmax cross-entropy over the 1 + npratio scores (padding
candidates masked to −inf). AdamW with linear warmup then linear decay, gradient clipping.
Each step encodes every distinct news of the batch once (``batching``); with
``train.news_cache_refresh_steps`` the history side reads detached vectors from a cache instead and
only the candidates (and the history news due for a refresh) are encoded (``news_cache``); with
``train.news_cache_refresh_grad`` those due news are encoded with gradients inside the step.

Model selection never sees the split it reports. The fit log is the union of ``train.fit_splits``
(labelled splits, ordered by time); its latest ``train.holdout_fraction`` (by time) is held out of
the training batches (``split_fit_log``). After every epoch the held-out slice is scored with the
fast path and the official metrics; training stops early when held-out AUC has not improved for
``train.early_stopping_patience`` epochs, and the best held-out epoch's weights are what ends up in
MODEL_DIR. Labelled splits not fitted on (dev) are scored each epoch too, but only reported.
With ``train.holdout_fraction=0`` there is no selection: no early stopping, the last epoch is kept.

MODEL_DIR/checkpoints/ holds ``last.pt`` (written every epoch and every
``train.checkpoint_every_steps`` steps) and ``best.pt``; ``resume=True`` continues from ``last.pt``
exactly (same remaining batches, same RNG, same optimizer and schedule, same news-vector cache).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newsrec.config import Config, apply_dataset
from newsrec.data.artifact import DatasetArtifact, Impressions, concat_impressions, open_dataset
from newsrec.data.features import NewsFeatures, news_features
from newsrec.data.schema import MANIFEST
from newsrec.errors import ArtifactError, ConfigError
from newsrec.models.inputs import NewsInputs
from newsrec.train import checkpoint, distributed, tracking
from newsrec.train.batching import Batch, BatchBuilder
from newsrec.train.news_cache import NewsVectorCache, pad_to_bucket
from newsrec.utils.progress import progress

log = logging.getLogger("newsrec.train")

CHECKPOINT_DIR = "checkpoints"
# Settings a resumed run must share with the run that wrote the checkpoint (others, such as
# train.epochs or the logging cadence, may change on resume).
_RESUME_INVARIANT = ("data", "model", "train.batch_size", "train.npratio", "train.seed", "train.lr",
                     "train.weight_decay", "train.warmup_steps", "train.bf16", "train.bucket_size",
                     "train.fit_splits", "train.holdout_fraction", "train.news_cache_refresh_steps",
                     "train.news_cache_refresh_grad")
NO_SELECTION = "train.holdout_fraction=0: no model selection (no early stopping); the last epoch is kept"


@dataclass
class FitResult:
    """What ``fit`` did. ``finished`` is False when it stopped at ``stop_after_steps`` (resume it)."""

    model_dir: Path
    metrics: dict[str, Any]  # reported (dev) metrics of the kept epoch ({} without a split to report)
    best_epoch: int  # 0-based epoch whose weights were kept (-1 when no epoch was evaluated)
    epochs_trained: int
    global_step: int
    run_id: str | None
    stopped_early: bool
    finished: bool
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: holdout and reported metrics
    train_samples_per_second: float = 0.0
    holdout_metrics: dict[str, Any] = field(default_factory=dict)  # of the kept epoch ({} without selection)
    holdout: dict[str, Any] = field(default_factory=dict)  # the held-out slice's definition (split_fit_log)
    reported_splits: list[str] = field(default_factory=list)  # labelled splits scored but not fitted on
    fit_splits: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FitLog:
    """The fit log split in two: ``train`` feeds the batches, ``holdout`` (its latest part by time)
    picks the epoch. ``definition`` says how (JSON-able; recorded in model.json)."""

    train: Impressions
    holdout: Impressions | None
    definition: dict[str, Any]


def split_fit_log(dataset: DatasetArtifact, config: Config) -> FitLog:
    """The union of ``train.fit_splits`` and its held-out slice: the latest
    ``ceil(train.holdout_fraction * n)`` impressions by time, ties in time broken by position in the
    union (splits in the order given, then file order). A pure function of the data and the config,
    so every torchrun rank computes the same slice. Training rows keep their union order."""
    tc = config.train
    names = tc.fit_split_names
    parts = []
    for name in names:
        if name not in dataset.splits:
            raise ArtifactError(f"{dataset.root}: train.fit_splits names '{name}', which this dataset "
                                f"does not have (has: {', '.join(dataset.splits) or 'none'})")
        part = dataset.impressions(name)
        if not part.has_labels:
            raise ConfigError(f"train.fit_splits={tc.fit_splits!r}: split '{name}' has no labels; fit "
                              f"only on labelled splits (e.g. train,dev)")
        parts.append(part)
    log = parts[0] if len(parts) == 1 else concat_impressions(parts)
    n = len(log)
    definition: dict[str, Any] = {"fit_splits": names, "fraction": tc.holdout_fraction,
                                  "fit_impressions": n}
    if tc.holdout_fraction == 0:
        definition.update(train_impressions=n, holdout_impressions=0, selection="none")
        return FitLog(train=log, holdout=None, definition=definition)
    n_holdout = math.ceil(tc.holdout_fraction * n)
    if n_holdout >= n:
        raise ConfigError(f"train.holdout_fraction={tc.holdout_fraction} holds out all {n} impressions "
                          f"of train.fit_splits={tc.fit_splits!r}; lower it or fit on more data")
    order = np.argsort(log.time, kind="stable")  # by time; ties keep their union position
    holdout_rows = order[n - n_holdout:]
    train_rows = np.sort(order[:n - n_holdout])
    holdout = log.select(holdout_rows)
    measurable = _auc_measurable(holdout)
    if measurable == 0:
        raise ConfigError(f"train.holdout_fraction={tc.holdout_fraction} holds out {n_holdout} impressions "
                          f"of train.fit_splits={tc.fit_splits!r}, none with both a click and a non-click, "
                          f"so AUC cannot be measured; raise train.holdout_fraction (or set 0: no selection)")
    definition.update(
        selection="holdout", train_impressions=n - n_holdout, holdout_impressions=n_holdout,
        holdout_auc_impressions=measurable,
        holdout_time_from=_iso(holdout.time[0]), holdout_time_to=_iso(holdout.time[-1]),
        train_time_to=_iso(log.time[order[n - n_holdout - 1]]))
    return FitLog(train=log.select(train_rows), holdout=holdout, definition=definition)


def _auc_measurable(impressions: Impressions) -> int:
    """Impressions with at least one click and one non-click (those AUC is defined on)."""
    cumulative = np.concatenate(([0], np.cumsum(impressions.labels > 0, dtype=np.int64)))
    offsets = impressions.candidate_offsets
    clicks = cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    return int(np.sum((clicks > 0) & (clicks < np.diff(offsets))))


def _iso(value: np.datetime64) -> str:
    return str(np.datetime_as_string(np.datetime64(value, "s")))


class NRMSObjective(nn.Module):
    """The training wrapper around a ``NewsRecommender``: a batch → summed softmax cross-entropy,
    plus ``interest_disagreement`` × each sample's ``model.interest_overlap`` when that is > 0.

    The model is called only through ``encode_news``/``encode_user``/``score`` (and
    ``interest_overlap``); this wrapper is what DistributedDataParallel wraps, so gradient
    synchronisation sees one ``forward`` per step.
    """

    def __init__(self, model: nn.Module, *, interest_disagreement: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.interest_disagreement = interest_disagreement

    def forward(self, news: NewsInputs, history_slots: Tensor | None, history_mask: Tensor,
                candidate_slots: Tensor, candidate_mask: Tensor, history_vectors: Tensor | None = None,
                fresh_slots: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """news: the inputs of the U unique news, history_slots/mask [B, H], candidate_slots/mask [B, C]
        (column 0 = the click) → summed loss over the B samples (scalar). ``history_vectors [B, H, D]``
        (the news-vector cache's, detached) replace ``table[history_slots]`` when given; then
        ``fresh_slots [B, H]`` (> 0) put the rows of the table encoded in this step (with gradients)
        in place of the cached vectors of the history news due for a refresh, and the table comes
        back beside the loss."""
        news_vectors = self.model.encode_news(news)  # [U, D]
        table = torch.cat([news_vectors.new_zeros(1, news_vectors.shape[1]), news_vectors])  # [U+1, D]
        if history_vectors is None:
            history_vectors = table[history_slots]
        elif fresh_slots is not None:
            fresh = table[fresh_slots]
            history_vectors = torch.where((fresh_slots > 0).unsqueeze(-1), fresh, history_vectors.to(fresh.dtype))
        user_vectors = self.model.encode_user(history_vectors, history_mask)  # [B, U]
        logits = self.model.score(user_vectors, table[candidate_slots]).float()  # [B, C]
        logits = logits.masked_fill(~candidate_mask, float("-inf"))
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target, reduction="sum")
        if self.interest_disagreement:
            loss = loss + self.interest_disagreement * self.model.interest_overlap(user_vectors.float()).sum()
        return (loss, table) if fresh_slots is not None else loss


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; biases, norms and other 1-D parameters without weight decay. The fused kernel: the
    same update in one pass over each tensor, ~4× faster than the per-op one on a 2-core CPU (the
    word table's 9M parameters made the optimizer a quarter of a cached step at MIND shapes)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr, fused=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _reported_impressions(dataset: DatasetArtifact, config: Config) -> dict[str, Impressions]:
    """Labelled splits other than train that are not fitted on (dev; a labelled test): scored each
    epoch for the report only, each capped at ``train.dev_max_impressions``."""
    fitted = set(config.train.fit_split_names)
    reported = {}
    for name in dataset.splits:
        if name == "train" or name in fitted:
            continue
        impressions = dataset.impressions(name)
        if not impressions.has_labels:
            continue
        limit = config.train.dev_max_impressions
        if limit and limit < len(impressions):
            impressions = impressions.select(np.arange(limit))
        reported[name] = impressions
    return reported


def evaluate_split(model: nn.Module, dataset: DatasetArtifact, impressions: Impressions, *,
                   config: Config, device: torch.device) -> dict[str, Any]:
    """Official metrics of ``model`` on labelled ``impressions`` (fast path: each news encoded once)."""
    from newsrec.eval.metrics import compute_metrics
    from newsrec.inference.scoring import score_impressions

    was_training = model.training
    model.eval()
    scores = score_impressions(model, dataset, impressions, history_len=config.data.history_len,
                               batch_size=config.train.eval_batch_size, device=device)
    model.train(was_training)
    return compute_metrics(impressions.labels, scores, impressions.candidate_offsets)


def _check_resume_config(saved_yaml: str, config: Config, path: Path) -> None:
    from newsrec.config import config_from_yaml_text

    saved = config_from_yaml_text(saved_yaml).flat()
    now = config.flat()
    changed = [k for k in now if k.startswith(_RESUME_INVARIANT) and saved.get(k) != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {now[k]!r}" for k in changed[:6])
        raise ConfigError(f"{path}: cannot resume with changed settings ({detail}); use the settings "
                          f"of the interrupted run or train without --resume")


def training_threads(train_cfg: Any) -> int:
    """Intra-op threads for training: ``train.num_threads``, or every core this process may use
    (the cores divided among the processes of a torchrun on this machine). Batch-building threads
    mostly wait, so they get no core of their own."""
    if train_cfg.num_threads:
        return int(train_cfg.num_threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # processes sharing this machine
    return max(1, cores)


def fit(config: Config, *, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
        stop_after_steps: int | None = None) -> FitResult:
    """Train on the earlier part of ``train.fit_splits`` of ``data_dir``, select the epoch on its
    held-out latest part, report dev; write MODEL_DIR ``out_dir``.

    ``stop_after_steps``: leave after this many optimizer steps (counted from the start of the run,
    across resumes) with a checkpoint to resume from — for time-boxed or preemptible jobs.
    Under ``torchrun`` every process calls this; rank 0 alone logs, evaluates and writes.
    """
    ctx = distributed.setup(config.train.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads(config.train))
    try:
        return _fit(config, ctx, data_dir=Path(data_dir), out_dir=Path(out_dir), resume=resume,
                    stop_after_steps=stop_after_steps)
    finally:
        torch.set_num_threads(threads_before)
        distributed.teardown(ctx)


def _fit(config: Config, ctx: distributed.DistContext, *, data_dir: Path, out_dir: Path, resume: bool,
         stop_after_steps: int | None) -> FitResult:
    tc = config.train
    _seed_everything(tc.seed)
    dataset = open_dataset(data_dir)
    config = apply_dataset(config, dataset.manifest, artifact=str(data_dir))  # what the dataset fixes
    if tc.bf16:
        pays, why = distributed.bf16_pays(ctx.device)
        if not pays:  # the saved config records what was used
            if ctx.is_main:
                log.warning(why)
            config = dataclasses.replace(config, train=dataclasses.replace(tc, bf16=False))
            tc = config.train
    if "train" not in dataset.splits:
        raise ArtifactError(f"{data_dir}: no train split to learn from; ingest one with --train")
    fit_log = split_fit_log(dataset, config)  # the same on every rank: a pure function of data and config
    if ctx.is_main:  # PLM states are computed once, by rank 0, before the other ranks read them
        features = news_features(dataset, config)
    distributed.barrier(ctx)
    if not ctx.is_main:
        features = news_features(dataset, config, show_progress=False)
    bucket_size = tc.bucket_size if tc.bf16 else None
    builder = BatchBuilder(fit_log.train, features=features, batch_size=tc.batch_size,
                           npratio=tc.npratio, history_len=config.data.history_len, seed=tc.seed,
                           bucket_size=bucket_size, rank=ctx.rank, world_size=ctx.world_size,
                           split_history=tc.news_cache_refresh_steps > 0)
    holdout = fit_log.holdout if ctx.is_main else None
    reported = _reported_impressions(dataset, config) if ctx.is_main else {}
    batches_per_epoch = builder.batches_per_epoch
    total_steps = batches_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    from newsrec.inference.model_io import build_model, save_model

    model = build_model(config, dataset, features).to(ctx.device)
    objective = distributed.wrap_model(
        NRMSObjective(model, interest_disagreement=config.model.interest_disagreement), ctx)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps=tc.warmup_steps, total_steps=total_steps))
    cache = (NewsVectorCache(features.n_rows, model.news_dim, refresh_steps=tc.news_cache_refresh_steps,
                             device=ctx.device) if tc.news_cache_refresh_steps else None)

    ckpt_dir = out_dir / CHECKPOINT_DIR
    state = checkpoint.TrainState()
    best_weights: dict[str, Tensor] | None = None
    if resume:
        payload = checkpoint.load_checkpoint(ckpt_dir)
        _check_resume_config(payload["config_yaml"], config, ckpt_dir / checkpoint.LAST)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        checkpoint.set_rng_state(payload["rng"])
        state = payload["state"]
        if cache is not None:
            checkpoint.load_news_cache(payload, cache, ckpt_dir / checkpoint.LAST)
        best = checkpoint.load_best(ckpt_dir)
        best_weights = best["model"] if best else None
    elif ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for name in (checkpoint.LAST, checkpoint.BEST):
            (ckpt_dir / name).unlink(missing_ok=True)  # a fresh run never mixes with an old one

    tracking_cfg = config.tracking if ctx.is_main else dataclasses.replace(config.tracking, enabled=False)
    autocast = torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    history = (CachedHistory(model, cache, features, autocast=autocast, device=ctx.device,
                             bucket_size=bucket_size, ctx=ctx, grad=tc.news_cache_refresh_grad)
               if cache is not None else None)
    config_yaml = config.to_yaml()
    interrupted = False
    train_seconds, train_samples = 0.0, 0

    def save_last() -> None:
        if ctx.is_main:
            checkpoint.save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                       state=state, config_yaml=config_yaml,
                                       news_cache=cache.state_dict(state.global_step) if cache else None)

    with tracking.start_run(tracking_cfg, run_name=out_dir.name, run_id=state.run_id or None) as run:
        if run.active and not state.run_id:
            state.run_id = run.run_id or ""
            tracking.log_params(config.flat())
            tracking.log_params({"data.dir": str(data_dir.resolve()), "train.samples": builder.n_samples,
                                 "train.batches_per_epoch": batches_per_epoch,
                                 **{f"holdout.{k}": v for k, v in fit_log.definition.items()},
                                 "model.n_params": sum(p.numel() for p in model.parameters())})
            tracking.set_tags(tracking.system_info(device=str(ctx.device), world_size=ctx.world_size))
            tracking.log_text(config_yaml, "config.yaml")
            tracking.log_artifact(dataset.root / MANIFEST, "dataset")

        while state.epoch < tc.epochs and not state.stopped_early:
            if tc.max_steps and state.global_step >= tc.max_steps:
                break
            model.train()
            bar = progress(total=batches_per_epoch, initial=state.batch_in_epoch,
                           desc=f"epoch {state.epoch + 1}/{tc.epochs}", unit="batch",
                           disable=None if ctx.is_main else True)
            window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
            for batch in builder.epoch_batches(state.epoch, start_batch=state.batch_in_epoch,
                                               num_workers=tc.num_workers):
                step_start = time.perf_counter()
                loss_sum = _train_step(objective, model, optimizer, scheduler, batch, autocast=autocast,
                                       device=ctx.device, grad_clip=tc.grad_clip, world_size=ctx.world_size,
                                       history=history, step=state.global_step)
                train_seconds += time.perf_counter() - step_start
                train_samples += batch.global_batch_size
                state.batch_in_epoch += 1
                state.global_step += 1
                window_loss += loss_sum
                window_samples += batch.size
                bar.update(1)
                rate = window_samples * ctx.world_size / max(time.perf_counter() - window_start, 1e-9)
                bar.set_postfix(loss=f"{window_loss / max(window_samples, 1):.4f}", samples_s=f"{rate:.0f}")
                if state.global_step % tc.log_every_steps == 0:
                    window = {"train_loss": window_loss / max(window_samples, 1),
                              "lr": scheduler.get_last_lr()[0], "samples_per_s": rate}
                    if cache is not None:  # share of the history's distinct news re-encoded
                        refreshed, read = cache.reset_counters()
                        window["news_cache_refresh_share"] = refreshed / max(read, 1)
                    tracking.log_metrics(window, step=state.global_step)
                    window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
                if tc.checkpoint_every_steps and state.global_step % tc.checkpoint_every_steps == 0:
                    save_last()
                if tc.max_steps and state.global_step >= tc.max_steps:
                    break
                if stop_after_steps is not None and state.global_step >= stop_after_steps:
                    interrupted = True
                    break
            bar.close()
            epoch_done = state.batch_in_epoch >= batches_per_epoch
            reached_max = bool(tc.max_steps) and state.global_step >= tc.max_steps
            if epoch_done or reached_max:
                best_weights = _end_of_epoch(model, dataset, holdout, reported, config, ctx, state,
                                             best_weights, ckpt_dir)
                state.stopped_early = bool(distributed.broadcast(state.stopped_early, ctx))
                if epoch_done:
                    state.epoch += 1
                    state.batch_in_epoch = 0
            save_last()
            if interrupted:
                break
        distributed.barrier(ctx)

        finished = not interrupted
        kept = _kept_record(state, selection=fit_log.holdout is not None)
        reported_names = sorted(reported) if ctx.is_main else []
        if finished and ctx.is_main:
            if best_weights is not None:
                model.load_state_dict(best_weights)
            extra = {"metrics": kept.get("dev", {}), "holdout_metrics": kept.get("holdout", {}),
                     "reported_metrics": {name: kept.get(name, {}) for name in reported_names},
                     "best_epoch": kept.get("epoch", -1),
                     "selection": ("best held-out AUC" if fit_log.holdout is not None else NO_SELECTION),
                     "holdout": fit_log.definition, "fit_splits": config.train.fit_split_names,
                     "reported_splits": reported_names,
                     "not_reported": fitted_not_reported(config),
                     "epochs_trained": state.epoch, "global_step": state.global_step,
                     "stopped_early": state.stopped_early, "history": _plain(state.history),
                     "mlflow_run_id": state.run_id}
            save_model(out_dir, model, config, dataset=dataset, extra=extra)
            for name in ("holdout", *reported_names):
                tracking.log_metrics({f"best_{name}_{k}": v for k, v in kept.get(name, {}).items()})
            tracking.log_model(out_dir, dataset=dataset, register_name=config.tracking.register_name)
        distributed.barrier(ctx)

    return FitResult(model_dir=out_dir, metrics=dict(kept.get("dev", {})), best_epoch=kept.get("epoch", -1),
                     epochs_trained=state.epoch, global_step=state.global_step, run_id=state.run_id or None,
                     stopped_early=state.stopped_early, finished=finished, history=list(state.history),
                     train_samples_per_second=train_samples / train_seconds if train_seconds else 0.0,
                     holdout_metrics=dict(kept.get("holdout", {})), holdout=dict(fit_log.definition),
                     reported_splits=reported_names, fit_splits=config.train.fit_split_names)


def fitted_not_reported(config: Config) -> str:
    """One line naming the labelled splits besides train that are fitted on and so never reported
    ("" when only train is fitted on)."""
    others = [n for n in config.train.fit_split_names if n != "train"]
    if not others:
        return ""
    return (f"{', '.join(others)} fitted on (train.fit_splits={config.train.fit_splits}), so not "
            f"reported; the held-out slice is the latest part of their union")


def _kept_record(state: checkpoint.TrainState, *, selection: bool) -> dict[str, Any]:
    """The history record of the epoch whose weights are kept: the best held-out epoch, or (without
    selection) the last one evaluated; {} when no epoch was evaluated."""
    if not state.history:
        return {}
    if not selection:
        return state.history[-1]
    return next((r for r in state.history if r["epoch"] == state.best_epoch), {})


class CachedHistory:
    """The history side of a step with the news-vector cache: refresh the batch's due history news
    (gathered from ``features`` only for those), then read ``[B, H, D]``. By default a refresh
    encodes in eval mode without gradient, before the step (``vectors``); with ``grad`` the due news
    are encoded inside the step's forward pass, in train mode and with gradients, beside the
    candidates (``due_inputs``, then ``commit``), as SpeedyRec does."""

    def __init__(self, model: nn.Module, cache: NewsVectorCache, features: NewsFeatures, *, autocast: Any,
                 device: torch.device, bucket_size: int | None = None,
                 ctx: distributed.DistContext | None = None, grad: bool = False) -> None:
        self.model = model
        self.cache = cache
        self.features = features
        self.autocast = autocast
        self.device = device
        self.bucket_size = bucket_size
        self.ctx = ctx
        self.grad = grad

    def encode(self, news: Tensor) -> Tensor:
        """Eval-mode, gradient-free vectors of ``news`` (news_idx) → float32 [n, D]."""
        ids = news.cpu().numpy()
        inputs = NewsInputs.from_arrays(self.features.gather(pad_to_bucket(ids, self.bucket_size)))
        was_training = self.model.training
        self.model.train(False)
        try:
            with torch.no_grad(), (self.autocast or contextlib.nullcontext()):
                vectors = self.model.encode_news(inputs.to(self.device))
        finally:
            self.model.train(was_training)
        return vectors[:len(ids)].float()

    def vectors(self, batch: Batch, step: int) -> Tensor:
        """The batch's history vectors at ``step`` ``[B, H, D]`` (padding → zeros), detached."""
        self.cache.refresh(self._history_news(batch), step, self.encode, self._exchange())
        return self.cache.lookup(batch.history)

    def due_inputs(self, batch: Batch, step: int) -> tuple[Tensor, NewsInputs, Tensor, Tensor]:
        """With ``grad``: (the due history news ``[n]``; the inputs of the candidates' unique news
        followed by the due news'; the cached history vectors ``[B, H, D]``, detached; ``[B, H]``
        the row of the step's encoded table holding each due history news, 0 for the others)."""
        news = self._history_news(batch)
        is_due = self.cache.is_due(news, step).cpu()
        due = news[is_due]
        inputs = batch.news
        slots = torch.zeros_like(batch.history)
        if len(due):
            due_news = NewsInputs.from_arrays(self.features.gather(pad_to_bucket(due.numpy(), self.bucket_size)))
            inputs = NewsInputs.cat([batch.news, due_news])
            # batch.history_slots index [padding; history_news]: map each to its row of the step's table
            rows = torch.zeros(len(news) + 1, dtype=torch.int64)
            rows[1:][is_due] = torch.arange(len(due), dtype=torch.int64) + len(batch.news) + 1
            slots = rows[batch.history_slots]
        return due, inputs, self.cache.lookup(batch.history), slots

    def commit(self, batch: Batch, due: Tensor, vectors: Tensor, step: int) -> None:
        """Write the step's vectors of its ``due`` history news (``vectors [n, D]``) to the cache."""
        self.cache.commit(self._history_news(batch), due, vectors, step, self._exchange())

    @staticmethod
    def _history_news(batch: Batch) -> Tensor:
        if batch.history_news is None:
            raise ConfigError("the news-vector cache needs batches built with split_history=True")
        return batch.history_news

    def _exchange(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        if self.ctx is None or not self.ctx.distributed:
            return None
        ctx = self.ctx
        return lambda news, rows: distributed.all_gather_rows(news, rows, ctx)


def _train_step(objective: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                batch: Batch, *, autocast: Any, device: torch.device, grad_clip: float, world_size: int,
                history: CachedHistory | None = None, step: int = 0) -> float:
    """One optimizer step (``step``, 0-based, counted across epochs) on this rank's shard; returns
    the shard's summed loss. With ``history`` the history vectors come from the news-vector cache.

    The loss is scaled by world_size / global batch so that DDP's gradient average equals the
    gradient of the mean loss over the whole global batch (shards may differ in size by one)."""
    def put(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    optimizer.zero_grad(set_to_none=True)
    if history is not None and history.grad:
        due, news, history_vectors, fresh_slots = history.due_inputs(batch, step)
        with autocast:
            loss_sum, table = objective(news.to(device, non_blocking=True), None, put(batch.history_mask),
                                        put(batch.candidate_slots), put(batch.candidate_mask),
                                        history_vectors=history_vectors, fresh_slots=put(fresh_slots))
        first = len(batch.news) + 1
        history.commit(batch, due, table[first:first + len(due)], step)  # detached by the cache
    elif history is not None:
        history_vectors = history.vectors(batch, step)
        with autocast:
            loss_sum = objective(batch.news.to(device, non_blocking=True), None, put(batch.history_mask),
                                 put(batch.candidate_slots), put(batch.candidate_mask),
                                 history_vectors=history_vectors)
    else:
        with autocast:
            loss_sum = objective(batch.news.to(device, non_blocking=True), put(batch.history_slots),
                                 put(batch.history_mask), put(batch.candidate_slots), put(batch.candidate_mask))
    (loss_sum * (world_size / batch.global_batch_size)).backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss_sum.detach())


def _end_of_epoch(model: nn.Module, dataset: DatasetArtifact, holdout: Impressions | None,
                  reported: dict[str, Impressions], config: Config, ctx: distributed.DistContext,
                  state: checkpoint.TrainState, best_weights: dict[str, Tensor] | None,
                  ckpt_dir: Path) -> dict[str, Tensor] | None:
    """Held-out evaluation, best-weights bookkeeping and the early-stopping decision (rank 0); the
    reported splits (dev) are scored and logged only — they never choose."""
    if not ctx.is_main:
        return best_weights
    record: dict[str, Any] = {"epoch": state.epoch, "step": state.global_step}
    named = ({"holdout": holdout} if holdout is not None else {}) | reported
    for name, impressions in named.items():
        metrics = _plain(evaluate_split(model, dataset, impressions, config=config, device=ctx.device))
        record[name] = metrics
        tracking.log_metrics({f"{name}_{k}": v for k, v in metrics.items()}, step=state.global_step)
    if named:
        state.history.append(record)
    if holdout is None:
        return best_weights
    metrics = record["holdout"]
    auc = float(metrics["auc"])
    if math.isfinite(auc) and auc > state.best_auc:
        state.best_auc, state.best_epoch, state.best_metrics = auc, state.epoch, _plain(metrics)
        state.epochs_without_gain = 0
        best_weights = checkpoint.cpu_state_dict(model)
        checkpoint.save_best(ckpt_dir, weights=best_weights, metrics=state.best_metrics, epoch=state.epoch)
    else:
        state.epochs_without_gain += 1
        if config.train.early_stopping_patience and state.epochs_without_gain >= config.train.early_stopping_patience:
            state.stopped_early = True
    return best_weights


def _plain(value: Any) -> Any:
    """numpy scalars → Python numbers, recursively (for JSON and the checkpoint)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
