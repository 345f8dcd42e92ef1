"""MIND leaderboard submissions: write and check ``prediction.zip``.

Format (the leaderboard scorer's rules): ``prediction.txt`` at the root of the zip; one line per
impression of the split, in the split file's order::

    ImpressionID [r1,r2,...,rn]

with no spaces inside the brackets (the scorer splits each line on whitespace), where r_i is the
1-based rank of the i-th candidate as listed in behaviors.tsv and the ranks are a strict permutation
of 1..n. Everything is validated before a file is written; ``check_submission`` validates an existing
file against the behaviors file itself and names the first bad line.

Whatever ingest dropped, the file answers every impression line of behaviors.tsv (the artifact's
listing, ``schema.LISTING_SCHEMA``):

- a candidate absent from news.tsv is ranked after every known candidate of its impression (the
  model knows nothing of it: no title, no category), missing ones among themselves in listed order;
- a line ingest kept no row for (skipped as a bad row, or every candidate missing) is scored by the
  first stage as a user without history (its history was not kept), known candidates first;
- a line whose impression id or candidate list cannot be read has no valid answer (the scorer
  needs both): writing a submission fails naming that line of behaviors.tsv.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

import polars as pl

from newsrec.data import mind, schema
from newsrec.data.artifact import Impressions
from newsrec.errors import ArtifactError, DataError, NewsrecError
from newsrec.eval.metrics import impression_ranks, metrics_from_ranks
from newsrec.utils.io import atomic_file

PREDICTION_TXT = "prediction.txt"
_LINE = re.compile(r"(\S+) \[([^\]\s]*)\]")


def format_line(impression_id: int | str, ranks: np.ndarray) -> str:
    """``"<id> [r1,r2,...]"`` (no spaces inside the brackets)."""
    return f"{_id_text(impression_id)} [{','.join(str(int(r)) for r in ranks)}]"


def _id_text(impression_id: Any) -> str:
    """An impression id as the file writes it (integers without a decimal point)."""
    return impression_id if isinstance(impression_id, str) else str(int(impression_id))


def _parse_line(text: str, line_no: int, source: str, expected_id: str, n_candidates: int) -> np.ndarray:
    """Ranks int64 [n_candidates] of one line; DataError naming ``source:line_no`` otherwise."""
    text = text.rstrip("\r\n")
    match = _LINE.fullmatch(text)
    if match is None:
        if "[" in text and " " in text[text.find("["):]:
            reason = "spaces inside the brackets (the scorer splits lines on whitespace); write [1,3,2]"
        else:
            reason = f"expected 'ImpressionID [r1,r2,...]', got {text[:60]!r}"
        raise DataError(source, reason, line=line_no)
    id_text, ranks_text = match.groups()
    if id_text != expected_id:
        raise DataError(source, f"impression id {id_text}, expected {expected_id} (lines must follow "
                                f"the split's impression order)", line=line_no)
    parts = ranks_text.split(",") if ranks_text else []
    if not all(p.isdigit() for p in parts):
        bad = next(p for p in parts if not p.isdigit())
        raise DataError(source, f"impression {id_text}: rank {bad!r} is not a positive integer", line=line_no)
    ranks = np.array([int(p) for p in parts], dtype=np.int64)
    if len(ranks) != n_candidates:
        raise DataError(source, f"impression {id_text}: {len(ranks)} ranks for {n_candidates} candidates",
                        line=line_no)
    _check_permutation(ranks, source=source, line_no=line_no, impression_id=id_text)
    return ranks


def _check_permutation(ranks: np.ndarray, *, source: str, line_no: int, impression_id: Any) -> None:
    n = len(ranks)
    out_of_range = (ranks < 1) | (ranks > n)
    if out_of_range.any():
        raise DataError(source, f"impression {impression_id}: rank {int(ranks[out_of_range][0])} outside "
                                f"1..{n}", line=line_no)
    seen = np.bincount(ranks, minlength=n + 1)
    if (seen[1:] != 1).any():
        dup = int(np.flatnonzero(seen > 1)[0])
        raise DataError(source, f"impression {impression_id}: rank {dup} appears {int(seen[dup])} times "
                                f"(ranks must be a permutation of 1..{n})", line=line_no)


def validate_lines(lines: Iterable[str], *, impression_ids: np.ndarray, candidate_offsets: np.ndarray,
                   source: str) -> np.ndarray:
    """Check submission lines against a split; return the ranks int64 [M] aligned with its candidates.

    Args:
        lines: the file's lines (with or without line endings).
        impression_ids: [n] ids of the split (int64, or str as written in behaviors.tsv), in file order.
        candidate_offsets: int64 [n + 1] CSR offsets of its candidates.
        source: file name used in error messages.
    Raises:
        DataError naming ``source:line`` and what is wrong, at the first bad line.
    """
    n = len(impression_ids)
    counts = np.diff(candidate_offsets)
    ranks = np.empty(int(candidate_offsets[-1]), dtype=np.int64)
    line_no = 0
    for line_no, text in enumerate(lines, start=1):
        if line_no > n:
            if text.strip() == "":
                continue  # a trailing blank line is harmless to the scorer
            raise DataError(source, f"extra line: the split has only {n} impressions", line=line_no)
        start, end = int(candidate_offsets[line_no - 1]), int(candidate_offsets[line_no])
        ranks[start:end] = _parse_line(text, line_no, source, _id_text(impression_ids[line_no - 1]),
                                       int(counts[line_no - 1]))
    if line_no < n:
        raise DataError(source, f"file ends after {line_no} line(s) but the split has {n} impressions "
                                f"(next expected impression id {_id_text(impression_ids[line_no])})",
                        line=line_no + 1)
    return ranks


def submission_lines(impression_ids: np.ndarray, ranks: np.ndarray, candidate_offsets: np.ndarray
                     ) -> Iterator[str]:
    """The file's lines (without newline), one per impression."""
    for i, impression_id in enumerate(impression_ids):
        yield format_line(impression_id, ranks[candidate_offsets[i]:candidate_offsets[i + 1]])


