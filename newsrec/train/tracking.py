"""MLflow experiment tracking — the only module of newsrec that imports mlflow.

mlflow is slow to import, so it is imported inside the functions that need it, and only when
tracking is enabled. When it is disabled, or no run is active, every ``log_*`` call is a no-op.

Store: ``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the
working folder (``sqlite:///mlflow.db``); ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows the runs.

The trained model is logged as an MLflow *pyfunc* model through a loader module (this one): the
logged folder holds the MODEL_DIR files (safetensors weights, config, manifest) and the news table it
scores (the model's news vectors and the news ids). ``mlflow.pyfunc.load_model(uri)`` reads it back
with no unpickling as ``newsrec.inference.pyfunc.PyfuncScorer``, which scores DataFrames with columns
``history`` and ``candidates`` (space-separated news ids, as in MIND's behaviors.tsv) through the
inference layer, answering a ``scores`` column (one list of floats per row).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from newsrec.config import TrackingConfig
from newsrec.errors import NewsrecError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PYFUNC_MODEL_NAME = "model"


@dataclass
class RunHandle:
    """The run being logged to; ``run_id`` is None when tracking is disabled."""

    run_id: str | None
    experiment_id: str | None = None
    tracking_uri: str | None = None

    @property
    def active(self) -> bool:
        return self.run_id is not None


def resolve_tracking_uri(tracking_cfg: TrackingConfig) -> str:
    return tracking_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _mlflow() -> Any:
    """Import mlflow quietly (its loggers and those of its SQL migrations down to warnings)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import mlflow

    for name in ("mlflow", "alembic", "sqlalchemy"):  # mlflow sets its own level on import
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def _active_mlflow() -> Any | None:
    """mlflow, if it is imported and a run is active; else None (so log_* never starts a run)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return None
    return mlflow


def _connect(tracking_cfg: TrackingConfig) -> Any:
    mlflow = _mlflow()
    uri = resolve_tracking_uri(tracking_cfg)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(tracking_cfg.experiment)
    except Exception as exc:  # unreachable server, unwritable store, ...
        raise NewsrecError(f"tracking store {uri}: {str(exc).splitlines()[0]} "
                           f"(set tracking.tracking_uri / MLFLOW_TRACKING_URI, or -o tracking.enabled=false)"
                           ) from None
    return mlflow


@contextlib.contextmanager
def start_run(tracking_cfg: TrackingConfig, *, run_name: str, nested: bool = False,
              run_id: str | None = None) -> Iterator[RunHandle]:
    """A tracking run for the ``with`` block: a new one (child of the active run with
    ``nested=True``), or the existing ``run_id`` continued. A no-op handle when tracking is off."""
    if not tracking_cfg.enabled:
        yield RunHandle(run_id=None)
        return
    mlflow = _connect(tracking_cfg)
    # Inside an active run (a pipeline's parent run), a stage's run becomes its child.
    active = mlflow.active_run()
    nested = nested or (active is not None and active.info.run_id != run_id)
    with mlflow.start_run(run_id=run_id or None, run_name=None if run_id else run_name,
                          nested=nested) as run:
        yield RunHandle(run_id=run.info.run_id, experiment_id=run.info.experiment_id,
                        tracking_uri=mlflow.get_tracking_uri())


SECRET_PARAMS = ("serve.admin_token",)  # logged as "***" when set


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return text[:6000]


def log_params(params: dict[str, Any]) -> None:
    mlflow = _active_mlflow()
    if mlflow is not None and params:
        mlflow.log_params({k: "***" if k in SECRET_PARAMS and v else _param_value(v)
                           for k, v in params.items()})


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Numeric entries only (NaN skipped); names made MLflow-safe (``ndcg@5`` → ``ndcg_at_5``)."""
    mlflow = _active_mlflow()
    if mlflow is None:
        return
    clean = {metric_key(k): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
             and np.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def metric_key(name: str) -> str:
    """An MLflow-safe metric name: ``ndcg@5`` → ``ndcg_at_5``, ``MHSA (NRMS)_auc`` → ``MHSA_NRMS_auc``
    (MLflow allows only alphanumerics and ``_ - . : /`` and spaces)."""
    safe = re.sub(r"[^A-Za-z0-9_\-.:/]+", "_", name.replace("@", "_at_"))
    return re.sub(r"_+", "_", safe).strip("_") or "metric"


def set_tags(tags: dict[str, Any]) -> None:
    mlflow = _active_mlflow()
    if mlflow is not None and tags:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow = _active_mlflow()
    if mlflow is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    mlflow = _active_mlflow()
    if mlflow is not None:
        mlflow.log_text(text, artifact_file)


def system_info(*, device: str, world_size: int) -> dict[str, Any]:
    """What the run ran on (logged as tags)."""
    import torch

    return {
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.processor": platform.processor() or platform.machine(),
        "sys.cpu_count": os.cpu_count(),
        "sys.torch": torch.__version__,
        "sys.torch_threads": torch.get_num_threads(),
        "sys.device": device,
        "sys.cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else "",
        "sys.world_size": world_size,
    }


def log_evaluation(tracking_cfg: TrackingConfig, *, run_id: str | None, metrics: dict[str, Any],
                   artifacts: list[str | Path] = (), prefix: str = "") -> str | None:
    """Log evaluation ``metrics`` (+ files) into ``run_id`` (e.g. the model's training run), or into
    a new run when it is None or no longer in the store. Returns the run id (None when disabled)."""
    if not tracking_cfg.enabled:
        return run_id
    mlflow = _connect(tracking_cfg)
    if run_id:
        try:
            mlflow.get_run(run_id)
        except Exception:
            run_id = None
    nested = mlflow.active_run() is not None and mlflow.active_run().info.run_id != run_id
    if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
        context: Any = contextlib.nullcontext(mlflow.active_run())
    else:
        context = mlflow.start_run(run_id=run_id, run_name=None if run_id else "evaluate", nested=nested)
    with context as run:
        log_metrics({f"{prefix}{k}": v for k, v in metrics.items()})
        for path in artifacts:
            log_artifact(path)
        return run.info.run_id


# ---------------------------------------------------------------------------------------------
# the model as an MLflow pyfunc


def _copy_model_files(model_dir: Path, dest: Path) -> None:
    from newsrec.inference.model_io import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE

    dest.mkdir(parents=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE):
        shutil.copy2(model_dir / name, dest / name)


def log_model(model_dir: str | Path, *, dataset: Any, register_name: str = "") -> str | None:
    """Log MODEL_DIR (+ the dataset's news table) as a pyfunc model of the active run, with a
    signature and an input example (one history and three candidates of the dataset); register it under ``register_name`` when given. Returns the model URI."""
    mlflow = _active_mlflow()
    if mlflow is None:
        return None
    import pandas as pd
    from mlflow.models import infer_signature

    from newsrec.inference import pyfunc

    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="newsrec-pyfunc-") as tmp:
        data = Path(tmp) / "newsrec"
        _copy_model_files(model_dir, data / pyfunc.MODEL_FOLDER)
        pyfunc.write_news_table(model_dir, dataset, data / pyfunc.NEWS_FOLDER)
        example_ids = list(dataset.news_idx_to_id[1:4])
        example = pd.DataFrame({"history": [" ".join(example_ids[:2])], "candidates": [" ".join(example_ids)]})
        scorer = pyfunc.load_pyfunc(str(data))
        signature = infer_signature(example, scorer.predict(example))
        info = mlflow.pyfunc.log_model(
            name=PYFUNC_MODEL_NAME,
            loader_module="newsrec.train.tracking",
            data_path=str(data),
            signature=signature,
            input_example=example,  # shown by the MLflow UI and used by `mlflow models serve` checks
            pip_requirements=_pip_requirements(),  # given, so mlflow does not probe the environment
            registered_model_name=register_name or None,
        )
    return info.model_uri


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("newsrec", "torch", "numpy", "pandas", "safetensors", "pyyaml", "polars"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _load_pyfunc(data_path: str) -> Any:
    """MLflow's entry point for ``loader_module`` models: the scorer of
    ``newsrec.inference.pyfunc`` (the inference layer; this module only logs it)."""
    from newsrec.inference.pyfunc import load_pyfunc

    return load_pyfunc(data_path)
