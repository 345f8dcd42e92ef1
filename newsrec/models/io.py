"""Model artifacts: build a model for a dataset, save it, load it back without unpickling anything.

A MODEL_DIR holds three files (other files in the folder, e.g. checkpoints, are left alone)::

    model.safetensors   the state dict (safetensors: tensors only, no code)
    config.yaml         the resolved config the model was built and trained with
    model.json          schema_version, created, n_params, vocab_size, vocab_sha256,
                        categories_sha256, n_categories, n_subcategories, title_len, news_dim,
                        weights_sha256, dataset {path, manifest_sha256}, extra (metrics, run id...)

Each file is written atomically, ``model.json`` last; it records the weights' sha256, so a folder
left between two saves is detected on load instead of silently mixing files.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from newsrec.config import Config, config_from_yaml_text
from newsrec.errors import ArtifactError, ConfigError
from newsrec.models.recommender import NewsRecommender
from newsrec.utils.io import atomic_file, atomic_path, read_manifest, sha256_file, write_json

if TYPE_CHECKING:  # models take a dataset artifact by its interface; they import nothing of data
    from newsrec.data.artifact import DatasetArtifact

MODEL_SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "model.json"


@dataclass
class LoadedModel:
    """A model read back from a MODEL_DIR: ``model`` in eval mode, its ``config`` and ``manifest``
    (the parsed model.json)."""

    model: NewsRecommender
    config: Config
    manifest: dict[str, Any]
    model_dir: Path


def build_model(config: Config, dataset: "DatasetArtifact") -> NewsRecommender:
    """A freshly initialised model sized for ``dataset`` (vocabulary, categories, GloVe vectors)."""
    return NewsRecommender(
        config.model,
        vocab_size=dataset.vocab_size,
        n_categories=len(dataset.categories["category"]),
        n_subcategories=len(dataset.categories["subcategory"]),
        word_vectors=dataset.word_vectors,
        max_history=config.data.history_len,
    )


def _dataset_identity(dataset: "DatasetArtifact") -> dict[str, Any]:
    return {
        "vocab_size": dataset.vocab_size,
        "vocab_sha256": dataset.file_sha256("vocab"),
        "categories_sha256": dataset.file_sha256("categories"),
        "n_categories": len(dataset.categories["category"]),
        "n_subcategories": len(dataset.categories["subcategory"]),
    }


def save_model(out_dir: str | Path, model: NewsRecommender, config: Config, *, dataset: "DatasetArtifact",
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (trained on ``dataset`` with ``config``) to ``out_dir``; returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "newsrec_schema": str(MODEL_SCHEMA_VERSION)})
    with atomic_file(out_dir / CONFIG_FILE, "w") as fh:
        fh.write(config.to_yaml())
    manifest = {
        "schema_version": MODEL_SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "encoder": config.model.encoder,
        "news_dim": model.news_dim,
        "n_params": model.n_params(),
        **_dataset_identity(dataset),
        "title_len": dataset.title_len,
        "weights_sha256": sha256_file(out_dir / WEIGHTS_FILE),
        "dataset": {
            "path": str(dataset.root.resolve()),
            "manifest_sha256": dataset.file_sha256("manifest"),
        },
        "extra": dict(extra or {}),
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    return out_dir


def load_model(model_dir: str | Path, *, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Read a MODEL_DIR written by ``save_model``; ArtifactError naming the file when anything is off."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model folder not found; train one with `newsrec train`")
    manifest_path, manifest = read_manifest(
        model_dir, MANIFEST_FILE, version=MODEL_SCHEMA_VERSION, what="model folder",
        remedy="re-run `newsrec train` or point at another folder", required=(CONFIG_FILE, WEIGHTS_FILE))
    missing = [k for k in ("vocab_size", "n_categories", "n_subcategories", "weights_sha256") if k not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path}: missing field(s) {', '.join(missing)}")
    config_path = model_dir / CONFIG_FILE
    try:
        config = config_from_yaml_text(config_path.read_text(encoding="utf-8"))
    except (ConfigError, ValueError) as exc:
        raise ArtifactError(f"{config_path}: {exc}".splitlines()[0]) from None
    weights_path = model_dir / WEIGHTS_FILE
    if sha256_file(weights_path) != manifest["weights_sha256"]:
        raise ArtifactError(f"{weights_path}: sha256 differs from {MANIFEST_FILE} (folder modified or "
                            f"written by an interrupted save); save the model again")
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights_path}: unreadable weights ({exc})") from None
    model = NewsRecommender(config.model, vocab_size=int(manifest["vocab_size"]),
                            n_categories=int(manifest["n_categories"]),
                            n_subcategories=int(manifest["n_subcategories"]),
                            max_history=config.data.history_len)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:2]
        raise ArtifactError(f"{weights_path}: weights do not match {CONFIG_FILE}: {' '.join(first)}") from None
    model.to(map_location)
    model.eval()
    return LoadedModel(model=model, config=config, manifest=manifest, model_dir=model_dir)


def check_compatible(manifest: dict[str, Any], dataset: "DatasetArtifact") -> None:
    """Raise ArtifactError if ``dataset``'s vocabulary or categories differ from the model's
    (``manifest`` = a loaded model's model.json)."""
    have = _dataset_identity(dataset)
    wrong = [f"{k} {have[k]!r} vs the model's {manifest.get(k)!r}" for k in
             ("vocab_size", "vocab_sha256", "n_categories", "n_subcategories", "categories_sha256")
             if k in manifest and manifest[k] != have[k]]
    if wrong:
        trained_on = manifest.get("dataset", {}).get("path", "another dataset")
        raise ArtifactError(f"{dataset.root}: not compatible with the model (trained on {trained_on}): "
                            f"{'; '.join(wrong)}; use the dataset the model was trained on or retrain")
