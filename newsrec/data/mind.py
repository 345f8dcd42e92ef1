"""Reading and validating MIND files (news.tsv, behaviors.tsv, entity_embedding.vec).

A split is given as a zip or a folder; a zip may hold the files at its root or inside one
subfolder. Every file is read once into memory, checked to be UTF-8 (a BOM and CRLF line ends are
tolerated), and parsed with polars as one string column per line, split on tabs and validated with
vectorised expressions — no Python loop over rows. Each check knows the 1-based line number in the
file, so the first bad line is reported as ``<file>:<line>: <what was expected>``.

With ``on_bad_rows="skip"`` bad rows are dropped and counted per reason instead.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from newsrec.errors import DataError

NEWS_FILE = "news.tsv"
BEHAVIORS_FILE = "behaviors.tsv"
ENTITY_FILE = "entity_embedding.vec"

NEWS_COLUMNS = ("NewsID", "Category", "SubCategory", "Title", "Abstract", "URL", "TitleEntities",
                "AbstractEntities")
BEHAVIORS_COLUMNS = ("ImpressionID", "UserID", "Time", "History", "Impressions")
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
TIME_EXAMPLE = "11/15/2019 8:55:22 AM"

_BOM = b"\xef\xbb\xbf"
_UTF8_CHUNK = 64 << 20
_ENTITY_DTYPE = pl.List(pl.Struct({"WikidataId": pl.String, "Confidence": pl.Float64}))


# ---------------------------------------------------------------------------------------------
# locating the files of a split


@dataclass(frozen=True)
class SourceFile:
    """One file of a split: a plain file, or a member of a zip."""

    container: Path  # the zip, or the folder
    member: str | None  # path inside the zip; None for a plain file
    name: str  # file name (news.tsv, ...)

    @property
    def label(self) -> str:
        """How messages name the file, e.g. ``MINDsmall_train.zip:MINDsmall_train/news.tsv``."""
        if self.member is None:
            return str(self.container / self.name)
        return f"{self.container}:{self.member}"

    def read_bytes(self) -> bytes:
        if self.member is None:
            return (self.container / self.name).read_bytes()
        try:
            with zipfile.ZipFile(self.container) as zf:
                return zf.read(self.member)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(self.label, f"cannot read from the zip ({exc}); re-download it") from None


@dataclass(frozen=True)
class SplitSource:
    """The files of one MIND split found in a zip or folder."""

    path: Path
    is_zip: bool
    news: SourceFile
    behaviors: SourceFile
    entity_embedding: SourceFile | None


def locate_split(path: str | Path) -> SplitSource:
    """Find news.tsv, behaviors.tsv (and entity_embedding.vec if present) in a zip or folder.

    The files may sit at the root or inside exactly one subfolder (as in the official zips).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "not found; expected a MIND zip (e.g. MINDsmall_train.zip) or a folder "
                              "holding news.tsv and behaviors.tsv")
    if path.is_dir():
        names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        is_zip = False
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                names = {n for n in zf.namelist() if not n.endswith("/")}
        except zipfile.BadZipFile:
            raise DataError(path, "not a valid zip file; expected a MIND zip or a folder") from None
        is_zip = True
    found: dict[str, str] = {}
    for wanted in (NEWS_FILE, BEHAVIORS_FILE, ENTITY_FILE):
        hits = sorted(n for n in names if n.rsplit("/", 1)[-1] == wanted and n.count("/") <= 1
                      and not n.startswith("__MACOSX"))
        if len(hits) > 1:
            raise DataError(path, f"holds {len(hits)} copies of {wanted} ({', '.join(hits)}); "
                                  f"give one split per zip or folder")
        if hits:
            found[wanted] = hits[0]
    missing = [w for w in (NEWS_FILE, BEHAVIORS_FILE) if w not in found]
    if missing:
        raise DataError(path, f"no {' or '.join(missing)} at its root or in one subfolder; "
                              f"expected a MIND split (news.tsv + behaviors.tsv)")

    def ref(name: str) -> SourceFile:
        rel = found[name]
        if is_zip:
            return SourceFile(path, rel, name)
        return SourceFile((path / rel).parent, None, name)

    return SplitSource(path=path, is_zip=is_zip, news=ref(NEWS_FILE), behaviors=ref(BEHAVIORS_FILE),
                       entity_embedding=ref(ENTITY_FILE) if ENTITY_FILE in found else None)


