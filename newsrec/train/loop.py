"""First-stage training: ``fit(config, data_dir=..., out_dir=...)`` — the ``newsrec train`` stage.

NRMS objective: every click of a training impression, with ``train.npratio`` non-clicks of the same
impression drawn afresh each epoch, softmax cross-entropy over the 1 + npratio scores (padding
candidates masked to −inf). AdamW with linear warmup then linear decay, gradient clipping.
Each step encodes every distinct news of the batch once (``batching``). After every epoch the dev
split is scored with the fast path (each dev news encoded once) and the official metrics; training
stops early when dev AUC has not improved for ``train.early_stopping_patience`` epochs, and the best
epoch's weights are what ends up in MODEL_DIR.

MODEL_DIR/checkpoints/ holds ``last.pt`` (written every epoch and every
``train.checkpoint_every_steps`` steps) and ``best.pt``; ``resume=True`` continues from ``last.pt``
exactly (same remaining batches, same RNG, same optimizer and schedule).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newsrec.config import Config
from newsrec.data.artifact import DatasetArtifact, Impressions, open_dataset
from newsrec.data.features import news_features
from newsrec.data.schema import MANIFEST
from newsrec.errors import ArtifactError, ConfigError
from newsrec.models.inputs import NewsInputs
from newsrec.train import checkpoint, distributed, tracking
from newsrec.train.batching import Batch, BatchBuilder
from newsrec.utils.progress import progress

CHECKPOINT_DIR = "checkpoints"
# Settings a resumed run must share with the run that wrote the checkpoint (others, such as
# train.epochs or the logging cadence, may change on resume).
_RESUME_INVARIANT = ("data", "model", "train.batch_size", "train.npratio", "train.seed", "train.lr",
                     "train.weight_decay", "train.warmup_steps", "train.bf16", "train.bucket_size")


@dataclass
class FitResult:
    """What ``fit`` did. ``finished`` is False when it stopped at ``stop_after_steps`` (resume it)."""

    model_dir: Path
    metrics: dict[str, Any]  # dev metrics of the best epoch ({} without a labelled dev split)
    best_epoch: int  # 0-based; -1 without dev
    epochs_trained: int
    global_step: int
    run_id: str | None
    stopped_early: bool
    finished: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    train_samples_per_second: float = 0.0


class NRMSObjective(nn.Module):
    """The training wrapper around a ``NewsRecommender``: a batch → summed softmax cross-entropy.

    The model is called only through ``encode_news``/``encode_user``/``score``; this wrapper is what
    DistributedDataParallel wraps, so gradient synchronisation sees one ``forward`` per step.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, news: NewsInputs, history_slots: Tensor, history_mask: Tensor, candidate_slots: Tensor,
                candidate_mask: Tensor) -> Tensor:
        """news: the inputs of the U unique news, history_slots/mask [B, H], candidate_slots/mask [B, C]
        (column 0 = the click) → summed loss over the B samples (scalar)."""
        news_vectors = self.model.encode_news(news)  # [U, D]
        table = torch.cat([news_vectors.new_zeros(1, news_vectors.shape[1]), news_vectors])  # [U+1, D]
        user_vectors = self.model.encode_user(table[history_slots], history_mask)  # [B, D]
        logits = self.model.score(user_vectors, table[candidate_slots]).float()  # [B, C]
        logits = logits.masked_fill(~candidate_mask, float("-inf"))
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target, reduction="sum")


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; biases, norms and other 1-D parameters without weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _dev_impressions(dataset: DatasetArtifact, config: Config) -> Impressions | None:
    if "dev" not in dataset.splits:
        return None
    dev = dataset.impressions("dev")
    if not dev.has_labels:
        return None
    limit = config.train.dev_max_impressions
    if limit and limit < len(dev):
        dev = dev.select(np.arange(limit))
    return dev


