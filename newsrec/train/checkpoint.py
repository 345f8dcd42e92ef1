"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a ``torch.save`` of plain tensors, numbers, strings, lists and dicts only, read
back with ``weights_only=True`` (no arbitrary unpickling). Two files are kept in the checkpoint
folder, each written atomically:

    last.pt   model, optimizer, scheduler, RNG states, data position (epoch, batch in epoch),
              early-stopping state and metrics so far, and with ``train.news_cache_refresh_steps`` the
              news-vector cache rows a continuing run may still read — what ``--resume`` reads
    best.pt   the model weights of the best dev epoch and its metrics

The data position is enough to rebuild the remaining batches: the batch order of an epoch and the
non-clicks of each batch are pure functions of (seed, epoch, batch index), see ``batching``.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newsrec.errors import ArtifactError
from newsrec.utils.io import atomic_path

LAST = "last.pt"
BEST = "best.pt"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where a run stands. ``epoch`` is the epoch in progress (0-based) and ``batch_in_epoch`` the
    number of its batches already trained; at an epoch boundary it is (next epoch, 0)."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_auc: float = float("-inf")
    best_epoch: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)
    epochs_without_gain: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # dev metrics per epoch
    run_id: str = ""  # tracking run to continue on resume
    stopped_early: bool = False


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states as plain objects (tensors, ints, lists)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's weights (safe to keep while training continues)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(ckpt_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: TrainState, config_yaml: str,
                    news_cache: dict[str, Any] | None = None) -> Path:
    """Write ``last.pt`` atomically; returns its path. ``news_cache``: ``NewsVectorCache.state_dict``."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model": cpu_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "state": asdict(state),
        "config_yaml": config_yaml,
    }
    if news_cache is not None:
        payload["news_cache"] = news_cache
    path = Path(ckpt_dir) / LAST
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def save_best(ckpt_dir: str | Path, *, weights: dict[str, torch.Tensor], metrics: dict[str, float],
              epoch: int) -> Path:
    path = Path(ckpt_dir) / BEST
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, "model": weights, "metrics": dict(metrics),
                    "epoch": epoch}, tmp)
    return path


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path}: no checkpoint to resume from; train without --resume to start anew")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ArtifactError(f"{path}: not a readable newsrec checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it to start anew") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: checkpoint format {payload.get('format_version') if isinstance(payload, dict) else '?'}"
                            f", this newsrec reads {FORMAT_VERSION}; train without --resume")
    return payload


def load_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """``last.pt`` as a dict (model, optimizer, scheduler, rng, state: TrainState, config_yaml)."""
    payload = _load(Path(ckpt_dir) / LAST)
    payload["state"] = TrainState(**payload["state"])
    return payload


def load_news_cache(payload: dict[str, Any], cache: Any, path: str | Path) -> None:
    """Restore a ``NewsVectorCache`` from a loaded ``last.pt`` (ArtifactError when it has none or
    one of another shape)."""
    saved = payload.get("news_cache")
    if saved is None:
        raise ArtifactError(f"{path}: the checkpoint holds no news-vector cache, but "
                            f"train.news_cache_refresh_steps={cache.refresh_steps}; resume with the "
                            f"settings of the interrupted run or train without --resume")
    try:
        cache.load_state_dict(saved)
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}; train without --resume") from None


def load_best(ckpt_dir: str | Path) -> dict[str, Any] | None:
    path = Path(ckpt_dir) / BEST
    return _load(path) if path.is_file() else None