# ---------------------------------------------------------------------------------------------
# lines


@dataclass
class Lines:
    """A text file as one polars string column ``text`` (null for an empty line) plus ``line_no``
    (1-based line in the file). ``ends_with_newline`` tells a file cut mid-line apart."""

    label: str
    frame: pl.DataFrame
    ends_with_newline: bool
    sha256: str
    n_bytes: int


def read_lines(source: SourceFile) -> Lines:
    """Read a whole file, check it is non-empty UTF-8, and return its lines (BOM and CR removed)."""
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    n_bytes = len(data)
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if not data or data.isspace():
        raise DataError(source.label, f"empty file; expected {source.name} lines in MIND format")
    separator = _absent_byte(data)
    if separator is None:
        _check_utf8(data, source.label)
        raise DataError("input", "file contains every ASCII control character; is it a text file?")
    try:
        frame = pl.read_csv(data, has_header=False, separator=separator, quote_char=None,
                            schema={"text": pl.String}, infer_schema=False)
    except pl.exceptions.ComputeError:  # the parser rejects bytes that are not UTF-8
        _check_utf8(data, source.label)  # raises naming the line of the first such byte
        raise
    ends = data.endswith(b"\n")
    has_cr = data.find(b"\r") >= 0
    del data
    frame = frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line_no"))
    if has_cr:
        frame = frame.with_columns(pl.col("text").str.strip_suffix("\r"))
    # Blank lines at the very end of a file are harmless; elsewhere they are bad rows.
    if _blank(frame["text"].tail(1))[0]:
        blank_np = _blank(frame["text"])
        real = np.flatnonzero(~blank_np)
        frame = frame.head(int(real[-1]) + 1 if len(real) else 0)
        ends = True
    return Lines(label=source.label, frame=frame, ends_with_newline=ends, sha256=digest, n_bytes=n_bytes)


def _blank(text: pl.Series) -> np.ndarray:
    """bool [n]: the line is empty (null) or only whitespace."""
    return (text.is_null() | (text.str.strip_chars() == "")).to_numpy()


def _check_utf8(data: bytes, label: str) -> None:
    """Raise DataError at the line of the first byte that is not UTF-8 (checked in chunks)."""
    view = memoryview(data)
    start = 0
    while start < len(data):
        end = min(start + _UTF8_CHUNK, len(data))
        while end < len(data) and 0x80 <= data[end] <= 0xBF:  # do not cut a character in two
            end -= 1
        try:
            str(view[start:end], "utf-8")
        except UnicodeDecodeError as exc:
            offset = start + exc.start
            line = data.count(b"\n", 0, offset) + 1
            raise DataError(label, f"byte 0x{data[offset]:02x} is not valid UTF-8; expected UTF-8 "
                                   f"text (re-save the file as UTF-8)", line) from None
        start = end


def _absent_byte(data: bytes) -> str | None:
    """A control byte that never occurs in ``data``: the 'separator' that keeps each line whole
    (None if ``data`` holds them all)."""
    for code in (0x1F, 0x1E, 0x1D, 0x1C, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        if data.find(bytes([code])) < 0:
            return chr(code)
    return None


# ---------------------------------------------------------------------------------------------
# bad-row bookkeeping


@dataclass
class BadRows:
    """Bad rows of one file: per reason, the count and the first line with its message."""

    label: str
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, tuple[int, str]] = field(default_factory=dict)

    def add(self, reason: str, line_nos: np.ndarray, message: str) -> None:
        """Record rows ``line_nos`` (sorted, 1-based) as bad for ``reason``; ``message`` describes
        the first of them."""
        if len(line_nos) == 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + int(len(line_nos))
        line = int(line_nos[0])
        if reason not in self.first or line < self.first[reason][0]:
            self.first[reason] = (line, message)

    def raise_first(self) -> None:
        if not self.first:
            return
        line, message = min(self.first.values())
        extra = sum(self.counts.values()) - 1
        hint = f" ({extra} more bad row{'s' if extra != 1 else ''}; --on-bad-rows skip skips and " \
               f"counts them)" if extra else " (--on-bad-rows skip skips and counts bad rows)"
        raise DataError(self.label, message + hint, line)


