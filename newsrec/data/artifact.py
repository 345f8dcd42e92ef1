"""Reading a dataset artifact (see ``schema.py`` for the layout). Every later stage reads this,
never the raw TSVs."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from newsrec.data import schema
from newsrec.errors import ArtifactError
from newsrec.utils.io import read_json, read_manifest


@dataclass(frozen=True)
class Impressions:
    """One split's impressions as flat arrays (CSR): row i's history is
    ``history[history_offsets[i]:history_offsets[i + 1]]`` (news_idx, oldest first), likewise
    candidates and labels. Memory stays flat for millions of impressions."""

    split: str
    impression_id: np.ndarray  # int64 [n]
    user_id: np.ndarray  # object (str) [n]
    time: np.ndarray  # datetime64[us] [n]
    history: np.ndarray  # int32 [total history]
    history_offsets: np.ndarray  # int64 [n + 1]
    candidates: np.ndarray  # int32 [total candidates]
    candidate_offsets: np.ndarray  # int64 [n + 1]
    labels: np.ndarray | None  # int8 [total candidates]; None when unlabelled (test)

    def __len__(self) -> int:
        return len(self.impression_id)

    def history_of(self, i: int, max_len: int | None = None) -> np.ndarray:
        """Clicks of impression i, oldest first; with max_len keep the most recent ones."""
        start, end = int(self.history_offsets[i]), int(self.history_offsets[i + 1])
        if max_len is not None and end - start > max_len:
            start = end - max_len
        return self.history[start:end]

    def candidates_of(self, i: int) -> np.ndarray:
        return self.candidates[self.candidate_offsets[i]:self.candidate_offsets[i + 1]]

    def labels_of(self, i: int) -> np.ndarray:
        if self.labels is None:
            raise ArtifactError(f"split '{self.split}' has no labels")
        return self.labels[self.candidate_offsets[i]:self.candidate_offsets[i + 1]]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def history_lengths(self) -> np.ndarray:
        return np.diff(self.history_offsets)

    @property
    def candidate_counts(self) -> np.ndarray:
        return np.diff(self.candidate_offsets)

    def select(self, rows: np.ndarray) -> "Impressions":
        """A new Impressions holding only ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        h_val, h_off = _take_csr(self.history, self.history_offsets, rows)
        c_val, c_off = _take_csr(self.candidates, self.candidate_offsets, rows)
        lab = None if self.labels is None else _take_csr(self.labels, self.candidate_offsets, rows)[0]
        return Impressions(self.split, self.impression_id[rows], self.user_id[rows], self.time[rows],
                           h_val, h_off, c_val, c_off, lab)


def concat_impressions(parts: list[Impressions], *, split: str | None = None,
                       drop_mixed_labels: bool = False) -> Impressions:
    """The rows of ``parts`` one after another, as one Impressions named ``split`` (default: the
    parts' names joined by "+"). Either every part has labels or none has; with
    ``drop_mixed_labels`` a mix is allowed and the result has no labels (a log of showings)."""
    if not parts:
        raise ValueError("concat_impressions needs at least one Impressions")
    labelled = {p.has_labels for p in parts}
    if len(labelled) > 1 and drop_mixed_labels:
        labelled = {False}
    elif len(labelled) > 1:
        names = ", ".join(f"{p.split} ({'labelled' if p.has_labels else 'unlabelled'})" for p in parts)
        raise ArtifactError(f"cannot concatenate labelled and unlabelled impressions: {names}")

    def offsets(lengths: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths) if lengths else np.zeros(0, np.int64), out=out[1:])
        return out

    return Impressions(
        split=split if split is not None else "+".join(p.split for p in parts),
        impression_id=np.concatenate([p.impression_id for p in parts]),
        user_id=np.concatenate([p.user_id for p in parts]),
        time=np.concatenate([p.time for p in parts]),
        history=np.concatenate([p.history for p in parts]),
        history_offsets=offsets([p.history_lengths for p in parts]),
        candidates=np.concatenate([p.candidates for p in parts]),
        candidate_offsets=offsets([p.candidate_counts for p in parts]),
        labels=np.concatenate([p.labels for p in parts]) if labelled == {True} else None,
    )


def _take_csr(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = (offsets[1:] - offsets[:-1])[rows]
    new_off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_off[1:])
    if len(rows) == 0 or new_off[-1] == 0:
        return values[:0].copy(), new_off
    starts = offsets[:-1][rows]
    idx = np.repeat(starts - new_off[:-1], lengths) + np.arange(new_off[-1])
    return values[idx], new_off


