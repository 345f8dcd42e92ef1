"""The first-stage model as an MLflow pyfunc, without mlflow: what ``mlflow.pyfunc.load_model``
gives back for a model logged by ``newsrec.train.tracking.log_model``.

The logged folder holds ``model/`` (the MODEL_DIR files: safetensors weights, config, manifest) and
``news/`` (``news_vectors.npy`` float32 [n_news + 1, D] from ``encode_all_news``, row 0 = padding,
and ``news_ids.json``, the ids of rows 1..n_news), so the logged model needs no text inputs of its
own. ``predict`` scores DataFrames with columns ``history`` and ``candidates`` (space-separated
news ids, as in MIND's behaviors.tsv, or lists of ids) through ``score_histories``, as every other
entry point does, and answers a ``scores`` column (one list of floats per row).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newsrec.errors import DataError
from newsrec.inference.histories import Histories
from newsrec.inference.model_io import load_model
from newsrec.inference.scoring import encode_all_news, score_histories

MODEL_FOLDER = "model"
NEWS_FOLDER = "news"
NEWS_VECTORS = "news_vectors.npy"
NEWS_IDS = "news_ids.json"


def write_news_table(model_dir: str | Path, dataset: Any, dest: str | Path) -> None:
    """``dest``/news_vectors.npy and news_ids.json: the model's vectors of ``dataset``'s news."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    model = load_model(model_dir).model
    vectors = encode_all_news(model, dataset, show_progress=False)
    np.save(dest / NEWS_VECTORS, vectors.cpu().numpy().astype(np.float32))
    (dest / NEWS_IDS).write_text(json.dumps(list(dataset.news_idx_to_id[1:])), encoding="utf-8")


class PyfuncScorer:
    """Scores candidates for histories (see the module docstring)."""

    def __init__(self, data_path: str | Path) -> None:
        data_path = Path(data_path)
        self.loaded = load_model(data_path / MODEL_FOLDER)
        self.history_len = self.loaded.config.data.history_len
        news = data_path / NEWS_FOLDER
        ids = json.loads((news / NEWS_IDS).read_text(encoding="utf-8"))
        self.id_to_idx = {news_id: i + 1 for i, news_id in enumerate(ids)}
        self.news_vectors = torch.from_numpy(np.load(news / NEWS_VECTORS))  # [n_news + 1, D], row 0 = padding

    def _indices(self, text: Any, row: int, column: str) -> np.ndarray:
        ids = text.split() if isinstance(text, str) else list(text)
        unknown = [i for i in ids if i not in self.id_to_idx]
        if unknown:
            raise DataError(column, f"row {row}: unknown news id(s) {', '.join(map(str, unknown[:5]))}")
        return np.array([self.id_to_idx[i] for i in ids], dtype=np.int64)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        for column in ("history", "candidates"):
            if column not in model_input:
                raise DataError(column, "missing column; expected columns history and candidates")
        histories = [self._indices(h, row, "history") for row, h in enumerate(model_input["history"])]
        candidates = [self._indices(c, row, "candidates") for row, c in enumerate(model_input["candidates"])]
        counts = np.array([len(c) for c in candidates], dtype=np.int64)
        flat = np.concatenate(candidates) if candidates else np.zeros(0, dtype=np.int64)
        scores = score_histories(self.loaded.model, self.news_vectors, Histories.of_lists(histories), flat, counts,
                                 history_len=self.history_len)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return pd.DataFrame({"scores": [scores[a:b].astype(np.float64).tolist()
                                        for a, b in zip(bounds[:-1], bounds[1:])]})


def load_pyfunc(data_path: str) -> PyfuncScorer:
    """The ``_load_pyfunc`` of MLflow's ``loader_module`` contract."""
    return PyfuncScorer(Path(data_path))
