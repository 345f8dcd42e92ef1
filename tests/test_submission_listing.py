"""A submission answers every impression line of behaviors.tsv, whatever ingest dropped.

The reproduction: a test behaviors.tsv of 4 impressions, one with a candidate missing from
news.tsv, one with a bad time, one holding only a missing news, one plain; ingested with
``--missing-news drop --on-bad-rows skip``.
"""
from __future__ import annotations

import datetime as dt
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import config_from_dict
from newsrec.data.artifact import open_dataset
from newsrec.data.ingest import ingest
from newsrec.errors import DataError
from newsrec.eval.evaluate import load_for_inference
from newsrec.inference.scoring import score_impressions
from newsrec.eval.submission import (PREDICTION_TXT, artifact_listing, behaviors_listing,
                                     check_submission, submit)
from tests.mindfiles import BASE_TIME, behaviors_row, news_row, standard_corpus, write_split

DAY2 = BASE_TIME + dt.timedelta(days=2)
TEST_NEWS = [news_row("N7", title="Brand new zyzzyva story", category="science", subcategory="space"),
             news_row("N9", title="Unseen words only", category="lifestyle", subcategory="travel")]
TEST_BEHAVIORS = [
    behaviors_row(20, "U4", ["N7"], ["N9", "N404", "N7"], when=DAY2),  # N404: not in news.tsv
    behaviors_row(21, "U1", ["N1"], ["N7", "N9", "N2"], when="not a time"),  # skipped as a bad row
    behaviors_row(22, "U2", ["N1"], ["N405"], when=DAY2),  # only a missing news: no row left
    behaviors_row(23, "U1", ["N1", "N5"], ["N9", "N1"], when=DAY2),
]
WANT_IDS = ["20", "21", "22", "23"]
WANT_COUNTS = [3, 3, 1, 2]


def _config():
    return config_from_dict({"data": {"title_len": 8, "missing_news": "drop", "on_bad_rows": "skip"},
                             "model": {"embedding_dim": 16, "hidden_size": 16, "num_heads": 2,
                                       "pooling_hidden": 8}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from newsrec.inference.model_io import build_model, save_model

    root = tmp_path_factory.mktemp("repro")
    paths = standard_corpus(root)
    test_dir = write_split(root / "test4", news=TEST_NEWS, behaviors=TEST_BEHAVIORS)
    config = _config()
    ingest(config, train=paths["train"], dev=paths["dev"], test=test_dir, out_dir=root / "data")
    dataset = open_dataset(root / "data")
    torch.manual_seed(0)
    model_dir = save_model(root / "model", build_model(config, dataset), config, dataset=dataset)
    return root, test_dir, dataset, model_dir


def _lines(path):
    with zipfile.ZipFile(path) as archive:
        return archive.read(PREDICTION_TXT).decode().splitlines()


def test_ingest_lists_every_impression_line(setup):
    _, test_dir, dataset, _ = setup
    assert len(dataset.impressions("test")) == 2  # what ingest kept: 20 and 23
    listing = artifact_listing(dataset, "test")
    assert list(listing.impression_id) == WANT_IDS
    assert list(listing.line_no) == [1, 2, 3, 4]
    assert list(listing.rows) == [0, -1, -1, 1]
    assert list(np.diff(listing.candidate_offsets)) == WANT_COUNTS
    ids = dataset.news_id_to_idx
    assert list(listing.candidates) == [ids["N9"], 0, ids["N7"], ids["N7"], ids["N9"], ids["N2"], 0,
                                        ids["N9"], ids["N1"]]
    raw = behaviors_listing(test_dir)  # the same lines read straight from the file
    assert list(raw.impression_id) == WANT_IDS and list(raw.candidate_offsets) == list(listing.candidate_offsets)


def test_submission_answers_every_line_and_ranks_missing_news_last(setup, tmp_path):
    _, test_dir, dataset, model_dir = setup
    out = tmp_path / "prediction.zip"
    result = submit(model_dir, dataset.root, out=out, split="test", show_progress=False)
    assert (result.impressions, result.missing_news, result.rowless) == (4, 2, 2)
    lines = _lines(out)
    assert [line.split(" ")[0] for line in lines] == WANT_IDS
    ranks = [[int(r) for r in line.split(" ")[1].strip("[]").split(",")] for line in lines]
    assert [len(r) for r in ranks] == WANT_COUNTS
    assert all(sorted(r) == list(range(1, len(r) + 1)) for r in ranks)
    assert ranks[0][1] == 3 and ranks[2] == [1]  # N404 after both known news; N405 alone
    # the kept rows are ranked by the model's scores (independent call on the artifact's rows)
    inputs = load_for_inference(model_dir, dataset.root)
    imps = dataset.impressions("test")
    scores = score_impressions(inputs.model, dataset, imps, history_len=inputs.history_len,
                               show_progress=False)
    assert (ranks[0][0] < ranks[0][2]) == (scores[0] >= scores[1])  # ties: listed order
    assert (ranks[3][0] < ranks[3][1]) == (scores[2] >= scores[3])
    # the skipped line (bad time) is scored as a user without history: N7, N9, N2 all known
    empty_user = inputs.model.encode_user(torch.zeros(1, 1, inputs.model.news_dim),
                                          torch.zeros(1, 1, dtype=torch.bool))
    from newsrec.inference.scoring import encode_all_news
    vectors = encode_all_news(inputs.model, dataset, show_progress=False)
    ids = dataset.news_id_to_idx
    with torch.no_grad():
        cold = inputs.model.score(empty_user, vectors[[ids["N7"], ids["N9"], ids["N2"]]].unsqueeze(0))[0]
    assert ranks[1] == list(np.argsort(np.argsort(-cold.numpy(), kind="stable")) + 1)
    # and the file passes the check against the behaviors file itself
    check = check_submission(out, behaviors_listing(test_dir))
    assert check.impressions == 4 and check.candidates == sum(WANT_COUNTS)


def test_check_against_behaviors_rejects_the_old_reduced_file(setup, tmp_path):
    """The file the old code wrote (the kept rows only, one with 2 ranks for 3 candidates)."""
    root, test_dir, dataset, _ = setup
    old = tmp_path / "prediction.zip"
    with zipfile.ZipFile(old, "w") as archive:
        archive.writestr(PREDICTION_TXT, "20 [1,2]\n23 [2,1]\n")
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "--check", str(old), "--data", str(dataset.root)])
    assert result.exit_code == 1
    assert "prediction.txt:1: impression 20: 2 ranks for 3 candidates" in result.output
    good = tmp_path / "good.txt"
    good.write_text("20 [1,2,3]\n21 [3,1,2]\n22 [1]\n23 [2,1]\n")
    for args in (["--data", str(dataset.root)], ["--behaviors", str(test_dir / "behaviors.tsv")],
                 ["--behaviors", str(test_dir)]):
        ok = runner.invoke(main, ["submit", "--check", str(good), *args])
        assert ok.exit_code == 0, ok.output
        assert "valid (4 impressions, 9 candidates" in ok.output
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("20 [1, 2, 3]\n")
    bad = runner.invoke(main, ["submit", "--check", str(spaced), "--behaviors", str(test_dir)])
    assert bad.exit_code == 1 and "spaces inside the brackets" in bad.output
    short = tmp_path / "short.txt"
    short.write_text("20 [1,2,3]\n21 [3,1,2]\n22 [1]\n")
    bad = runner.invoke(main, ["submit", "--check", str(short), "--behaviors", str(test_dir)])
    assert bad.exit_code == 1 and "short.txt:4: file ends after 3 line(s)" in bad.output