def write_submission(out: str | Path, *, impression_ids: np.ndarray, scores: np.ndarray,
                     candidate_offsets: np.ndarray) -> np.ndarray:
    """Rank each impression's candidates by score and write ``out`` atomically.

    ``out`` ending in ``.zip`` gets ``prediction.txt`` at its root; any other name is written as
    plain text. The content is validated (line count, ids, permutations) before it is written.
    Scores float [M] aligned with the candidates; returns the ranks int64 [M].
    """
    out = Path(out)
    ranks = impression_ranks(scores, candidate_offsets)
    lines = list(submission_lines(impression_ids, ranks, candidate_offsets))
    validate_lines(lines, impression_ids=impression_ids, candidate_offsets=candidate_offsets,
                   source=f"{out} (before writing)")
    text = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    with atomic_file(out, "wb") as fh:
        if out.suffix.lower() == ".zip":
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(PREDICTION_TXT, text)
        else:
            fh.write(text)
    return ranks


def read_submission_lines(path: str | Path) -> tuple[list[str], str]:
    """Lines of a submission (``.zip`` with ``prediction.txt`` at its root, or a text file) and the
    name to use in messages."""
    path = Path(path)
    if not path.is_file():
        raise NewsrecError(f"{path}: file not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if PREDICTION_TXT not in names:
                nested = [n for n in names if n.endswith("/" + PREDICTION_TXT)]
                hint = f" (found {nested[0]}: it must be at the root of the zip)" if nested else ""
                raise DataError(path, f"no {PREDICTION_TXT} at the root of the zip{hint}")
            raw = archive.read(PREDICTION_TXT)
        source = f"{path}!{PREDICTION_TXT}"
    else:
        raw = path.read_bytes()
        source = str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text.splitlines(), source


# ---------------------------------------------------------------------------------------------
# what a file must answer: every impression line of behaviors.tsv


@dataclass
class Listing:
    """The impression lines a submission answers, in file order (CSR over candidates).

    ``candidates`` int32 [M]: news_idx, 0 where news.tsv lacks the news, and ``rows`` int64 [n]:
    row of behaviors-<split>.parquet, -1 where ingest kept none (artifact listing only);
    ``labels`` int8 [M] when every candidate is labelled (behaviors file only), else None."""

    source: str  # the behaviors file, for messages
    impression_id: np.ndarray  # object (str) [n], as written
    line_no: np.ndarray  # int64 [n]
    candidate_offsets: np.ndarray  # int64 [n + 1]
    candidates: np.ndarray | None
    rows: np.ndarray | None
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.impression_id)