def _first_line(frame: pl.DataFrame, mask: pl.Series) -> np.ndarray:
    return frame.filter(mask)["line_no"].to_numpy()


def _split_columns(frame: pl.DataFrame, names: tuple[str, ...], bad: BadRows, *, last_line: int,
                   ends_with_newline: bool) -> tuple[pl.DataFrame, pl.Series]:
    """Split each line (``frame``: text, line_no) on tabs into ``len(names)`` string columns.

    Returns the frame (``line_no`` + one column per name) and the boolean mask of rows with the
    right column count; the columns of the other rows hold partial values and must be masked.
    ``last_line``/``ends_with_newline`` tell a file cut mid-line apart from a short line.
    """
    n_cols = len(names)
    tabs = frame["text"].str.count_matches("\t", literal=True).fill_null(0)
    ok = (tabs == n_cols - 1) & frame["text"].is_not_null()
    if not ok.all():
        bad_rows = frame.with_columns(found=tabs + 1).filter(~ok)
        found = int(bad_rows["found"][0])
        line = int(bad_rows["line_no"][0])
        expected = f"expected {n_cols} tab-separated columns ({', '.join(names)}), found {found}"
        if line == last_line and not ends_with_newline and found < n_cols:
            message = f"truncated last line (the file ends mid-line); {expected}"
        elif bad_rows["text"][0] is None:
            message = f"empty line; {expected}"
        else:
            message = expected
        bad.add("columns", bad_rows["line_no"].to_numpy(), message)
    split = frame["text"].str.split_exact("\t", n_cols - 1).struct.rename_fields(list(names))
    cols = split.struct.unnest()  # rows with another column count are excluded later through ``ok``
    return pl.concat([frame.select("line_no"), cols], how="horizontal"), ok


def _tokens(column: pl.Series) -> tuple[pl.Series, np.ndarray, np.ndarray]:
    """Space-separated ids of each row → (flat tokens, row index of each token int32,
    counts per row int64). Empty strings (empty lists, doubled spaces) are dropped."""
    lists = column.fill_null("").str.split(" ")
    lengths = lists.list.len().to_numpy()
    flat = lists.explode()
    del lists
    rows = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    keep = (flat != "").to_numpy()
    counts = lengths.astype(np.int64)
    if not keep.all():
        counts -= np.bincount(rows[~keep], minlength=len(lengths))
        flat = flat.filter(pl.Series(keep))
        rows = rows[keep]
    return flat, rows, counts


# ---------------------------------------------------------------------------------------------
# news.tsv


@dataclass
class NewsTable:
    """news.tsv parsed: one row per news, in file order. Columns: news_id, category, subcategory,
    title, abstract, url, title_entities list[str], title_entity_confidence list[f32],
    abstract_entities, abstract_entity_confidence, line_no."""

    label: str
    frame: pl.DataFrame
    sha256: str
    skipped: dict[str, int]