def test_check_needs_the_recorded_source_to_exist(setup, tmp_path):
    root, _, dataset, _ = setup
    import shutil
    data_copy = tmp_path / "data"
    shutil.copytree(dataset.root, data_copy)
    manifest = (data_copy / "manifest.json").read_text().replace(str(root / "test4"), str(tmp_path / "gone"))
    (data_copy / "manifest.json").write_text(manifest)
    (tmp_path / "p.txt").write_text("20 [1,2,3]\n")
    result = CliRunner().invoke(main, ["submit", "--check", str(tmp_path / "p.txt"), "--data", str(data_copy)])
    assert result.exit_code == 1
    assert "no longer exists; pass --behaviors PATH" in result.output


def test_unreadable_candidate_list_fails_naming_the_line(tmp_path):
    rows = [behaviors_row(30, "U1", [], ["N7"], when=DAY2), "31\tU2\tbroken line"]
    folder = write_split(tmp_path / "t", news=TEST_NEWS, behaviors=rows)
    with pytest.raises(DataError, match=r"behaviors.tsv:2: impression 31: no candidate list can be read"):
        behaviors_listing(folder)


def test_raw_listing_chunks_and_labels(tmp_path):
    from newsrec.data import mind
    from newsrec.eval.metrics import compute_metrics

    rows = [behaviors_row(40 + i, "U1", ["N1"], [(f"N{j}", int(j == i % 3)) for j in range(1, 4 + i % 2)],
                          when=DAY2) for i in range(7)]
    folder = write_split(tmp_path / "d", news=TEST_NEWS, behaviors=rows[:3] + [""] + rows[3:])
    lines = mind.read_lines(mind.locate_split(folder).behaviors).frame
    whole, chunked = mind.impression_listing(lines), mind.impression_listing(lines, chunk_rows=2)
    assert whole.frame.equals(chunked.frame) and list(whole.frame["line_no"]) == [1, 2, 3, 5, 6, 7, 8]
    np.testing.assert_array_equal(whole.candidate_counts, chunked.candidate_counts)
    np.testing.assert_array_equal(whole.labels, chunked.labels)
    assert whole.candidate_ids.to_strings().to_list() == chunked.candidate_ids.to_strings().to_list()
    listing = behaviors_listing(folder)
    assert list(listing.impression_id) == [str(40 + i) for i in range(7)]  # the blank line holds none
    want_labels = np.concatenate([[int(j == i % 3) for j in range(1, 4 + i % 2)] for i in range(7)])
    np.testing.assert_array_equal(listing.labels, want_labels)
    ranks = np.concatenate([np.arange(1, 4 + i % 2)[::-1] for i in range(7)])
    text = "".join(f"{40 + i} [{','.join(map(str, np.arange(1, 4 + i % 2)[::-1]))}]\n" for i in range(7))
    (tmp_path / "p.txt").write_text(text)
    check = check_submission(tmp_path / "p.txt", listing)
    assert check.metrics == compute_metrics(want_labels, 1.0 / ranks, listing.candidate_offsets)


def test_an_artifact_without_the_listing_says_to_ingest_again(setup, tmp_path):
    import shutil

    from newsrec.errors import ArtifactError

    _, _, dataset, model_dir = setup
    old = tmp_path / "old"
    shutil.copytree(dataset.root, old)
    (old / "submission-test.parquet").unlink()
    with pytest.raises(ArtifactError, match=r"no submission-test.parquet .*run `newsrec ingest` again"):
        submit(model_dir, old, out=tmp_path / "p.zip", split="test", show_progress=False)
    assert not (tmp_path / "p.zip").exists()