def evaluate_split(model: nn.Module, dataset: DatasetArtifact, impressions: Impressions, *,
                   config: Config, device: torch.device) -> dict[str, Any]:
    """Official metrics of ``model`` on labelled ``impressions`` (fast path: each news encoded once)."""
    from newsrec.eval.evaluate import score_impressions
    from newsrec.eval.metrics import compute_metrics

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
    """Train on ``data_dir``'s train split, select on its dev split, write MODEL_DIR ``out_dir``.

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
    if "train" not in dataset.splits:
        raise ArtifactError(f"{data_dir}: no train split to learn from; ingest one with --train")
    if ctx.is_main:  # PLM states are computed once, by rank 0, before the other ranks read them
        features = news_features(dataset, config)
    distributed.barrier(ctx)
    if not ctx.is_main:
        features = news_features(dataset, config, show_progress=False)
    builder = BatchBuilder(dataset.impressions("train"), features=features, batch_size=tc.batch_size,
                           npratio=tc.npratio, history_len=config.data.history_len, seed=tc.seed,
                           bucket_size=tc.bucket_size if tc.bf16 else None, rank=ctx.rank,
                           world_size=ctx.world_size)
    dev = _dev_impressions(dataset, config) if ctx.is_main else None
    batches_per_epoch = builder.batches_per_epoch
    total_steps = batches_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    from newsrec.models.io import build_model, save_model

    model = build_model(config, dataset, features).to(ctx.device)
    objective = distributed.wrap_model(NRMSObjective(model), ctx)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps=tc.warmup_steps, total_steps=total_steps))

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
        best = checkpoint.load_best(ckpt_dir)
        best_weights = best["model"] if best else None
    elif ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for name in (checkpoint.LAST, checkpoint.BEST):
            (ckpt_dir / name).unlink(missing_ok=True)  # a fresh run never mixes with an old one

    tracking_cfg = config.tracking if ctx.is_main else dataclasses.replace(config.tracking, enabled=False)
    autocast = torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    config_yaml = config.to_yaml()
    interrupted = False
    train_seconds, train_samples = 0.0, 0

    def save_last() -> None:
        if ctx.is_main:
            checkpoint.save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                       state=state, config_yaml=config_yaml)

    with tracking.start_run(tracking_cfg, run_name=out_dir.name, run_id=state.run_id or None) as run:
        if run.active and not state.run_id:
            state.run_id = run.run_id or ""
            tracking.log_params(config.flat())
            tracking.log_params({"data.dir": str(data_dir.resolve()), "train.samples": builder.n_samples,
                                 "train.batches_per_epoch": batches_per_epoch,
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
                                       device=ctx.device, grad_clip=tc.grad_clip, world_size=ctx.world_size)
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
                    tracking.log_metrics({"train_loss": window_loss / max(window_samples, 1),
                                          "lr": scheduler.get_last_lr()[0], "samples_per_s": rate},
                                         step=state.global_step)
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
                best_weights = _end_of_epoch(model, dataset, dev, config, ctx, state, best_weights, ckpt_dir)
                state.stopped_early = bool(distributed.broadcast(state.stopped_early, ctx))
                if epoch_done:
                    state.epoch += 1
                    state.batch_in_epoch = 0
            save_last()
            if interrupted:
                break
        distributed.barrier(ctx)

        finished = not interrupted
        if finished and ctx.is_main:
            if best_weights is not None:
                model.load_state_dict(best_weights)
            extra = {"metrics": _plain(state.best_metrics), "best_epoch": state.best_epoch,
                     "epochs_trained": state.epoch, "global_step": state.global_step,
                     "stopped_early": state.stopped_early, "dev_history": _plain(state.history),
                     "mlflow_run_id": state.run_id}
            save_model(out_dir, model, config, dataset=dataset, extra=extra)
            tracking.log_metrics({f"best_dev_{k}": v for k, v in state.best_metrics.items()})
            tracking.log_model(out_dir, dataset=dataset, register_name=config.tracking.register_name)
        distributed.barrier(ctx)

    return FitResult(model_dir=out_dir, metrics=dict(state.best_metrics), best_epoch=state.best_epoch,
                     epochs_trained=state.epoch, global_step=state.global_step, run_id=state.run_id or None,
                     stopped_early=state.stopped_early, finished=finished, history=list(state.history),
                     train_samples_per_second=train_samples / train_seconds if train_seconds else 0.0)


def _train_step(objective: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                batch: Batch, *, autocast: Any, device: torch.device, grad_clip: float, world_size: int) -> float:
    """One optimizer step on this rank's shard; returns the shard's summed loss.

    The loss is scaled by world_size / global batch so that DDP's gradient average equals the
    gradient of the mean loss over the whole global batch (shards may differ in size by one)."""
    def put(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss_sum = objective(batch.news.to(device, non_blocking=True), put(batch.history_slots),
                             put(batch.history_mask), put(batch.candidate_slots), put(batch.candidate_mask))
    (loss_sum * (world_size / batch.global_batch_size)).backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss_sum.detach())


def _end_of_epoch(model: nn.Module, dataset: DatasetArtifact, dev: Impressions | None, config: Config,
                  ctx: distributed.DistContext, state: checkpoint.TrainState,
                  best_weights: dict[str, Tensor] | None, ckpt_dir: Path) -> dict[str, Tensor] | None:
    """Dev evaluation, best-weights bookkeeping and the early-stopping decision (rank 0)."""
    if not ctx.is_main or dev is None:
        return best_weights
    metrics = evaluate_split(model, dataset, dev, config=config, device=ctx.device)
    record = {"epoch": state.epoch, "step": state.global_step, **_plain(metrics)}
    state.history.append(record)
    tracking.log_metrics({f"dev_{k}": v for k, v in metrics.items()}, step=state.global_step)
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
