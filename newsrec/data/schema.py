"""The dataset artifact's contract: file names, columns and dtypes, declared once, checked on read.

Layout of a dataset artifact folder (written by ``newsrec ingest``)::

    manifest.json               schema version, source sha256, row counts, vocab size, options
    news.parquet                one row per news (news_idx 1..n_news; 0 is the padding news)
    title_tokens.npy            int32 [n_news + 1, title_len]; row 0 all padding; 0 = pad, 1 = <unk>
    behaviors-<split>.parquet   one row per impression, in the source file's order
    submission-<split>.parquet  every impression line of the source behaviors.tsv, skipped ones too
    vocab.json                  {"words": [...]} index i -> word; 0 "<pad>", 1 "<unk>"
    categories.json             {"category": [...], "subcategory": [...]}; index 0 "<unk>"
    word_vectors.npy            optional float32 [vocab_size, dim] aligned to vocab.json
    entity_vectors.npy          optional float32 [n_entities + 1, 100] from entity_embedding.vec
    entities.json               optional {"ids": [...]} index i -> WikidataId (0 = pad)
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from newsrec.errors import ArtifactError

SCHEMA_VERSION = 1
SPLITS = ("train", "dev", "test")

MANIFEST = "manifest.json"
NEWS = "news.parquet"
TITLE_TOKENS = "title_tokens.npy"
VOCAB = "vocab.json"
CATEGORIES = "categories.json"
WORD_VECTORS = "word_vectors.npy"
ENTITY_VECTORS = "entity_vectors.npy"
ENTITIES = "entities.json"

PAD, UNK = 0, 1
PAD_WORD, UNK_WORD = "<pad>", "<unk>"


def behaviors_file(split: str) -> str:
    return f"behaviors-{split}.parquet"


def listing_file(split: str) -> str:
    return f"submission-{split}.parquet"


NEWS_SCHEMA: dict[str, pl.DataType] = {
    "news_idx": pl.Int32,  # 1..n_news, row of title_tokens.npy
    "news_id": pl.String,  # MIND id, e.g. N12345
    "category": pl.String,
    "subcategory": pl.String,
    "category_idx": pl.Int32,  # into categories.json["category"]; 0 = unknown
    "subcategory_idx": pl.Int32,
    "title": pl.String,
    "abstract": pl.String,
    "url": pl.String,
    "title_entities": pl.List(pl.String),  # WikidataIds
    "title_entity_confidence": pl.List(pl.Float32),
    "abstract_entities": pl.List(pl.String),
    "abstract_entity_confidence": pl.List(pl.Float32),
    "splits": pl.List(pl.String),  # which splits' news.tsv listed it
    "train_impressions": pl.Int32,  # times shown as a candidate in train impressions
    "train_clicks": pl.Int32,  # times clicked in train impressions
    "train_history_clicks": pl.Int32,  # times it appears in train histories
    "first_seen": pl.Datetime("us"),  # earliest impression time showing it (any split); null if never
}

BEHAVIORS_SCHEMA: dict[str, pl.DataType] = {
    "impression_id": pl.Int64,  # as in the file (MIND ids are integers); order = file order
    "user_id": pl.String,
    "time": pl.Datetime("us"),
    "history": pl.List(pl.Int32),  # news_idx, oldest first, full length (truncate at use: keep the end)
    "candidates": pl.List(pl.Int32),  # news_idx in the file's order
    "labels": pl.List(pl.Int8),  # 0/1 per candidate; null on an unlabelled (test) split
}

# What a leaderboard file answers: one row per impression line of the split's behaviors.tsv, in
# file order, whatever ingest dropped (bad rows skipped, news missing from news.tsv).
LISTING_SCHEMA: dict[str, pl.DataType] = {
    "line_no": pl.Int64,  # 1-based line in behaviors.tsv (blank lines hold no impression)
    "impression_id": pl.String,  # as written in the file; null when the line has none
    "row": pl.Int64,  # row of behaviors-<split>.parquet; null when ingest kept no row for the line
    "candidates": pl.List(pl.Int32),  # news_idx as listed; 0 = absent from news.tsv; null when
    #                                   the list cannot be read (not 5 columns, or no candidate)
}


def check_frame(df: pl.DataFrame, schema: dict[str, pl.DataType], path: str | Path) -> pl.DataFrame:
    """Raise ArtifactError naming the file if a column is missing or of another dtype."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ArtifactError(f"{path}: missing column(s) {', '.join(missing)}")
    wrong = [f"{c} is {df.schema[c]}, expected {t}" for c, t in schema.items() if df.schema[c] != t]
    if wrong:
        raise ArtifactError(f"{path}: {'; '.join(wrong)}")
    return df.select(list(schema))