def _make_listing(source: str, *, impression_id: pl.Series, line_no: np.ndarray, counts: np.ndarray,
                  readable: np.ndarray, candidates: np.ndarray | None = None, rows: np.ndarray | None = None,
                  labels: np.ndarray | None = None) -> Listing:
    """A Listing, or DataError naming the first behaviors line whose impression id or candidate
    list cannot be read (``readable`` bool [n])."""
    unreadable = impression_id.is_null().to_numpy() | ~readable
    if unreadable.any():
        first = int(np.argmax(unreadable))
        what = "no impression id" if impression_id[first] is None else (
            f"impression {impression_id[first]}: no candidate list can be read (expected 5 tab-separated "
            f"columns, the last listing news ids)")
        more = int(unreadable.sum()) - 1
        raise DataError(source, f"{what}; a leaderboard file answers every impression line, so this one "
                                f"must be fixed (and the split ingested again)"
                        + (f" ({more} more such line{'s' if more != 1 else ''})" if more else ""),
                        int(line_no[first]))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Listing(source=source, impression_id=np.array(impression_id.to_list(), dtype=object),
                   line_no=np.asarray(line_no, dtype=np.int64), candidate_offsets=offsets,
                   candidates=candidates, rows=rows, labels=labels)


def artifact_listing(dataset: Any, split: str) -> Listing:
    """The artifact's listing of ``split`` (every line of the behaviors.tsv it was ingested from)."""
    source = (dataset.manifest.get("sources", {}).get(split, {}).get("files", {})
              .get("behaviors.tsv", {}).get("path", f"{split} behaviors.tsv"))
    frame = dataset.listing(split)
    counts = frame["candidates"].list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = frame["candidates"].explode().drop_nulls().to_numpy().astype(np.int32)
    return _make_listing(source, impression_id=frame["impression_id"], line_no=frame["line_no"].to_numpy(),
                         counts=counts, readable=frame["candidates"].is_not_null().to_numpy() & (counts > 0),
                         candidates=flat, rows=frame["row"].fill_null(-1).to_numpy().astype(np.int64))


def behaviors_listing(path: str | Path) -> Listing:
    """The listing of a behaviors file read directly: ``path`` is a behaviors.tsv, or a split's
    folder or zip holding one."""
    path = Path(path)
    if path.is_dir() and (path / mind.BEHAVIORS_FILE).is_file():
        path = path / mind.BEHAVIORS_FILE
    if path.is_file() and not zipfile.is_zipfile(path):
        source = mind.SourceFile(container=path.parent, member=None, name=path.name)
    else:
        source = mind.locate_split(path).behaviors
    raw = mind.read_impression_listing(source)
    return _make_listing(source.label, impression_id=raw.frame["impression_id"],
                         line_no=raw.frame["line_no"].to_numpy(), counts=raw.candidate_counts,
                         readable=raw.candidate_counts > 0, labels=raw.labels)


def recorded_behaviors(dataset: Any, split: str) -> Path:
    """The behaviors source ``newsrec ingest`` recorded for ``split``, if it still exists unchanged."""
    src = dataset.manifest.get("sources", {}).get(split)
    if src is None:
        raise ArtifactError(f"{dataset.root}: no '{split}' split recorded (has: "
                            f"{', '.join(dataset.manifest.get('sources', {})) or 'none'})")
    path = Path(src["path"])
    if not path.exists():
        raise NewsrecError(f"{path}: the '{split}' source recorded by ingest no longer exists; pass "
                           f"--behaviors PATH (behaviors.tsv, its folder or zip)")
    return path