def read_news(source: SourceFile, *, on_bad_rows: str = "error") -> NewsTable:
    """Parse and validate a news.tsv (8 tab-separated columns, entity columns as JSON lists)."""
    lines = read_lines(source)
    bad = BadRows(source.label)
    cols, ok = _split_columns(lines.frame, NEWS_COLUMNS, bad, last_line=int(lines.frame["line_no"][-1]),
                              ends_with_newline=lines.ends_with_newline)
    del lines.frame
    empty_id = ok & (cols["NewsID"].str.strip_chars() == "")
    bad.add("empty_news_id", _first_line(cols, empty_id), "empty NewsID; expected an id such as N12345")
    ok = ok & ~empty_id
    dup = ok & ~cols["NewsID"].is_first_distinct() & cols["NewsID"].is_not_null()
    if dup.any():
        first_dup = cols.filter(dup)["NewsID"][0]
        first_line = int(cols.filter(cols["NewsID"] == first_dup)["line_no"][0])
        bad.add("duplicate_news_id", _first_line(cols, dup),
                f"duplicate NewsID '{first_dup}' (first defined on line {first_line}); expected each "
                f"news once per file")
    ok = ok & ~dup
    entities: dict[str, pl.Series] = {}
    for column in ("TitleEntities", "AbstractEntities"):
        parsed, bad_json = _parse_entities(cols[column], ok)
        if bad_json.any():
            value = cols.filter(bad_json)[column][0]
            bad.add("entity_json", _first_line(cols, bad_json),
                    f"{column} is not a JSON list of entities: {value[:60]!r}; expected e.g. "
                    f"[{{\"WikidataId\": \"Q42\", \"Confidence\": 1.0, ...}}] or []")
            ok = ok & ~bad_json
        entities[column] = parsed
    if on_bad_rows == "error":
        bad.raise_first()
    frame = pl.DataFrame({
        "news_id": cols["NewsID"].str.strip_chars(),
        "category": cols["Category"],
        "subcategory": cols["SubCategory"],
        "title": cols["Title"],
        "abstract": cols["Abstract"],
        "url": cols["URL"],
        "title_entities": entities["TitleEntities"].list.eval(pl.element().struct.field("WikidataId")),
        "title_entity_confidence": entities["TitleEntities"].list.eval(
            pl.element().struct.field("Confidence").cast(pl.Float32)),
        "abstract_entities": entities["AbstractEntities"].list.eval(pl.element().struct.field("WikidataId")),
        "abstract_entity_confidence": entities["AbstractEntities"].list.eval(
            pl.element().struct.field("Confidence").cast(pl.Float32)),
        "line_no": cols["line_no"],
    }).filter(ok)
    return NewsTable(label=source.label, frame=frame, sha256=lines.sha256, skipped=dict(bad.counts))


def _parse_entities(column: pl.Series, ok: pl.Series) -> tuple[pl.Series, pl.Series]:
    """JSON entity lists → list[struct{WikidataId, Confidence}] and a mask of unparseable rows.

    Vectorised; only when polars rejects the column are rows checked one by one to find the bad ones.
    """
    text = pl.select(pl.when(ok & (column.str.strip_chars() != "")).then(column).otherwise(pl.lit("[]"))
                     ).to_series()
    try:
        parsed = text.str.json_decode(_ENTITY_DTYPE)
        return parsed.fill_null([]), pl.Series([False] * len(text))
    except pl.exceptions.PolarsError:
        pass
    good = []
    for value in text.to_list():
        try:
            obj = json.loads(value)
            good.append(isinstance(obj, list) and all(isinstance(e, dict) for e in obj))
        except ValueError:
            good.append(False)
    good_s = pl.Series(good)
    clean = pl.select(pl.when(good_s).then(text).otherwise(pl.lit("[]"))).to_series()
    return clean.str.json_decode(_ENTITY_DTYPE).fill_null([]), ~good_s


# ---------------------------------------------------------------------------------------------
# behaviors.tsv


_NUMERIC_ID = r"^N[1-9][0-9]{0,17}$"
_MAX_ID_DIGITS = 18  # as in _NUMERIC_ID
_POW10 = 10 ** np.arange(_MAX_ID_DIGITS + 1, dtype=np.int64)  # int64 [19]: 1, 10, ..., 10**18


@dataclass
class NewsIds:
    """Flat news ids of a column. When every id has MIND's form ``N<digits>`` they are kept as
    numbers (int64, 8 bytes an id, mapped to news_idx by a lookup table); otherwise as strings."""

    numbers: np.ndarray | None  # int64 [n]: 123 for "N123"
    strings: pl.Series | None  # String [n] when ids are not all of the form N<digits>

    @staticmethod
    def from_tokens(tokens: pl.Series) -> "NewsIds":
        numbers = _mind_numbers(tokens)
        return NewsIds(numbers, None) if numbers is not None else NewsIds(None, tokens)

    def __len__(self) -> int:
        return len(self.numbers) if self.numbers is not None else len(self.strings)

    def filter(self, mask: np.ndarray) -> "NewsIds":
        if self.numbers is not None:
            return NewsIds(self.numbers[mask], None)
        return NewsIds(None, self.strings.filter(pl.Series(mask)))

    @staticmethod
    def concat(parts: list["NewsIds"]) -> "NewsIds":
        if all(p.numbers is not None for p in parts):
            return NewsIds(np.concatenate([p.numbers for p in parts]) if parts else
                           np.zeros(0, dtype=np.int64), None)
        return NewsIds(None, pl.concat([p.to_strings() for p in parts]))

    def to_strings(self, mask: np.ndarray | None = None) -> pl.Series:
        """The ids as strings (only those where ``mask`` is True)."""
        if self.numbers is not None:
            nums = self.numbers if mask is None else self.numbers[mask]
            return pl.select(pl.lit("N") + pl.Series("id", nums).cast(pl.String)).to_series()
        return self.strings if mask is None else self.strings.filter(pl.Series(mask))


