"""Leaderboard submission: writer and checker round trip; every malformed line is named."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from newsrec.data.artifact import Impressions
from newsrec.errors import DataError
from newsrec.eval.metrics import compute_metrics
from newsrec.eval.submission import (PREDICTION_TXT, check_submission, format_line, validate_lines,
                                     write_submission)


def _split(labelled=True):
    ids = np.array([101, 7, 55], dtype=np.int64)
    offsets = np.array([0, 3, 5, 9], dtype=np.int64)
    candidates = np.arange(1, 10, dtype=np.int32)
    labels = np.array([0, 1, 0, 1, 0, 0, 0, 1, 1], dtype=np.int8) if labelled else None
    return Impressions("dev", ids, np.array(["U1", "U2", "U1"], dtype=object),
                       np.zeros(3, dtype="datetime64[us]"), np.zeros(0, np.int32),
                       np.zeros(4, np.int64), candidates, offsets, labels)


SCORES = np.array([0.2, 0.9, 0.1, 0.5, 0.7, 0.3, 0.3, 0.8, 0.1], dtype=np.float32)


def test_format_has_no_spaces():
    assert format_line(42, np.array([2, 1, 3])) == "42 [2,1,3]"


@pytest.mark.parametrize("name", ["prediction.zip", "prediction.txt"])
def test_round_trip_zip_and_txt(tmp_path, name):
    imps = _split()
    out = tmp_path / name
    ranks = write_submission(out, impression_ids=imps.impression_id, scores=SCORES,
                             candidate_offsets=imps.candidate_offsets)
    np.testing.assert_array_equal(ranks, [2, 1, 3, 2, 1, 2, 3, 1, 4])  # tie 0.3/0.3: listed order
    if name.endswith(".zip"):
        with zipfile.ZipFile(out) as archive:
            assert archive.namelist() == [PREDICTION_TXT]
            text = archive.read(PREDICTION_TXT).decode()
    else:
        text = out.read_text()
    assert text == "101 [2,1,3]\n7 [2,1]\n55 [2,3,1,4]\n"
    check = check_submission(out, imps)
    np.testing.assert_array_equal(check.ranks, ranks)
    # local metrics as the scorer computes them (score = 1/rank)
    want = compute_metrics(imps.labels, 1.0 / ranks, imps.candidate_offsets)
    assert check.metrics == want
    assert check.metrics["auc"] == pytest.approx(np.mean([1.0, 0.0, 0.5]))
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left behind


def test_unlabelled_split_has_no_metrics(tmp_path):
    imps = _split(labelled=False)
    out = tmp_path / "p.zip"
    write_submission(out, impression_ids=imps.impression_id, scores=SCORES,
                     candidate_offsets=imps.candidate_offsets)
    assert check_submission(out, imps).metrics is None


def _check_text(tmp_path, text):
    path = tmp_path / "prediction.txt"
    path.write_text(text)
    return check_submission(path, _split())


@pytest.mark.parametrize("text, line, message", [
    ("101 [2, 1, 3]\n7 [2,1]\n55 [2,3,1,4]\n", 1, "spaces inside the brackets"),
    ("101 [2,1,3]\n7 [1,1]\n55 [2,3,1,4]\n", 2, "rank 1 appears 2 times"),
    ("101 [2,1,3]\n7 [2,1]\n56 [2,3,1,4]\n", 3, "impression id 56, expected 55"),
    ("7 [2,1]\n101 [2,1,3]\n55 [2,3,1,4]\n", 1, "impression id 7, expected 101"),
    ("101 [2,1,3]\n7 [2,1]\n", 3, "file ends after 2 line(s)"),
    ("101 [2,1,3]\n7 [2,1,3]\n55 [2,3,1,4]\n", 2, "3 ranks for 2 candidates"),
    ("101 [2,1,3]\n7 [0,1]\n55 [2,3,1,4]\n", 2, "rank 0 outside 1..2"),
    ("101 [2,1,4]\n7 [2,1]\n55 [2,3,1,4]\n", 1, "rank 4 outside 1..3"),
    ("101 [2,1,3]\n7 [2,-1]\n55 [2,3,1,4]\n", 2, "not a positive integer"),
    ("101 [2,1,3]\n7 [2,1]\n55 [2,3,1,4]\n9 [1]\n", 4, "extra line"),
    ("101 2,1,3\n7 [2,1]\n55 [2,3,1,4]\n", 1, "expected 'ImpressionID [r1,r2,...]'"),
])
def test_bad_files_name_the_line(tmp_path, text, line, message):
    with pytest.raises(DataError) as info:
        _check_text(tmp_path, text)
    assert info.value.line == line
    assert message in str(info.value)
    assert f"prediction.txt:{line}:" in str(info.value)


def test_rank_zero_is_rejected_as_out_of_range():
    with pytest.raises(DataError, match="rank 0 outside 1..2"):
        validate_lines(["1 [0,2]"], impression_ids=np.array([1]), candidate_offsets=np.array([0, 2]),
                       source="x")


def test_crlf_and_trailing_blank_line_are_accepted(tmp_path):
    check = _check_text(tmp_path, "101 [2,1,3]\r\n7 [2,1]\r\n55 [2,3,1,4]\r\n\n")
    np.testing.assert_array_equal(check.ranks, [2, 1, 3, 2, 1, 2, 3, 1, 4])


def test_zip_without_root_prediction_txt(tmp_path):
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("sub/prediction.txt", "101 [2,1,3]\n")
    with pytest.raises(DataError, match="at the root of the zip"):
        check_submission(path, _split())