@dataclass
class SubmissionCheck:
    """Result of checking a file against a behaviors file."""

    source: str
    impressions: int
    candidates: int
    ranks: np.ndarray  # int64 [M]
    metrics: dict[str, Any] | None  # local metrics when every line is labelled (score = 1/rank)
    behaviors: str = ""  # the behaviors file checked against


def check_submission(path: str | Path, listing: Listing | Impressions) -> SubmissionCheck:
    """Validate ``path`` line by line against the impressions it must answer (a behaviors file's
    ``Listing``, or an artifact split's ``Impressions``): line count, order, ids, one strict
    permutation per line, no spaces in brackets. With labels also the metrics the leaderboard
    scorer would compute (score = 1 / rank)."""
    lines, source = read_submission_lines(path)
    ranks = validate_lines(lines, impression_ids=listing.impression_id,
                           candidate_offsets=listing.candidate_offsets, source=source)
    metrics = None
    if listing.labels is not None:
        metrics = metrics_from_ranks(listing.labels, ranks, listing.candidate_offsets)
    return SubmissionCheck(source=source, impressions=len(listing),
                           candidates=int(listing.candidate_offsets[-1]), ranks=ranks, metrics=metrics,
                           behaviors=getattr(listing, "source", ""))


def check_against_behaviors(path: str | Path, *, behaviors: str | Path | None = None,
                            data_dir: str | Path | None = None, split: str = "test") -> SubmissionCheck:
    """The ``newsrec submit --check`` stage: check ``path`` against the behaviors file ``behaviors``
    (a behaviors.tsv, or its split folder or zip), by default the source of ``split`` that
    ``newsrec ingest`` recorded in ``data_dir``."""
    if behaviors is None:
        if data_dir is None:
            raise NewsrecError("give the behaviors file to check against, or the dataset artifact "
                               "whose ingest recorded it")
        from newsrec.data.artifact import DatasetArtifact

        behaviors = recorded_behaviors(DatasetArtifact(data_dir), split)
    return check_submission(path, behaviors_listing(behaviors))


def listing_scores(listing: Listing, impressions: Impressions, scores: np.ndarray,
                   rowless_scores: np.ndarray | None = None) -> np.ndarray:
    """Scores float32 [M] for every listed candidate: the model's ``scores`` [impressions' M] where
    ingest kept the candidate, ``rowless_scores`` for the known candidates of lines without a row
    (in listing order), and the lowest float32 for news absent from news.tsv (ranked last, in
    listed order)."""
    known = listing.candidates != 0
    line_of = np.repeat(np.arange(len(listing)), np.diff(listing.candidate_offsets))
    rowed = listing.rows[line_of] >= 0
    kept_rows = listing.rows[listing.rows >= 0]
    if (not np.array_equal(kept_rows, np.arange(len(impressions)))
            or not np.array_equal(listing.candidates[known & rowed], impressions.candidates)):
        raise ArtifactError(f"split '{impressions.split}': the listing of impression lines and the "
                            f"behaviors rows disagree; run `newsrec ingest` again")
    out = np.full(len(listing.candidates), np.finfo(np.float32).min, dtype=np.float32)
    out[known & rowed] = scores
    if (known & ~rowed).any():
        if rowless_scores is None:
            raise ValueError("rowless_scores are needed: some lines have no behaviors row")
        out[known & ~rowed] = rowless_scores
    return out