def _mind_numbers(tokens: pl.Series) -> np.ndarray | None:
    """int64 [n]: 123 for each token ``N123`` when every token matches ``_NUMERIC_ID``, else None.

    Checked without a regex: a token matches when it starts with ``N`` and its other ``d`` bytes
    (1 ≤ d ≤ 18) parse as an integer of exactly ``d`` digits, which leaves no room for a sign, a
    space or a leading zero.
    """
    if not len(tokens):
        return np.zeros(0, dtype=np.int64)
    if not tokens.str.starts_with("N").all():
        return None
    numbers = tokens.str.slice(1).str.to_integer(strict=False)
    if numbers.null_count():
        return None
    lengths = tokens.str.len_bytes().to_numpy()  # uint32 [n]: 1 + d
    if lengths.min() < 2 or lengths.max() > 1 + _MAX_ID_DIGITS:
        return None
    values = numbers.to_numpy()
    if (values < _POW10[lengths - 2]).any() or (values >= _POW10[lengths - 1]).any():
        return None
    return values


@dataclass
class BehaviorsTable:
    """behaviors.tsv parsed, rows in file order (bad rows removed when skipping).

    ``frame``: impression_id Int64, user_id String, time Datetime(us), line_no Int64 — [n rows].
    ``history_ids`` / ``candidate_ids``: flat news ids (NewsIds), grouped by row in order;
    ``history_counts`` / ``candidate_counts``: int64 [n] per-row lengths (CSR);
    ``labels``: int8 aligned with candidate_ids, or None for an unlabelled (test) split.
    """

    label: str
    frame: pl.DataFrame
    history_ids: NewsIds
    history_counts: np.ndarray
    candidate_ids: NewsIds
    candidate_counts: np.ndarray
    labels: np.ndarray | None
    sha256: str
    skipped: dict[str, int]
    no_click: int  # labelled impressions without any click (allowed, reported)
    listing: "ImpressionListing | None" = None  # every impression line as written


BEHAVIORS_CHUNK_ROWS = 250_000  # rows parsed at a time: bounds the memory of the string work


@dataclass
class _Labelling:
    """The split's kind of candidates, fixed by its first valid candidate (across chunks)."""

    labelled: bool | None = None
    line: int = 0


@dataclass
class _BehaviorsChunk:
    """One chunk of rows: per-row values for all rows (``ok`` marks the valid ones) and the news
    ids of the valid rows' histories and candidates (counts are 0 on invalid rows)."""

    frame: pl.DataFrame  # impression_id, user_id, time, line_no, ok
    history_ids: NewsIds
    history_counts: np.ndarray
    candidate_ids: NewsIds
    candidate_counts: np.ndarray
    clicked: np.ndarray  # bool, aligned with candidate_ids


