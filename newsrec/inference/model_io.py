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
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from newsrec.config import Config, config_from_yaml_text
from newsrec.data import schema
from newsrec.data.artifact import DatasetArtifact
from newsrec.data.features import (NewsFeatures, category_base_rates, entity_table, news_features,
                                   title_match_vectors)
from newsrec.errors import ArtifactError, ConfigError
from newsrec.models.inputs import NewsInputs
from newsrec.models.recommender import NewsRecommender
from newsrec.utils.io import atomic_file, atomic_path, read_manifest, sha256_file, write_json

MODEL_SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "model.json"
TEXT_STATISTICS_NEWS = 2048  # news whose PLM states set the model's per-dimension standardisation


@dataclass
class LoadedModel:
    """A model read back from a MODEL_DIR: ``model`` in eval mode, its ``config`` and ``manifest``
    (the parsed model.json)."""

    model: NewsRecommender
    config: Config
    manifest: dict[str, Any]
    model_dir: Path


def build_model(config: Config, dataset: DatasetArtifact, features: NewsFeatures | None = None) -> NewsRecommender:
    """A freshly initialised model sized for ``dataset`` (vocabulary, categories, GloVe vectors, entity
    table) and, with ``text_encoder=plm``, for the backbone of ``features`` (opened when not given)."""
    mc = config.model
    if features is None:
        features = news_features(dataset, config)
    table = features.entity_table
    plm_layers = None
    if mc.text_encoder == "plm" and mc.plm_finetune_layers:
        plm_layers = features.backbone().top_layers()
    model = NewsRecommender(
        mc,
        vocab_size=dataset.vocab_size,
        n_categories=len(dataset.categories["category"]),
        n_subcategories=len(dataset.categories["subcategory"]),
        word_vectors=dataset.word_vectors if mc.text_encoder == "words" else None,
        max_history=config.data.history_len,
        n_entities=len(table.ids) if table is not None else 0,
        entity_vectors=table.vectors if table is not None else None,
        plm_dim=int(features.plm.get("dim", 0)),
        plm_layers=plm_layers,
        **_lift_bases(mc, dataset),
        title_match_vectors=(title_match_vectors(dataset.title_tokens, dataset.vocab_size, mc.title_match_dim)
                             if mc.title_match_dim else None),
    )
    model.plm_fingerprint = features.plm_fingerprint
    if model.title_match is not None:
        _set_title_match_spread(model, dataset, history_len=config.data.history_len)
    if mc.text_encoder == "plm":
        sample = np.random.default_rng(mc.plm_max_len).choice(
            np.arange(1, features.n_rows), size=min(TEXT_STATISTICS_NEWS, features.n_rows - 1), replace=False)
        inputs = NewsInputs.from_arrays(features.gather(np.sort(sample)))
        model.news_encoder.set_text_statistics(inputs.text_states, inputs.text_mask)
    return model


TITLE_MATCH_SAMPLE = 5000  # train impressions the title match's spread is measured on


def _set_title_match_spread(model: NewsRecommender, dataset: DatasetArtifact, *, history_len: int) -> None:
    """The title match's spread over up to ``TITLE_MATCH_SAMPLE`` evenly spaced impressions of the
    train split (their histories and candidates; no labels), or 1 without a train split."""
    if "train" not in dataset.splits:
        return
    impressions = dataset.impressions("train")
    rows = np.unique(np.linspace(0, len(impressions) - 1, num=min(TITLE_MATCH_SAMPLE, len(impressions))).astype(np.int64))
    model.title_match.set_spread(dataset.title_tokens,
                                 [impressions.history_of(int(i), history_len) for i in rows],
                                 [impressions.candidates_of(int(i)) for i in rows])


def _lift_bases(mc: Any, dataset: DatasetArtifact) -> dict[str, np.ndarray]:
    if not mc.category_lift:
        return {}
    category_base, subcategory_base = category_base_rates(dataset)
    return {"category_base": category_base, "subcategory_base": subcategory_base}