def rowless_impressions(listing: Listing, split: str) -> Impressions:
    """The known candidates of lines without a behaviors row, as impressions of users without
    history (their time unknown)."""
    rowless = np.flatnonzero(listing.rows < 0)
    line_of = np.repeat(np.arange(len(listing)), np.diff(listing.candidate_offsets))
    take = (listing.candidates != 0) & (listing.rows[line_of] < 0)
    counts = np.bincount(line_of[take], minlength=len(listing))[rowless]
    offsets = np.zeros(len(rowless) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Impressions(split, np.arange(len(rowless), dtype=np.int64),
                       np.array([""] * len(rowless), dtype=object),
                       np.full(len(rowless), np.datetime64("NaT"), dtype="datetime64[us]"),
                       np.zeros(0, np.int32), np.zeros(len(rowless) + 1, np.int64),
                       listing.candidates[take].astype(np.int32), offsets, None)


@dataclass
class SubmitResult:
    out: Path
    impressions: int  # lines written: every impression line of behaviors.tsv
    candidates: int
    metrics: dict[str, Any] | None  # local metrics over the impressions ingest kept, when labelled
    missing_news: int = 0  # candidates absent from news.tsv, ranked last
    rowless: int = 0  # lines ingest kept no row for, scored as users without history
    rerank_decision: str | None = None  # with a re-ranker: whether it was used, and why


def submit_listing(dataset: Any, split: str, *, out: str | Path,
                   score: Callable[[Impressions], np.ndarray],
                   score_rowless: Callable[[Impressions], np.ndarray] | None = None) -> SubmitResult:
    """Rank every impression line of ``split``'s behaviors file and write ``out`` (validated, atomic).

    ``score(impressions)`` scores the rows ingest kept; ``score_rowless`` (default ``score``) the
    known candidates of lines ingest kept no row for, as users without history. News absent from
    news.tsv rank last (``listing_scores``). Every writer of a submission goes through here."""
    listing = artifact_listing(dataset, split)
    impressions = dataset.impressions(split)
    scores = score(impressions)
    rowless = rowless_impressions(listing, split)
    rowless_scores = (score_rowless or score)(rowless) if len(rowless.candidates) else None
    all_scores = listing_scores(listing, impressions, scores, rowless_scores)
    ranks = write_submission(out, impression_ids=listing.impression_id, scores=all_scores,
                             candidate_offsets=listing.candidate_offsets)
    metrics = None
    if impressions.labels is not None:
        line_of = np.repeat(np.arange(len(listing)), np.diff(listing.candidate_offsets))
        kept = (listing.candidates != 0) & (listing.rows[line_of] >= 0)
        metrics = metrics_from_ranks(impressions.labels, ranks[kept], impressions.candidate_offsets)
    return SubmitResult(out=Path(out), impressions=len(listing), candidates=int(listing.candidate_offsets[-1]),
                        metrics=metrics, missing_news=int((listing.candidates == 0).sum()),
                        rowless=int((listing.rows < 0).sum()))


def submit(model_dir: str | Path, data_dir: str | Path, *, out: str | Path, split: str = "test",
           reranker: str | Path | None = None, rerank_use: str | None = None, device: str | None = None,
           show_progress: bool = True) -> SubmitResult:
    """The ``newsrec submit`` stage: score every impression line of ``split``'s behaviors file
    (fast path, plus the re-ranker when given and ``rerank_use`` allows, on the rows ingest kept),
    rank, validate and write ``out`` (prediction.zip) atomically."""
    import dataclasses

    from newsrec.eval.evaluate import load_for_inference
    from newsrec.inference.rerank import two_stage_scores
    from newsrec.inference.scoring import score_impressions

    inputs = load_for_inference(model_dir, data_dir, device=device)
    decision: list[str | None] = [None]

    def first_stage(impressions: Impressions) -> np.ndarray:
        return score_impressions(inputs.model, inputs.dataset, impressions, history_len=inputs.history_len,
                                 batch_size=inputs.batch_size, device=inputs.device,
                                 show_progress=show_progress)

    def two_stage(impressions: Impressions) -> np.ndarray:
        scores = first_stage(impressions)
        if reranker is None:
            return scores
        result = two_stage_scores(reranker, retriever_dir=inputs.model_dir, dataset=inputs.dataset,
                                  impressions=impressions, first_stage_scores=scores, use=rerank_use,
                                  device=inputs.device, show_progress=show_progress)
        decision[0] = result.decision
        return result.scores

    result = submit_listing(inputs.dataset, split, out=out, score=two_stage, score_rowless=first_stage)
    return dataclasses.replace(result, rerank_decision=decision[0])