def read_behaviors(source: SourceFile, *, on_bad_rows: str = "error",
                   chunk_rows: int = BEHAVIORS_CHUNK_ROWS) -> BehaviorsTable:
    """Parse and validate a behaviors.tsv (5 tab-separated columns), ``chunk_rows`` lines at a time."""
    lines = read_lines(source)
    bad = BadRows(source.label)
    labelling = _Labelling()
    last_line = int(lines.frame["line_no"][-1])
    chunks = [_behaviors_chunk(lines.frame.slice(start, chunk_rows), bad, labelling, last_line=last_line,
                               ends_with_newline=lines.ends_with_newline)
              for start in range(0, len(lines.frame), chunk_rows)]
    listing = impression_listing(lines.frame)
    del lines.frame
    frame = pl.concat([c.frame for c in chunks], how="vertical")
    history_counts = np.concatenate([c.history_counts for c in chunks])
    candidate_counts = np.concatenate([c.candidate_counts for c in chunks])
    clicked = np.concatenate([c.clicked for c in chunks])
    history_ids = NewsIds.concat([c.history_ids for c in chunks])
    candidate_ids = NewsIds.concat([c.candidate_ids for c in chunks])
    del chunks

    ok = frame["ok"]
    impression_id = frame["impression_id"]
    dup = ok & ~impression_id.is_first_distinct() & impression_id.is_not_null()
    if dup.any():
        value = int(impression_id.filter(dup)[0])
        first_line = int(frame.filter(ok & (impression_id == value))["line_no"][0])
        bad.add("duplicate_impression_id", _first_line(frame, dup),
                f"duplicate ImpressionID {value} (first on line {first_line}); expected unique ids")
        ok = ok & ~dup
    if on_bad_rows == "error":
        bad.raise_first()

    ok_np = ok.to_numpy()
    if not ok_np.all():  # rows found bad after their chunk (duplicates): drop their ids too
        keep_hist = np.repeat(ok_np, history_counts)
        keep_cand = np.repeat(ok_np, candidate_counts)
        history_ids, candidate_ids = history_ids.filter(keep_hist), candidate_ids.filter(keep_cand)
        clicked = clicked[keep_cand]
        history_counts, candidate_counts = history_counts[ok_np], candidate_counts[ok_np]
        frame = frame.filter(ok)
    labels = clicked.astype(np.int8) if labelling.labelled in (True, None) else None
    no_click = 0
    if labels is not None and len(frame):
        offsets = np.concatenate([[0], np.cumsum(candidate_counts)])
        clicks = np.add.reduceat(labels.astype(np.int64), offsets[:-1]) if len(labels) else np.zeros(0)
        no_click = int((clicks == 0).sum())
    return BehaviorsTable(label=source.label, frame=frame.drop("ok"), history_ids=history_ids,
                          history_counts=history_counts, candidate_ids=candidate_ids,
                          candidate_counts=candidate_counts, labels=labels, sha256=lines.sha256,
                          skipped=dict(bad.counts), no_click=no_click, listing=listing)


@dataclass
class ImpressionListing:
    """Every impression line of a behaviors file as written, valid or not: what a leaderboard file
    must answer line by line. Blank lines hold no impression and are left out.

    ``frame``: line_no Int64 (1-based line in the file), impression_id String (the first column,
    stripped; null when empty) — [n lines]. ``candidate_ids``: the news ids of every line's
    Impressions column, in order, with a ``-0``/``-1`` label removed (flat, grouped by line);
    ``candidate_counts`` int64 [n]: 0 where the list cannot be read (not 5 columns, or no id);
    ``labels`` int8 aligned with ``candidate_ids`` when every candidate carries a 0/1 label, else None.
    """

    frame: pl.DataFrame
    candidate_ids: NewsIds
    candidate_counts: np.ndarray
    labels: np.ndarray | None


def impression_listing(lines: pl.DataFrame, *, chunk_rows: int = BEHAVIORS_CHUNK_ROWS) -> ImpressionListing:
    """The ``ImpressionListing`` of behaviors lines (``lines``: text, line_no, as ``read_lines``
    gives), parsed ``chunk_rows`` lines at a time."""
    text = lines.filter(pl.Series(~_blank(lines["text"])))
    frames, ids, counts, clicked, labelled = [], [], [], [], []
    for start in range(0, len(text), chunk_rows):
        part = text.slice(start, chunk_rows)
        fields = part["text"].str.split("\t")
        impression_id = fields.list.get(0, null_on_oob=True).str.strip_chars()
        frames.append(pl.DataFrame({"line_no": part["line_no"],
                                    "impression_id": pl.select(pl.when(impression_id != "")
                                                               .then(impression_id)).to_series()}))
        raw = pl.select(pl.when(fields.list.len() == len(BEHAVIORS_COLUMNS))
                        .then(fields.list.get(-1, null_on_oob=True))).to_series()
        tokens, _, row_counts = _tokens(raw)
        counts.append(row_counts)
        suffix = tokens.str.tail(2)
        is_click, is_label = suffix == "-1", (suffix == "-1") | (suffix == "-0")
        clicked.append(is_click.to_numpy())
        labelled.append(is_label.to_numpy())
        if labelled[-1].all():
            tokens = tokens.str.head(-2)
        elif labelled[-1].any():
            tokens = pl.select(pl.when(is_label).then(tokens.str.head(-2)).otherwise(tokens)).to_series()
        ids.append(NewsIds.from_tokens(tokens))
    if not frames:
        empty = pl.DataFrame(schema={"line_no": pl.Int64, "impression_id": pl.String})
        return ImpressionListing(empty, NewsIds(np.zeros(0, np.int64), None), np.zeros(0, np.int64), None)
    is_labelled = np.concatenate(labelled)
    labels = np.concatenate(clicked).astype(np.int8) if is_labelled.all() else None
    return ImpressionListing(frame=pl.concat(frames), candidate_ids=NewsIds.concat(ids),
                             candidate_counts=np.concatenate(counts), labels=labels)


