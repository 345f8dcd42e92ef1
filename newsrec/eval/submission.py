"""MIND leaderboard submissions: write and check ``prediction.zip``.

Format (the leaderboard scorer's rules): ``prediction.txt`` at the root of the zip; one line per
impression of the split, in the split file's order::

    ImpressionID [r1,r2,...,rn]

with no spaces inside the brackets (the scorer splits each line on whitespace), where r_i is the
1-based rank of the i-th candidate as listed in behaviors.tsv and the ranks are a strict permutation
of 1..n. Everything is validated before a file is written; ``check_submission`` validates an existing
file and names the first bad line.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from newsrec.errors import DataError, NewsrecError
from newsrec.eval.metrics import impression_ranks, metrics_from_ranks
from newsrec.utils.io import atomic_file

PREDICTION_TXT = "prediction.txt"
_LINE = re.compile(r"(\S+) \[([^\]\s]*)\]")


def format_line(impression_id: int, ranks: np.ndarray) -> str:
    """``"<id> [r1,r2,...]"`` (no spaces inside the brackets)."""
    return f"{int(impression_id)} [{','.join(str(int(r)) for r in ranks)}]"


def _parse_line(text: str, line_no: int, source: str, expected_id: int, n_candidates: int) -> np.ndarray:
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
    if id_text != str(expected_id):
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
        impression_ids: int64 [n] of the split, in file order.
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
        ranks[start:end] = _parse_line(text, line_no, source, int(impression_ids[line_no - 1]),
                                       int(counts[line_no - 1]))
    if line_no < n:
        raise DataError(source, f"file ends after {line_no} line(s) but the split has {n} impressions "
                                f"(next expected impression id {int(impression_ids[line_no])})",
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


@dataclass
class SubmissionCheck:
    """Result of checking a file against a split."""

    source: str
    impressions: int
    candidates: int
    ranks: np.ndarray  # int64 [M]
    metrics: dict[str, Any] | None  # local metrics when the split is labelled (score = 1/rank)


def check_submission(path: str | Path, impressions: Any) -> SubmissionCheck:
    """Validate ``path`` against an ``Impressions`` split; on a labelled split also compute the
    metrics the leaderboard scorer would (score = 1 / rank)."""
    lines, source = read_submission_lines(path)
    ranks = validate_lines(lines, impression_ids=impressions.impression_id,
                           candidate_offsets=impressions.candidate_offsets, source=source)
    metrics = None
    if impressions.labels is not None:
        metrics = metrics_from_ranks(impressions.labels, ranks, impressions.candidate_offsets)
    return SubmissionCheck(source=source, impressions=len(impressions),
                           candidates=int(impressions.candidate_offsets[-1]), ranks=ranks,
                           metrics=metrics)


@dataclass
class SubmitResult:
    out: Path
    impressions: int
    candidates: int
    metrics: dict[str, Any] | None  # local metrics from the ranks when the split is labelled
    rerank_decision: str | None = None  # with a re-ranker: whether it was used, and why


def submit(model_dir: str | Path, data_dir: str | Path, *, out: str | Path, split: str = "test",
           reranker: str | Path | None = None, rerank_use: str | None = None, device: str | None = None,
           show_progress: bool = True) -> SubmitResult:
    """The ``newsrec submit`` stage: score every impression of ``split`` (fast path, plus the
    re-ranker when given and ``rerank_use`` allows), rank, validate and write ``out``
    (prediction.zip) atomically."""
    from newsrec.eval.evaluate import load_for_inference, rerank_scores, score_impressions

    inputs = load_for_inference(model_dir, data_dir, device=device)
    impressions = inputs.dataset.impressions(split)
    scores = score_impressions(inputs.model, inputs.dataset, impressions, history_len=inputs.history_len,
                               batch_size=inputs.batch_size, device=inputs.device,
                               show_progress=show_progress)
    decision = None
    if reranker is not None:
        two_stage = rerank_scores(reranker, inputs, impressions, scores, use=rerank_use,
                                  show_progress=show_progress)
        scores, decision = two_stage.scores, two_stage.decision
    ranks = write_submission(out, impression_ids=impressions.impression_id, scores=scores,
                             candidate_offsets=impressions.candidate_offsets)
    metrics = None
    if impressions.labels is not None:
        metrics = metrics_from_ranks(impressions.labels, ranks, impressions.candidate_offsets)
    return SubmitResult(out=Path(out), impressions=len(impressions),
                        candidates=int(impressions.candidate_offsets[-1]), metrics=metrics,
                        rerank_decision=decision)
