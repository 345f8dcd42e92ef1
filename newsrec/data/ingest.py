"""The ``ingest`` stage: MIND train/dev/test (zips or folders) → the dataset artifact of ``schema.py``.

Everything is read and validated before anything is written; the artifact is written into a
temporary folder that is renamed over ``out_dir`` only when complete.

News from all given splits form one table (union by news_id, the first definition wins, train
first): news_idx 1..n_news in that order. The vocabulary and the category lists are built from the
news listed in the train split's news.tsv only, so dev and test are encoded exactly as a model
trained on train sees them (unseen words → ``<unk>``, unseen categories → 0).
"""
from __future__ import annotations

import datetime as _dt
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from newsrec.config import Config
from newsrec.data import mind, schema
from newsrec.data.tokenize import build_vocabulary, encode_tokens, tokenize
from newsrec.errors import DataError
from newsrec.utils.io import atomic_dir, sha256_file, write_json
from newsrec.utils.progress import progress

MISSING_NEWS_EXAMPLES = 5
MAX_LOOKUP_TABLE = 100_000_000  # largest N<digits> id mapped through a dense table
_NEVER = np.iinfo(np.int64).max  # first_seen of a news no impression shows
# zstd level 1 writes behaviors twice as fast as polars' default level (3), and no larger
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 1}


@dataclass
class SplitData:
    """One split read from its source: the parsed files and where they came from."""

    name: str
    source: mind.SplitSource
    news: mind.NewsTable
    behaviors: mind.BehaviorsTable
    entities: mind.EntityVectors | None


@dataclass
class FlatBehaviors:
    """One split's mapped impressions as flat arrays, the values behind its behaviors frame.

    ``history`` int32 [n_history] and ``candidates`` int32 [n_candidates]: news_idx of all rows,
    grouped by row in row order; ``candidate_counts`` int64 [n_rows]: candidates per row;
    ``labels`` int8 [n_candidates] (0/1), or None on an unlabelled split; ``time`` int64 [n_rows]:
    impression time in microseconds since the epoch (never null: rows with a bad time are dropped
    by the reader).
    """

    history: np.ndarray
    candidates: np.ndarray
    candidate_counts: np.ndarray
    labels: np.ndarray | None
    time: np.ndarray


@dataclass
class IngestResult:
    out_dir: Path
    manifest: dict[str, Any]
    seconds: float

    def summary_lines(self) -> list[str]:
        """A short human summary of what was written."""
        m = self.manifest
        lines = [f"dataset artifact: {self.out_dir}",
                 f"news: {m['news']['count']:,}   words: {m['vocab_size']:,}   "
                 f"categories: {m['categories']['category']:,}/{m['categories']['subcategory']:,}"]
        for split, row in m["splits"].items():
            clicks = "unlabelled" if row["clicks"] is None else f"{row['clicks']:,} clicks"
            lines.append(
                f"{split:>5}: {row['impressions']:,} impressions, {row['candidates']:,} candidates, "
                f"{clicks}, history median {row['history_len_median']:g} / p99 {row['history_len_p99']:g}"
                + (f", {row['no_click_impressions']:,} without a click" if row["no_click_impressions"] else ""))
        missing = m["missing_news"]
        if missing["ids"]:
            lines.append(f"missing news dropped: {missing['ids']:,} ids, {missing['references']:,} "
                         f"references, {missing['impressions_dropped']:,} impressions left empty")
        skipped = {f"{k} {r}": n for k, reasons in m["skipped_rows"].items() for r, n in reasons.items()}
        if skipped:
            lines.append("skipped rows: " + ", ".join(f"{k} {n:,}" for k, n in skipped.items()))
        if m.get("glove"):
            g = m["glove"]
            lines.append(f"GloVe: {g['found']:,} words found, {g['not_found']:,} not found "
                         f"(dim {g['dim']}); {g['added_outside_train']:,} words of dev/test titles only")
        if m.get("title_coverage"):
            parts = []
            for split, row in m["title_coverage"].items():
                text = f"{split} {100 * row['known']:.1f}%"
                if row.get("pretrained") is not None:
                    text += f" ({100 * row['pretrained']:.1f}% with a GloVe vector)"
                parts.append(text)
            lines.append("title words in the vocabulary: " + ", ".join(parts))
        lines.append(f"wall time: {self.seconds:.1f} s")
        return lines