def _list_column_to_csr(col: pl.Series, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    lengths = col.list.len().fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = col.explode().drop_nulls().to_numpy().astype(dtype, copy=False)
    if len(values) != offsets[-1]:
        raise ArtifactError(f"list column '{col.name}' holds null elements")
    return values, offsets


class DatasetArtifact:
    """A dataset artifact folder, opened and checked. Heavy parts load lazily and are cached."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        _, self.manifest = read_manifest(
            self.root, schema.MANIFEST, version=schema.SCHEMA_VERSION, what="dataset artifact",
            remedy="create one with `newsrec ingest`",
            required=(schema.NEWS, schema.TITLE_TOKENS, schema.VOCAB, schema.CATEGORIES))

    # ---- small parts
    def file_sha256(self, part: str) -> str:
        """sha256 of one of the artifact's identifying files: "manifest", "vocab" or "categories"."""
        from newsrec.utils.io import sha256_file

        name = {"manifest": schema.MANIFEST, "vocab": schema.VOCAB, "categories": schema.CATEGORIES}[part]
        return sha256_file(self.root / name)

    @property
    def splits(self) -> list[str]:
        return [s for s in schema.SPLITS if (self.root / schema.behaviors_file(s)).is_file()]

    @functools.cached_property
    def vocab(self) -> list[str]:
        return read_json(self.root / schema.VOCAB)["words"]

    @functools.cached_property
    def categories(self) -> dict[str, list[str]]:
        return read_json(self.root / schema.CATEGORIES)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def title_len(self) -> int:
        return int(self.title_tokens.shape[1])

    # ---- news
    @functools.cached_property
    def news(self) -> pl.DataFrame:
        path = self.root / schema.NEWS
        return schema.check_frame(pl.read_parquet(path), schema.NEWS_SCHEMA, path)

    @property
    def n_news(self) -> int:
        """Number of real news; valid news_idx are 1..n_news (0 is padding)."""
        return int(self.title_tokens.shape[0]) - 1

    @functools.cached_property
    def title_tokens(self) -> np.ndarray:
        arr = np.load(self.root / schema.TITLE_TOKENS, mmap_mode="r")
        if arr.dtype != np.int32 or arr.ndim != 2:
            raise ArtifactError(f"{self.root / schema.TITLE_TOKENS}: expected int32 [n, title_len], "
                                f"got {arr.dtype} {arr.shape}")
        return np.ascontiguousarray(arr)

    @functools.cached_property
    def news_categories(self) -> tuple[np.ndarray, np.ndarray]:
        """(category_idx, subcategory_idx), int64 [n_news + 1], row 0 = padding news (0)."""
        cat = np.zeros(self.n_news + 1, dtype=np.int64)
        sub = np.zeros(self.n_news + 1, dtype=np.int64)
        idx = self.news["news_idx"].to_numpy()
        cat[idx] = self.news["category_idx"].to_numpy()
        sub[idx] = self.news["subcategory_idx"].to_numpy()
        return cat, sub

    @functools.cached_property
    def news_id_to_idx(self) -> dict[str, int]:
        return dict(zip(self.news["news_id"].to_list(), self.news["news_idx"].to_list()))

    @functools.cached_property
    def news_idx_to_id(self) -> np.ndarray:
        """object [n_news + 1]; entry 0 is ''."""
        out = np.empty(self.n_news + 1, dtype=object)
        out[0] = ""
        out[self.news["news_idx"].to_numpy()] = np.array(self.news["news_id"].to_list(), dtype=object)
        return out

    @functools.cached_property
    def word_vectors(self) -> np.ndarray | None:
        path = self.root / schema.WORD_VECTORS
        if not path.is_file():
            return None
        vec = np.load(path)
        if vec.shape[0] != self.vocab_size:
            raise ArtifactError(f"{path}: {vec.shape[0]} rows for a vocabulary of {self.vocab_size}")
        return vec.astype(np.float32, copy=False)

    # ---- behaviors
    def behaviors(self, split: str) -> pl.DataFrame:
        path = self.root / schema.behaviors_file(split)
        if not path.is_file():
            raise ArtifactError(f"{self.root}: no '{split}' split (has: {', '.join(self.splits) or 'none'})")
        return schema.check_frame(pl.read_parquet(path), schema.BEHAVIORS_SCHEMA, path)

    def listing(self, split: str) -> pl.DataFrame:
        """Every impression line of the split's behaviors.tsv (``schema.LISTING_SCHEMA``): what a
        leaderboard file answers, whatever ingest dropped."""
        path = self.root / schema.listing_file(split)
        if not path.is_file():
            self.behaviors(split)  # names the splits the artifact has
            raise ArtifactError(f"{self.root}: no {schema.listing_file(split)} (the listing of every "
                                f"impression line, written by `newsrec ingest` since it checks "
                                f"submissions against the file); run `newsrec ingest` again")
        return schema.check_frame(pl.read_parquet(path), schema.LISTING_SCHEMA, path)

    @functools.lru_cache(maxsize=3)
    def impressions(self, split: str) -> Impressions:
        df = self.behaviors(split)
        hist, hist_off = _list_column_to_csr(df["history"], np.int32)
        cand, cand_off = _list_column_to_csr(df["candidates"], np.int32)
        labels = None
        if df["labels"].null_count() < len(df):
            labels, lab_off = _list_column_to_csr(df["labels"], np.int8)
            if not np.array_equal(lab_off, cand_off):
                raise ArtifactError(f"{self.root / schema.behaviors_file(split)}: labels and candidates "
                                    f"differ in length")
        return Impressions(
            split=split,
            impression_id=df["impression_id"].to_numpy(),
            user_id=np.array(df["user_id"].to_list(), dtype=object),
            time=df["time"].to_numpy(),
            history=hist, history_offsets=hist_off,
            candidates=cand, candidate_offsets=cand_off,
            labels=labels,
        )


def open_dataset(root: str | Path) -> DatasetArtifact:
    return DatasetArtifact(root)