def read_impression_listing(source: SourceFile) -> ImpressionListing:
    """``impression_listing`` of a behaviors.tsv (read and checked as by ``read_behaviors``)."""
    return impression_listing(read_lines(source).frame)


def _behaviors_chunk(lines: pl.DataFrame, bad: BadRows, labelling: _Labelling, *, last_line: int,
                     ends_with_newline: bool) -> _BehaviorsChunk:
    """Validate and parse a slice of behaviors lines (``lines``: text, line_no)."""
    cols, ok = _split_columns(lines, BEHAVIORS_COLUMNS, bad, last_line=last_line,
                              ends_with_newline=ends_with_newline)
    impression_id = pl.select(pl.when(ok).then(cols["ImpressionID"].str.strip_chars()
                                               .cast(pl.Int64, strict=False))).to_series()
    bad_id = ok & impression_id.is_null()
    if bad_id.any():
        value = cols.filter(bad_id)["ImpressionID"][0]
        bad.add("impression_id", _first_line(cols, bad_id),
                f"ImpressionID {value!r} is not an integer; expected e.g. 1")
    ok = ok & ~bad_id

    user = cols["UserID"].str.strip_chars()
    bad_user = ok & (user == "")
    bad.add("user_id", _first_line(cols, bad_user), "empty UserID; expected an id such as U12345")
    ok = ok & ~bad_user

    time = cols["Time"].str.strip_chars().str.strptime(pl.Datetime("us"), TIME_FORMAT, strict=False)
    bad_time = ok & time.is_null()
    if bad_time.any():
        value = cols.filter(bad_time)["Time"][0]
        bad.add("time", _first_line(cols, bad_time),
                f"Time {value!r} is not a time; expected MM/DD/YYYY HH:MM:SS AM/PM, e.g. {TIME_EXAMPLE}")
    ok = ok & ~bad_time

    no_cand = ok & (cols["Impressions"].str.strip_chars() == "")
    bad.add("no_candidates", _first_line(cols, no_cand),
            "no candidates in Impressions; expected news ids such as N123-1 N456-0 (or N123 N456 on test)")
    ok = ok & ~no_cand

    # Candidates: "N123-1" (labelled) or "N123" (unlabelled, test); one kind per split.
    candidate_tokens, candidate_rows, _ = _tokens(pl.select(pl.when(ok).then(cols["Impressions"])).to_series())
    clicked = candidate_tokens.str.ends_with("-1")
    labelled = (clicked | candidate_tokens.str.ends_with("-0")).to_numpy()
    clicked = clicked.to_numpy()
    bad_label_tok = np.zeros(len(labelled), dtype=bool)
    unlabelled_at = np.flatnonzero(~labelled)
    if len(unlabelled_at):  # "N1-2": a dash, but not a 0/1 label
        bad_label_tok[unlabelled_at] = candidate_tokens.gather(unlabelled_at).str.contains(
            "-", literal=True).to_numpy()
    line_nos = cols["line_no"].to_numpy()
    ok_np = ok.to_numpy().copy()
    if bad_label_tok.any():
        rows = np.unique(candidate_rows[bad_label_tok])
        token = candidate_tokens.filter(pl.Series(bad_label_tok))[0]
        bad.add("label", line_nos[rows],
                f"candidate {token!r} has label {token.rsplit('-', 1)[-1]!r}; expected 0 or 1 "
                f"(N123-1 clicked, N123-0 not)")
        ok_np[rows] = False
    valid_tok = ok_np[candidate_rows]
    if valid_tok.any():
        if labelling.labelled is None:
            labelling.labelled = bool(labelled[np.argmax(valid_tok)])
            labelling.line = int(line_nos[candidate_rows[np.argmax(valid_tok)]])
        other = valid_tok & (labelled != labelling.labelled)
        if other.any():
            rows = np.unique(candidate_rows[other])
            token = candidate_tokens.filter(pl.Series(other))[0]
            if labelling.labelled:
                what = (f"candidate {token!r} has no label but the split's candidates are labelled "
                        f"(N123-1) from line {labelling.line}; expected every candidate labelled, or "
                        f"none (test split)")
            else:
                what = (f"candidate {token!r} is labelled but the split's candidates are unlabelled "
                        f"from line {labelling.line}; expected every candidate labelled, or none "
                        f"(test split)")
            bad.add("mixed_labels", line_nos[rows], what)
            ok_np[rows] = False

    keep_tok = ok_np[candidate_rows]
    if not keep_tok.all():
        candidate_tokens = candidate_tokens.filter(pl.Series(keep_tok))
        clicked, labelled, candidate_rows = clicked[keep_tok], labelled[keep_tok], candidate_rows[keep_tok]
    candidate_counts = np.bincount(candidate_rows, minlength=len(ok_np)).astype(np.int64)
    if labelled.all() and len(labelled):
        candidate_ids = NewsIds.from_tokens(candidate_tokens.str.head(-2))
    else:
        candidate_ids = NewsIds.from_tokens(candidate_tokens)
    del candidate_tokens, candidate_rows

    ok_series = pl.Series(ok_np)
    history_tokens, _, history_counts = _tokens(pl.select(pl.when(ok_series).then(cols["History"])).to_series())
    history_ids = NewsIds.from_tokens(history_tokens)
    del history_tokens
    frame = pl.DataFrame({"impression_id": impression_id, "user_id": user, "time": time,
                          "line_no": cols["line_no"], "ok": ok_series})
    return _BehaviorsChunk(frame=frame, history_ids=history_ids, history_counts=history_counts,
                           candidate_ids=candidate_ids, candidate_counts=candidate_counts,
                           clicked=clicked.astype(bool))