def ingest(config: Config, *, train: str | Path, dev: str | Path | None = None,
           test: str | Path | None = None, out_dir: str | Path,
           glove: str | Path | None = None) -> IngestResult:
    """Read MIND splits (zip or folder each) and write the dataset artifact to ``out_dir``.

    Uses ``config.data``: title_len, lowercase, min_word_count, max_vocab, on_bad_rows
    ("error" | "skip"), missing_news ("error" | "drop"). Raises ``DataError`` naming the file and
    line on bad input; nothing is written then.
    """
    started = _time.perf_counter()
    data_cfg = config.data
    sources = {"train": train, "dev": dev, "test": test}
    sources = {k: Path(v) for k, v in sources.items() if v is not None}
    if glove is not None and not Path(glove).is_file():
        raise DataError(glove, "GloVe file not found; expected a text file of 'word v1 ... vD' lines")
    n_steps = 3 * len(sources) + 4 + (glove is not None)
    with progress(total=n_steps, desc="ingest", unit="step") as bar:
        splits: dict[str, SplitData] = {}
        for name, path in sources.items():
            splits[name] = _read_split(name, path, on_bad_rows=data_cfg.on_bad_rows, bar=bar)

        bar.set_postfix_str("news and vocabulary")
        news, news_by_split = _union_news(splits)
        train_mask = news["news_id"].is_in(splits["train"].news.frame["news_id"].implode())
        title_words = tokenize(news["title"], lowercase=data_cfg.lowercase)
        vocab = build_vocabulary(title_words.filter(train_mask), min_word_count=data_cfg.min_word_count,
                                 max_vocab=data_cfg.max_vocab)
        glove_info = None
        word_vectors = None
        if glove is not None:
            bar.set_postfix_str("GloVe vectors")
            vocab, word_vectors, glove_info = _vocabulary_with_glove(glove, vocab, title_words,
                                                                     lowercase=data_cfg.lowercase)
            bar.update(1)
        title_tokens = np.zeros((len(news) + 1, data_cfg.title_len), dtype=np.int32)
        title_tokens[1:] = encode_tokens(title_words, vocab, length=data_cfg.title_len)
        coverage = _title_coverage(title_tokens[1:], news_by_split, news["news_id"],
                                   pretrained=None if glove_info is None else glove_info.pop("found_words"))
        del title_words
        categories = {
            "category": ["<unk>", *sorted(set(news.filter(train_mask)["category"].to_list()))],
            "subcategory": ["<unk>", *sorted(set(news.filter(train_mask)["subcategory"].to_list()))],
        }
        bar.update(1)

        bar.set_postfix_str("mapping news ids")
        id_map = news.select("news_id", "news_idx")
        behaviors: dict[str, pl.DataFrame] = {}
        flat: dict[str, FlatBehaviors] = {}
        listings: dict[str, pl.DataFrame] = {}
        missing_total = {"ids": 0, "references": 0, "impressions_dropped": 0}
        missing_ids: set[str] = set()
        for name, split in splits.items():
            behaviors[name], flat[name], missing, line_nos = _map_behaviors(
                split.behaviors, id_map, policy=data_cfg.missing_news)
            listings[name] = listing_frame(split.behaviors.listing, line_nos, id_map)
            missing_ids |= missing["ids"]
            missing_total["references"] += missing["references"]
            missing_total["impressions_dropped"] += missing["impressions_dropped"]
        missing_total["ids"] = len(missing_ids)
        bar.update(1)

        bar.set_postfix_str("news statistics")
        news_full = _news_statistics(news, news_by_split, flat, categories)
        del flat
        bar.update(1)


        entity_ids, entity_vectors = _union_entities(splits)

        bar.set_postfix_str("writing")
        manifest = _manifest(config, splits, behaviors, news_full, vocab, categories, missing_total,
                             glove_info, glove, entity_ids)
        manifest["title_coverage"] = coverage
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            news_full.write_parquet(tmp / schema.NEWS, **PARQUET_OPTIONS)
            np.save(tmp / schema.TITLE_TOKENS, title_tokens)
            for name, frame in behaviors.items():
                frame.write_parquet(tmp / schema.behaviors_file(name), **PARQUET_OPTIONS)
                listings[name].write_parquet(tmp / schema.listing_file(name), **PARQUET_OPTIONS)
            write_json(tmp / schema.VOCAB, {"words": vocab})
            write_json(tmp / schema.CATEGORIES, categories)
            if word_vectors is not None:
                np.save(tmp / schema.WORD_VECTORS, word_vectors)
            if entity_vectors is not None:
                np.save(tmp / schema.ENTITY_VECTORS, entity_vectors)
                write_json(tmp / schema.ENTITIES, {"ids": entity_ids})
            manifest["seconds"] = round(_time.perf_counter() - started, 2)
            write_json(tmp / schema.MANIFEST, manifest)
        bar.update(1)
    return IngestResult(out_dir=out_dir, manifest=manifest, seconds=_time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# reading


def _read_split(name: str, path: Path, *, on_bad_rows: str, bar: Any) -> SplitData:
    source = mind.locate_split(path)
    bar.set_postfix_str(f"{name} news")
    news = mind.read_news(source.news, on_bad_rows=on_bad_rows)
    bar.update(1)
    bar.set_postfix_str(f"{name} behaviors")
    behaviors = mind.read_behaviors(source.behaviors, on_bad_rows=on_bad_rows)
    bar.update(1)
    entities = None
    if source.entity_embedding is not None:
        bar.set_postfix_str(f"{name} entities")
        entities = mind.read_entity_vectors(source.entity_embedding, on_bad_rows=on_bad_rows)
    bar.update(1)
    if name == "train" and behaviors.labels is None and len(behaviors.frame):
        raise DataError(source.behaviors.label, "the train split has no labels (candidates like N123 "
                                                "instead of N123-1); expected a labelled train split", 1)
    return SplitData(name=name, source=source, news=news, behaviors=behaviors, entities=entities)


def _union_news(splits: dict[str, SplitData]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """All news, first definition wins (train, dev, test order), with news_idx 1..n; and the
    (news_id, splits) table of which news.tsv listed each news."""
    parts = [s.news.frame.drop("line_no").with_columns(pl.lit(name).alias("split"))
             for name, s in splits.items()]
    stacked = pl.concat(parts, how="vertical")
    by_split = stacked.group_by("news_id", maintain_order=True).agg(pl.col("split").alias("splits"))
    news = (stacked.unique("news_id", keep="first", maintain_order=True).drop("split")
            .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("news_idx")))
    return news, by_split


def _map_behaviors(table: mind.BehaviorsTable, id_map: pl.DataFrame, *, policy: str
                   ) -> tuple[pl.DataFrame, FlatBehaviors, dict[str, Any], np.ndarray]:
    """News ids → news_idx; build the behaviors frame of BEHAVIORS_SCHEMA (list columns), the same
    impressions as flat arrays, the count of missing news (dropped under ``policy="drop"``), and the
    source line of each row kept (int64 [rows])."""
    n = len(table.frame)
    history, h_missing = lookup_news(table.history_ids, id_map)
    candidates, c_missing = lookup_news(table.candidate_ids, id_map)
    history_counts, candidate_counts, labels = table.history_counts, table.candidate_counts, table.labels
    missing_info: dict[str, Any] = {"ids": set(), "references": 0, "impressions_dropped": 0}
    keep_rows = np.ones(n, dtype=bool)
    if h_missing.any() or c_missing.any():
        h_rows = np.repeat(np.arange(n), history_counts)
        c_rows = np.repeat(np.arange(n), candidate_counts)
        missing_ids = pl.concat([table.history_ids.to_strings(h_missing),
                                 table.candidate_ids.to_strings(c_missing)])
        distinct = missing_ids.unique(maintain_order=True)
        references = int(h_missing.sum() + c_missing.sum())
        if policy == "error":
            first_row = min(int(h_rows[np.argmax(h_missing)]) if h_missing.any() else n,
                            int(c_rows[np.argmax(c_missing)]) if c_missing.any() else n)
            line = int(table.frame["line_no"][first_row])
            examples = ", ".join(distinct.head(MISSING_NEWS_EXAMPLES).to_list())
            raise DataError(table.label,
                            f"{len(distinct):,} news id(s) referenced {references:,} times are absent "
                            f"from the news.tsv files given (e.g. {examples}; first on this line); "
                            f"expected every history and candidate id in news.tsv — pass "
                            f"--missing-news drop to drop them and count them", line)
        missing_info["ids"] = set(distinct.to_list())
        missing_info["references"] = references
        history = history[~h_missing]
        history_counts = np.bincount(h_rows[~h_missing], minlength=n).astype(np.int64)
        candidates = candidates[~c_missing]
        candidate_counts = np.bincount(c_rows[~c_missing], minlength=n).astype(np.int64)
        if labels is not None:
            labels = labels[~c_missing]
        keep_rows = candidate_counts > 0
        missing_info["impressions_dropped"] = int((~keep_rows).sum())
    history = history.astype(np.int32, copy=False)
    candidates = candidates.astype(np.int32, copy=False)
    frame = table.frame.with_columns(
        history=_list_series(history, history_counts, pl.Int32),
        candidates=_list_series(candidates, candidate_counts, pl.Int32),
        labels=(_list_series(labels, candidate_counts, pl.Int8) if labels is not None
                else pl.lit(None, dtype=pl.List(pl.Int8))),
    )
    if not keep_rows.all():
        frame = frame.filter(pl.Series(keep_rows))
        history = history[np.repeat(keep_rows, history_counts)]
        candidate_counts = candidate_counts[keep_rows]
    flat = FlatBehaviors(history=history, candidates=candidates, candidate_counts=candidate_counts,
                         labels=labels, time=frame["time"].to_physical().to_numpy())
    return (frame.select(list(schema.BEHAVIORS_SCHEMA)), flat, missing_info,
            frame["line_no"].to_numpy().astype(np.int64))


def listing_frame(listing: mind.ImpressionListing, line_nos: np.ndarray, id_map: pl.DataFrame) -> pl.DataFrame:
    """The LISTING_SCHEMA frame of a split: every impression line of its behaviors.tsv with the
    row of behaviors-<split>.parquet that holds it (null when the line was skipped as a bad row or
    lost every candidate to missing news) and its listed candidates' news_idx (0 where news.tsv
    lacks the news; null when the list cannot be read)."""
    row_of_line = pl.DataFrame({"line_no": line_nos, "row": np.arange(len(line_nos), dtype=np.int64)})
    idx, _ = lookup_news(listing.candidate_ids, id_map)
    counts = listing.candidate_counts
    candidates = _list_series(idx.astype(np.int32), counts, pl.Int32)
    frame = listing.frame.with_columns(candidates=pl.when(pl.Series(counts > 0)).then(candidates))
    frame = frame.join(row_of_line, on="line_no", how="left", maintain_order="left")
    return frame.select([pl.col(c).cast(t) for c, t in schema.LISTING_SCHEMA.items()])


def lookup_news(ids: mind.NewsIds, id_map: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """News ids → (news_idx int32 [n] with 0 where missing, missing bool [n]).

    Ids of MIND's form ``N<digits>`` on both sides go through a dense lookup table (one array
    index per id); other ids through a hash join."""
    news_ids, news_idx = id_map["news_id"], id_map["news_idx"]
    if ids.numbers is not None and len(news_ids) and news_ids.str.contains(mind._NUMERIC_ID).all():
        news_numbers = news_ids.str.slice(1).cast(pl.Int64).to_numpy()
    else:
        news_numbers = None
    if news_numbers is not None and news_numbers.max() < MAX_LOOKUP_TABLE:
        table = np.zeros(int(news_numbers.max()) + 2, dtype=np.int32)
        table[news_numbers] = news_idx.to_numpy()
        idx = table.take(ids.numbers, mode="clip")  # beyond the largest id: the 0 at the end
        return idx, idx == 0
    mapped = ids.to_strings().replace_strict(news_ids, news_idx, default=None, return_dtype=pl.Int32)
    missing = mapped.is_null().to_numpy()
    return mapped.fill_null(0).to_numpy(), missing


def _list_series(values: np.ndarray, counts: np.ndarray, dtype: pl.DataType) -> pl.Series:
    """Flat values + per-row counts → a polars list Series (zero-copy through Arrow)."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    arr = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pl.Series(pl.from_arrow(arr)).cast(pl.List(dtype))


def _news_statistics(news: pl.DataFrame, news_by_split: pl.DataFrame, flat: dict[str, FlatBehaviors],
                     categories: dict[str, list[str]]) -> pl.DataFrame:
    """Fill the NEWS_SCHEMA columns computed from behaviors: train counts and first_seen.

    Reductions over the flat news_idx arrays into arrays indexed by news_idx [n_news + 1]: counts
    with ``np.bincount`` (clicks count the candidates labelled 1), first_seen as the ``np.minimum.at``
    of the impression times of every split, repeated per candidate.
    """
    size = len(news) + 1
    impressions = np.zeros(size, dtype=np.int64)
    clicks = np.zeros(size, dtype=np.int64)
    history_clicks = np.zeros(size, dtype=np.int64)
    if "train" in flat:
        train = flat["train"]
        impressions = np.bincount(train.candidates, minlength=size)
        if train.labels is not None:
            clicks = np.bincount(train.candidates[train.labels == 1], minlength=size)
        history_clicks = np.bincount(train.history, minlength=size)
    first = np.full(size, _NEVER, dtype=np.int64)
    for split in flat.values():
        np.minimum.at(first, split.candidates, np.repeat(split.time, split.candidate_counts))
    idx = news["news_idx"].to_numpy()
    first_seen = first[idx]
    first_seen[first_seen == _NEVER] = np.datetime64("NaT", "us").view(np.int64)
    cat_ids = {c: i for i, c in enumerate(categories["category"])}
    sub_ids = {c: i for i, c in enumerate(categories["subcategory"])}
    out = news.join(news_by_split, on="news_id", how="left", maintain_order="left").with_columns(
        category_idx=pl.col("category").replace_strict(list(cat_ids), list(cat_ids.values()), default=0,
                                                       return_dtype=pl.Int32),
        subcategory_idx=pl.col("subcategory").replace_strict(list(sub_ids), list(sub_ids.values()),
                                                             default=0, return_dtype=pl.Int32),
        train_impressions=pl.Series(impressions[idx].astype(np.int32)),
        train_clicks=pl.Series(clicks[idx].astype(np.int32)),
        train_history_clicks=pl.Series(history_clicks[idx].astype(np.int32)),
        first_seen=pl.Series(first_seen.view("datetime64[us]")),
    )
    return out.select([pl.col(c).cast(t) for c, t in schema.NEWS_SCHEMA.items()])


def _union_entities(splits: dict[str, SplitData]) -> tuple[list[str], np.ndarray | None]:
    """Entity vectors of all splits (first definition wins): ids [n + 1] ('' = padding) and
    float32 [n + 1, dim] with row 0 zeros; (['',], None) when no split has entity_embedding.vec."""
    tables = [s.entities for s in splits.values() if s.entities is not None and len(s.entities.ids)]
    if not tables:
        return [""], None
    dim = tables[0].vectors.shape[1]
    for t in tables[1:]:
        if t.vectors.shape[1] != dim:
            raise DataError(t.label, f"entity vectors of dimension {t.vectors.shape[1]}; expected {dim} "
                                     f"as in {tables[0].label}")
    ids = pl.Series("id", [i for t in tables for i in t.ids])
    first = ids.is_first_distinct().to_numpy()
    vectors = np.concatenate([t.vectors for t in tables])[first]
    out = np.zeros((len(vectors) + 1, dim), dtype=np.float32)
    out[1:] = vectors
    return ["", *ids.filter(pl.Series(first)).to_list()], out


# ---------------------------------------------------------------------------------------------
# GloVe


def _vocabulary_with_glove(glove: str | Path, train_vocab: list[str], title_words: pl.Series, *,
                           lowercase: bool) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """The train vocabulary plus every word of any split's titles that GloVe has a vector for (text
    is not a label: a cold news' words get their pretrained meaning). A word outside the train
    vocabulary without a GloVe vector stays ``<unk>``: nothing would ever train its row.

    Returns (vocabulary, float32 [len(vocabulary), D] vectors, info with ``found_words`` bool [len]).
    """
    known = set(train_vocab)
    everything = build_vocabulary(title_words, min_word_count=1, max_vocab=0)[2:]
    extra = [w for w in everything if w not in known]
    candidates = [*train_vocab, *extra]
    vectors, info, found = read_glove(glove, candidates, lowercase=lowercase)
    keep = np.ones(len(candidates), dtype=bool)
    keep[len(train_vocab):] = found[len(train_vocab):]
    vocab = [w for w, k in zip(candidates, keep) if k]
    found = found[keep]
    info.update(found=int(found[2:].sum()), not_found=int((~found[2:]).sum()),
                added_outside_train=int(keep[len(train_vocab):].sum()), found_words=found)
    return vocab, vectors[keep], info


def _title_coverage(title_tokens: np.ndarray, news_by_split: pl.DataFrame, news_ids: pl.Series, *,
                    pretrained: np.ndarray | None) -> dict[str, dict[str, Any]]:
    """Per split (the news its news.tsv lists): title words kept (``title_tokens`` int32 [n, T], row
    i = news_idx i + 1), the share in the vocabulary (not ``<unk>``) and, with GloVe, the share with a
    pretrained vector (``pretrained`` bool [vocab_size])."""
    listed = news_by_split.join(pl.DataFrame({"news_id": news_ids}).with_row_index("row"), on="news_id")
    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "dev", "test"):
        rows = listed.filter(pl.col("splits").list.contains(split))["row"].to_numpy()
        if len(rows) == 0:
            continue
        words = title_tokens[rows]
        words = words[words != schema.PAD]
        total = int(len(words))
        row: dict[str, Any] = {"words": total, "known": float((words != schema.UNK).mean()) if total else 0.0}
        if pretrained is not None:
            row["pretrained"] = float(pretrained[words].mean()) if total else 0.0
        out[split] = row
    return out


def read_glove(path: str | Path, vocab: list[str], *, lowercase: bool
               ) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """GloVe text file (``word v1 ... vD`` per line) → float32 [len(vocab), D] aligned to ``vocab``,
    an info dict and which vocabulary words were found (bool [len(vocab)]).

    An exact match wins; with ``lowercase`` a cased GloVe word also fills its lowercase vocabulary
    word. Words not found get small random vectors (seeded, scaled like the found ones); ``<pad>``
    is zeros. Only matching lines are parsed, streaming, so multi-GB files fit in memory.
    """
    path = Path(path)
    lines = pl.scan_csv(path, has_header=False, separator="\x1f", quote_char=None,
                        schema={"text": pl.String}, encoding="utf8-lossy", truncate_ragged_lines=True)
    words = pl.col("text").str.split_exact(" ", 1).struct.field("field_0")
    key = words.str.to_lowercase() if lowercase else words
    try:
        matched = (lines.with_row_index("row")
                   .with_columns(word=words, key=key)
                   .filter(pl.col("key").is_in(vocab))
                   .collect(engine="streaming"))
    except pl.exceptions.PolarsError as exc:
        raise DataError(path, f"cannot read as a GloVe text file ({str(exc).splitlines()[0]}); expected "
                              f"'word v1 ... vD' lines") from None
    if len(matched) == 0:
        raise DataError(path, f"no word of the {len(vocab):,}-word vocabulary found; expected a GloVe "
                              f"text file of 'word v1 ... vD' lines")
    matched = (matched.with_columns(exact=(pl.col("word") == pl.col("key")))
               .sort(["exact", "row"], descending=[True, False])
               .unique("key", keep="first", maintain_order=True))
    numbers = (matched["text"].str.strip_chars_end().str.split(" ").list.slice(1)
               .list.eval(pl.element().cast(pl.Float32, strict=False)))
    lengths = numbers.list.len()
    dim = int(lengths.mode().sort()[-1])
    good = (lengths == dim) & ~numbers.list.eval(pl.element().is_null()).list.any()
    matched, numbers = matched.filter(good), numbers.filter(good)
    found_vectors = numbers.explode().to_numpy().astype(np.float32).reshape(len(numbers), dim)
    index = {w: i for i, w in enumerate(vocab)}
    rows = np.array([index[k] for k in matched["key"].to_list()], dtype=np.int64)
    scale = float(found_vectors.std()) if found_vectors.size else 0.1
    rng = np.random.default_rng(0)
    vectors = rng.normal(0.0, scale, size=(len(vocab), dim)).astype(np.float32)
    vectors[rows] = found_vectors
    vectors[schema.PAD] = 0.0
    real = np.ones(len(vocab), dtype=bool)
    real[[schema.PAD, schema.UNK]] = False
    found_words = np.zeros(len(vocab), dtype=bool)
    found_words[rows] = True
    found_words &= real
    found = int(found_words.sum())
    return vectors, {"file": str(path), "dim": dim, "found": found, "not_found": int(real.sum()) - found}, found_words


# ---------------------------------------------------------------------------------------------
# manifest


def _manifest(config: Config, splits: dict[str, SplitData], behaviors: dict[str, pl.DataFrame],
              news: pl.DataFrame, vocab: list[str], categories: dict[str, list[str]],
              missing: dict[str, int], glove_info: dict[str, Any] | None, glove: str | Path | None,
              entity_ids: list[str]) -> dict[str, Any]:
    split_rows: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    skipped: dict[str, dict[str, int]] = {}
    for name, split in splits.items():
        frame = behaviors[name]
        hist_len = frame["history"].list.len().to_numpy()
        labelled = split.behaviors.labels is not None
        clicks = int(frame["labels"].list.sum().sum()) if labelled else None
        no_click = int((frame["labels"].list.sum() == 0).sum()) if labelled else 0
        split_rows[name] = {
            "impressions": len(frame),
            "candidates": int(frame["candidates"].list.len().sum()),
            "clicks": clicks,
            "labelled": labelled,
            "no_click_impressions": no_click,
            "users": int(frame["user_id"].n_unique()),
            "history_len_median": float(np.median(hist_len)) if len(hist_len) else 0.0,
            "history_len_p99": float(np.percentile(hist_len, 99)) if len(hist_len) else 0.0,
            "history_len_max": int(hist_len.max()) if len(hist_len) else 0,
            "empty_histories": int((hist_len == 0).sum()),
            "news_in_news_tsv": len(split.news.frame),
        }
        src = split.source
        files = {"news.tsv": {"path": split.news.label, "sha256": split.news.sha256},
                 "behaviors.tsv": {"path": split.behaviors.label, "sha256": split.behaviors.sha256}}
        if split.entities is not None:
            files["entity_embedding.vec"] = {"path": split.entities.label, "sha256": split.entities.sha256}
        sources[name] = {"path": str(src.path), "kind": "zip" if src.is_zip else "folder",
                         "sha256": sha256_file(src.path) if src.is_zip else None, "files": files}
        for kind, counts in (("news", split.news.skipped), ("behaviors", split.behaviors.skipped),
                             ("entities", split.entities.skipped if split.entities else {})):
            if counts:
                skipped[f"{name}/{kind}"] = dict(counts)
    options = {k: v for k, v in config.to_dict()["data"].items()}
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": sources,
        "splits": split_rows,
        "news": {"count": len(news), "with_first_seen": int(news["first_seen"].is_not_null().sum())},
        "vocab_size": len(vocab),
        "title_len": config.data.title_len,
        "categories": {k: len(v) for k, v in categories.items()},
        "entities": len(entity_ids) - 1,
        "options": options,
        "skipped_rows": skipped,
        "missing_news": dict(missing),
        "glove": (dict(glove_info, file=str(glove)) if glove_info else None),
    }