def _news_input_identity(model: NewsRecommender, dataset: DatasetArtifact, config: Config) -> dict[str, Any]:
    """What the model's news inputs depend on beyond the vocabulary: the PLM and the entity table."""
    out: dict[str, Any] = {"text_encoder": config.model.text_encoder}
    if config.model.text_encoder == "plm":
        out["plm"] = {"name": config.model.plm_name, "fingerprint": model.plm_fingerprint,
                      "dim": model.plm_dim}
    if config.model.use_entities:
        emb = model.news_encoder.entity_embedding
        table = entity_table(dataset)
        out["entities"] = {"count": int(emb.num_embeddings), "dim": int(emb.embedding_dim),
                           "sha256": table.sha256, "pretrained": table.vectors is not None}
    return out


def _dataset_identity(dataset: DatasetArtifact) -> dict[str, Any]:
    return {
        "vocab_size": dataset.vocab_size,
        "vocab_sha256": sha256_file(dataset.root / schema.VOCAB),
        "categories_sha256": sha256_file(dataset.root / schema.CATEGORIES),
        "n_categories": len(dataset.categories["category"]),
        "n_subcategories": len(dataset.categories["subcategory"]),
    }


def save_model(out_dir: str | Path, model: NewsRecommender, config: Config, *, dataset: DatasetArtifact,
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
        **_news_input_identity(model, dataset, config),
        "weights_sha256": sha256_file(out_dir / WEIGHTS_FILE),
        "dataset": {
            "path": str(dataset.root.resolve()),
            "manifest_sha256": sha256_file(dataset.root / schema.MANIFEST),
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
    mc = config.model
    plm = manifest.get("plm") or {}
    entities = manifest.get("entities") or {}
    if mc.text_encoder == "plm" and not plm.get("fingerprint"):
        raise ArtifactError(f"{manifest_path}: a PLM model without the fingerprint of its backbone; train it again")
    plm_layers = None
    if mc.text_encoder == "plm" and mc.plm_finetune_layers:
        from newsrec.data.plm import TextBackbone

        backbone = TextBackbone(mc.plm_name, max_len=mc.plm_max_len, finetune_layers=mc.plm_finetune_layers)
        if backbone.fingerprint != plm["fingerprint"]:
            raise ArtifactError(f"{mc.plm_name}: differs from the PLM the model at {model_dir} was trained "
                                f"with; point model.plm_name at the original weights")
        plm_layers = backbone.top_layers()
    model = NewsRecommender(mc, vocab_size=int(manifest["vocab_size"]),
                            n_categories=int(manifest["n_categories"]),
                            n_subcategories=int(manifest["n_subcategories"]),
                            max_history=config.data.history_len,
                            n_entities=int(entities.get("count", 0)), entity_dim=entities.get("dim"),
                            plm_dim=int(plm.get("dim", 0)), plm_layers=plm_layers)
    model.plm_fingerprint = plm.get("fingerprint")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:2]
        raise ArtifactError(f"{weights_path}: weights do not match {CONFIG_FILE}: {' '.join(first)}") from None
    model.to(map_location)
    model.eval()
    return LoadedModel(model=model, config=config, manifest=manifest, model_dir=model_dir)


def check_compatible(manifest: dict[str, Any], dataset: DatasetArtifact) -> None:
    """Raise ArtifactError if ``dataset``'s vocabulary or categories differ from the model's
    (``manifest`` = a loaded model's model.json)."""
    have = _dataset_identity(dataset)
    wrong = [f"{k} {have[k]!r} vs the model's {manifest.get(k)!r}" for k in
             ("vocab_size", "vocab_sha256", "n_categories", "n_subcategories", "categories_sha256")
             if k in manifest and manifest[k] != have[k]]
    if manifest.get("entities"):
        table = entity_table(dataset)
        if table.sha256 != manifest["entities"].get("sha256"):
            wrong.append(f"entity table of {len(table.ids)} entities differs from the model's")
    if wrong:
        trained_on = manifest.get("dataset", {}).get("path", "another dataset")
        raise ArtifactError(f"{dataset.root}: not compatible with the model (trained on {trained_on}): "
                            f"{'; '.join(wrong)}; use the dataset the model was trained on or retrain")