# ---------------------------------------------------------------------------------------------
# entity_embedding.vec


@dataclass
class EntityVectors:
    """entity_embedding.vec parsed: ``ids`` [n] WikidataIds in file order, ``vectors`` float32 [n, dim]."""

    label: str
    ids: list[str]
    vectors: np.ndarray
    sha256: str
    skipped: dict[str, int]


def read_entity_vectors(source: SourceFile, *, on_bad_rows: str = "error") -> EntityVectors:
    """Parse ``WikidataId \\t v1 \\t ... \\t vD`` lines (a trailing tab is tolerated)."""
    lines = read_lines(source)
    bad = BadRows(source.label)
    fields = lines.frame["text"].fill_null("").str.strip_chars_end("\t ").str.split("\t")
    n_fields = fields.list.len()
    dim = int(n_fields[0]) - 1
    line_nos = lines.frame["line_no"]
    if dim < 1:
        raise DataError(source.label, "expected WikidataId followed by tab-separated numbers", 1)
    wrong = n_fields != dim + 1
    bad.add("columns", line_nos.filter(wrong).to_numpy(),
            f"expected {dim + 1} tab-separated fields (WikidataId and {dim} numbers, as on line 1), "
            f"found {int(n_fields.filter(wrong)[0]) if wrong.any() else 0}")
    values = fields.list.slice(1, dim).list.eval(pl.element().str.strip_chars().cast(pl.Float32, strict=False))
    not_num = ~wrong & (values.list.eval(pl.element().is_null()).list.any().fill_null(True))
    bad.add("number", line_nos.filter(not_num).to_numpy(), "a vector entry is not a number")
    keep = ~wrong & ~not_num
    if on_bad_rows == "error":
        bad.raise_first()
    ids = fields.filter(keep).list.get(0).str.strip_chars()
    kept = values.filter(keep)
    vectors = kept.explode().to_numpy().astype(np.float32).reshape(len(kept), dim) if len(kept) else \
        np.zeros((0, dim), dtype=np.float32)
    return EntityVectors(label=source.label, ids=ids.to_list(), vectors=vectors, sha256=lines.sha256,
                         skipped=dict(bad.counts))
