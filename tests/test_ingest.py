"""The ingest stage: artifact contents against the known corpus, bad input, skip/drop policies, CLI."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import Config, config_from_dict
from newsrec.data import schema
from newsrec.data.artifact import open_dataset
from newsrec.data.ingest import ingest
from newsrec.errors import DataError
from tests.mindfiles import BASE_TIME, behaviors_row, news_row, standard_corpus, write_split

GOOD_NEWS = [news_row(f"N{i}", title=f"title number {i}") for i in range(1, 6)]
GOOD = [behaviors_row(1, "U1", ["N1"], [("N2", 1), ("N3", 0)]),
        behaviors_row(2, "U2", [], [("N4", 0), ("N5", 1)]),
        behaviors_row(3, "U3", ["N2", "N3"], [("N1", 1), ("N4", 0)]),
        behaviors_row(4, "U1", ["N1", "N4"], [("N5", 0), ("N2", 1)])]


def _cfg(**data) -> Config:
    return config_from_dict({"data": data}) if data else Config()


def _left_over(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out"))


# --------------------------------------------------------------------------------------------
# the artifact


@pytest.fixture(scope="module")
def corpus_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paths = standard_corpus(root / "raw", as_zip=True, subfolder="MINDsynth_x")
    result = ingest(_cfg(title_len=4), train=paths["train"], dev=paths["dev"], test=paths["test"],
                    out_dir=root / "out")
    return result, open_dataset(root / "out")


def test_news_union_first_definition_wins(corpus_artifact):
    _, ds = corpus_artifact
    news = ds.news
    assert news["news_id"].to_list() == [f"N{i}" for i in range(1, 10)]
    assert news["news_idx"].to_list() == list(range(1, 10))
    n4 = news.row(3, named=True)
    assert n4["title"] == "Weather: rain again" and n4["category"] == "weather"
    assert n4["splits"] == ["train", "dev"]
    assert news.row(6, named=True)["splits"] == ["dev", "test"]
    assert ds.n_news == 9 and ds.title_tokens.shape == (10, 4)
    assert ds.news_id_to_idx["N7"] == 7 and ds.news_idx_to_id[9] == "N9"


def test_vocabulary_from_train_titles_only(corpus_artifact):
    _, ds = corpus_artifact
    vocab = ds.vocab
    assert vocab[:2] == ["<pad>", "<unk>"]
    train_titles = ["Stocks rise, markets cheer!", 'The "big" game tonight', "Stocks fall",
                    "Weather: rain again", "Game recap", "Cooking with rain water"]
    expected = set()
    for t in train_titles:
        expected |= set(t.lower().replace(",", " , ").replace("!", " ! ").replace('"', " ")
                        .replace(":", " ").split())
    assert set(vocab[2:]) == expected
    assert "zyzzyva" not in vocab and "redefinition" not in vocab
    word = {w: i for i, w in enumerate(vocab)}
    # N1 "Stocks rise, markets cheer!" truncated to title_len=4 (first words kept)
    assert ds.title_tokens[1].tolist() == [word["stocks"], word["rise"], word[","], word["markets"]]
    # N7 "Brand new zyzzyva story": all unseen in train -> <unk>
    assert ds.title_tokens[7].tolist() == [1, 1, 1, 1]
    # N5 "Game recap": padded
    assert ds.title_tokens[5].tolist() == [word["game"], word["recap"], 0, 0]
    assert ds.title_tokens[0].tolist() == [0, 0, 0, 0]
    # most frequent first: "stocks" and "rain" (2x) come before once-seen words
    assert set(vocab[2:5]) >= {"stocks", "rain"} or set(vocab[2:5]) >= {"stocks", "game"}


def test_categories_from_train_news(corpus_artifact):
    _, ds = corpus_artifact
    cats = ds.categories
    assert cats["category"] == ["<unk>", "finance", "food", "sports", "weather"]
    cat, sub = ds.news_categories
    assert cat[1] == cats["category"].index("finance")
    assert cat[7] == 0  # "science" only appears in dev/test
    assert sub[0] == 0 and sub[5] == cats["subcategory"].index("nba")


def test_impressions_round_trip_as_csr(corpus_artifact):
    _, ds = corpus_artifact
    idx = ds.news_id_to_idx
    train = ds.impressions("train")
    assert train.impression_id.tolist() == [1, 2, 3]
    assert train.user_id.tolist() == ["U1", "U2", "U1"]
    assert train.history.tolist() == [idx[n] for n in ["N1", "N2", "N1", "N2", "N3"]]
    assert train.history_offsets.tolist() == [0, 2, 2, 5]
    assert train.candidates.tolist() == [idx[n] for n in ["N3", "N4", "N5", "N1", "N2", "N6", "N5", "N3"]]
    assert train.candidate_offsets.tolist() == [0, 3, 5, 8]
    assert train.labels.tolist() == [1, 0, 0, 0, 1, 0, 1, 1]
    assert train.history_of(2, max_len=2).tolist() == [idx["N2"], idx["N3"]]  # most recent kept
    assert train.time[2] == np.datetime64(BASE_TIME - dt.timedelta(hours=1), "us")
    dev = ds.impressions("dev")
    assert dev.labels.tolist() == [1, 0, 0, 1, 0]
    test = ds.impressions("test")
    assert test.labels is None and not test.has_labels
    assert test.candidates.tolist() == [idx["N9"], idx["N7"], idx["N9"]]
    assert ds.splits == ["train", "dev", "test"]


def test_news_statistics(corpus_artifact):
    _, ds = corpus_artifact
    news = {r["news_id"]: r for r in ds.news.iter_rows(named=True)}
    assert news["N3"]["train_impressions"] == 2 and news["N3"]["train_clicks"] == 2
    assert news["N5"]["train_impressions"] == 2 and news["N5"]["train_clicks"] == 1
    assert news["N1"]["train_history_clicks"] == 2 and news["N3"]["train_history_clicks"] == 1
    assert news["N7"]["train_impressions"] == 0
    assert news["N3"]["first_seen"] == BASE_TIME - dt.timedelta(hours=1)
    assert news["N8"]["first_seen"] == BASE_TIME + dt.timedelta(days=1)
    assert news["N9"]["first_seen"] == BASE_TIME + dt.timedelta(days=2)
    assert news["N1"]["title_entities"] == ["Q1"]
    assert news["N1"]["title_entity_confidence"] == pytest.approx([0.9])
    assert news["N3"]["abstract_entities"] == ["Q2", "Q1"]


def test_news_statistics_count_kept_impressions_only(tmp_path):
    # impression 5 loses its only candidate under --missing-news drop: its history counts nowhere;
    # N6 is in no impression: zero counts, no first_seen
    rows = GOOD + [behaviors_row(5, "U5", ["N1", "N4"], [("N404", 1)], when=BASE_TIME - dt.timedelta(days=1))]
    write_split(tmp_path / "train", news=GOOD_NEWS + [news_row("N6")], behaviors=rows)
    ingest(_cfg(missing_news="drop"), train=tmp_path / "train", out_dir=tmp_path / "out")
    news = {r["news_id"]: r for r in open_dataset(tmp_path / "out").news.iter_rows(named=True)}
    counts = {n: (r["train_impressions"], r["train_clicks"], r["train_history_clicks"])
              for n, r in news.items()}
    assert counts == {"N1": (1, 1, 2), "N2": (2, 2, 1), "N3": (1, 0, 1), "N4": (2, 0, 1), "N5": (2, 1, 0),
                      "N6": (0, 0, 0)}
    assert all(news[f"N{i}"]["first_seen"] == BASE_TIME for i in range(1, 6))
    assert news["N6"]["first_seen"] is None


def test_entities_and_manifest(corpus_artifact):
    result, ds = corpus_artifact
    ids = json.loads((ds.root / schema.ENTITIES).read_text())["ids"]
    vectors = np.load(ds.root / schema.ENTITY_VECTORS)
    assert ids == ["", "Q1", "Q2"]
    np.testing.assert_allclose(vectors, [[0, 0, 0], [0.1, 0.2, 0.3], [-1.0, 0.0, 1.5]], atol=1e-6)
    m = ds.manifest
    assert m["schema_version"] == schema.SCHEMA_VERSION
    assert m["vocab_size"] == len(ds.vocab)
    assert m["splits"]["train"]["impressions"] == 3 and m["splits"]["train"]["clicks"] == 4
    assert m["splits"]["train"]["history_len_median"] == 2.0
    assert m["splits"]["test"]["clicks"] is None and m["splits"]["test"]["labelled"] is False
    assert m["options"]["title_len"] == 4 and m["options"]["on_bad_rows"] == "error"
    assert m["sources"]["train"]["kind"] == "zip" and len(m["sources"]["train"]["sha256"]) == 64
    assert len(m["sources"]["train"]["files"]["behaviors.tsv"]["sha256"]) == 64
    assert m["missing_news"] == {"ids": 0, "references": 0, "impressions_dropped": 0}
    assert any("wall time" in line for line in result.summary_lines())


def test_zip_folder_and_windows_files_give_the_same_artifact(tmp_path):
    outs = []
    for name, kwargs in (("zip", dict(as_zip=True)), ("folder", {}),
                         ("windows", dict(bom=True, crlf=True, subfolder="sub"))):
        paths = standard_corpus(tmp_path / name, **kwargs)
        ingest(Config(), train=paths["train"], dev=paths["dev"], test=paths["test"],
               out_dir=tmp_path / f"out-{name}")
        outs.append(open_dataset(tmp_path / f"out-{name}"))
    for other in outs[1:]:
        assert other.news.equals(outs[0].news)
        assert other.vocab == outs[0].vocab
        assert np.array_equal(other.title_tokens, outs[0].title_tokens)
        for split in ("train", "dev", "test"):
            assert other.behaviors(split).equals(outs[0].behaviors(split))


# --------------------------------------------------------------------------------------------
# bad input: one line naming file and line, no output left behind

BAD_CASES = {
    "columns": (GOOD[:2] + ["3\tU3\t11/15/2019 8:55:22 AM\tN1"] + GOOD[3:], 3, "expected 5 tab-separated columns"),
    "label": (GOOD[:2] + [behaviors_row(3, "U3", [], [("N1", 1), ("N2", 2)])], 3, "expected 0 or 1"),
    "duplicate": (GOOD[:3] + [behaviors_row(2, "U9", [], [("N1", 1)])], 4, "duplicate ImpressionID 2 (first on line 2)"),
    "user": (GOOD[:1] + [behaviors_row(2, "", ["N1"], [("N1", 1)])] + GOOD[2:], 2, "empty UserID"),
    "time": (GOOD[:2] + [behaviors_row(3, "U3", [], [("N1", 1)], when="2019-11-15 08:55:22")], 3,
             "expected MM/DD/YYYY HH:MM:SS AM/PM"),
    "no_candidates": (GOOD[:1] + [behaviors_row(2, "U2", ["N1"], [])] + GOOD[2:], 2, "no candidates"),
    "mixed": (GOOD[:3] + [behaviors_row(4, "U4", ["N1"], ["N2", "N3"])], 4, "has no label"),
    "impression_id": (GOOD[:1] + [behaviors_row("x2", "U2", [], [("N1", 1)])] + GOOD[2:], 2, "not an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_behaviors_fail_with_file_and_line(tmp_path, case):
    rows, line, phrase = BAD_CASES[case]
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=rows)
    with pytest.raises(DataError) as err:
        ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    assert err.value.path.endswith("behaviors.tsv")
    assert err.value.line == line, str(err.value)
    assert phrase in str(err.value)
    assert f"behaviors.tsv:{line}:" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and _left_over(tmp_path) == []


def test_mixed_labels_across_lines_first_unlabelled(tmp_path):
    rows = [behaviors_row(1, "U1", [], ["N1", "N2"]), behaviors_row(2, "U2", [], ["N3", ("N4", 1)])]
    write_split(tmp_path / "test", news=GOOD_NEWS, behaviors=rows)
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=GOOD)
    with pytest.raises(DataError) as err:
        ingest(Config(), train=tmp_path / "train", test=tmp_path / "test", out_dir=tmp_path / "out")
    assert err.value.line == 2 and "is labelled" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_truncated_last_line(tmp_path):
    raw = ("\n".join(GOOD) + "\n" + "5\tU5\t11/15/2019 8:5").encode()
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=[], raw_behaviors=raw)
    with pytest.raises(DataError) as err:
        ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    assert err.value.line == 5 and "truncated last line" in str(err.value)
    assert not (tmp_path / "out").exists() and _left_over(tmp_path) == []


def test_non_utf8_bytes(tmp_path):
    raw = ("\n".join(GOOD[:2]) + "\n").encode() + b"3\tU\xe93\t11/15/2019 8:55:22 AM\t\tN1-1\n"
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=[], raw_behaviors=raw)
    with pytest.raises(DataError) as err:
        ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    assert err.value.line == 3 and "not valid UTF-8" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["news", "behaviors"])
def test_empty_file(tmp_path, which):
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=GOOD,
                **{f"raw_{which}": b"\xef\xbb\xbf\r\n"})
    with pytest.raises(DataError, match=rf"{which}.tsv: empty file"):
        ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_news_row_and_entity_json(tmp_path):
    news = GOOD_NEWS[:2] + ["N3\tnews\tsub\ttitle only"] + GOOD_NEWS[3:]
    write_split(tmp_path / "train", news=news, behaviors=GOOD)
    with pytest.raises(DataError) as err:
        ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    assert err.value.path.endswith("news.tsv") and err.value.line == 3
    assert "expected 8 tab-separated columns" in str(err.value)
    news = GOOD_NEWS[:3] + [GOOD_NEWS[3].rsplit("\t", 1)[0] + "\t[{broken"] + GOOD_NEWS[4:]
    write_split(tmp_path / "train2", news=news, behaviors=GOOD)
    with pytest.raises(DataError) as err:
        ingest(Config(), train=tmp_path / "train2", out_dir=tmp_path / "out")
    assert err.value.line == 4 and "AbstractEntities is not a JSON list" in str(err.value)


def test_failed_ingest_keeps_an_existing_artifact(tmp_path):
    write_split(tmp_path / "good", news=GOOD_NEWS, behaviors=GOOD)
    ingest(Config(), train=tmp_path / "good", out_dir=tmp_path / "out")
    before = (tmp_path / "out" / schema.MANIFEST).read_text()
    write_split(tmp_path / "bad", news=GOOD_NEWS, behaviors=BAD_CASES["label"][0])
    with pytest.raises(DataError):
        ingest(Config(), train=tmp_path / "bad", out_dir=tmp_path / "out")
    assert (tmp_path / "out" / schema.MANIFEST).read_text() == before
    assert _left_over(tmp_path) == []


def test_skip_bad_rows_counts_each_reason(tmp_path):
    rows = GOOD + [
        "5\tU3\t11/15/2019 8:55:22 AM\tN1",  # columns
        behaviors_row(6, "U3", [], [("N1", 1), ("N2", 2)]),  # label
        behaviors_row(7, "", ["N1"], [("N1", 1)]),  # user_id
        behaviors_row(8, "U3", [], [("N1", 1)], when="2019-11-15 08:55:22"),  # time
        behaviors_row(9, "U2", ["N1"], []),  # no candidates
        behaviors_row("x2", "U2", [], [("N1", 1)]),  # impression id
        behaviors_row(1, "U7", [], [("N1", 1)]),  # duplicate of impression 1
    ]
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=rows)
    result = ingest(_cfg(on_bad_rows="skip"), train=tmp_path / "train", out_dir=tmp_path / "out")
    ds = open_dataset(tmp_path / "out")
    assert ds.impressions("train").impression_id.tolist() == [1, 2, 3, 4]
    assert result.manifest["skipped_rows"]["train/behaviors"] == {
        "columns": 1, "label": 1, "user_id": 1, "time": 1, "no_candidates": 1, "impression_id": 1,
        "duplicate_impression_id": 1}
    assert ds.manifest["options"]["on_bad_rows"] == "skip"


# --------------------------------------------------------------------------------------------
# missing news


def test_missing_news_error_counts_and_names_them(tmp_path):
    rows = GOOD + [behaviors_row(5, "U5", ["N404", "N1"], [("N405", 1), ("N2", 0)]),
                   behaviors_row(6, "U6", ["N404"], [("N406", 1)])]
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=rows)
    with pytest.raises(DataError) as err:
        ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    msg = str(err.value)
    assert err.value.line == 5 and "3 news id(s) referenced 4 times" in msg
    assert "N404" in msg and "N405" in msg and "--missing-news drop" in msg
    assert not (tmp_path / "out").exists()


def test_missing_news_drop_records_counts(tmp_path):
    rows = GOOD + [behaviors_row(5, "U5", ["N404", "N1"], [("N405", 1), ("N2", 0)]),
                   behaviors_row(6, "U6", ["N404"], [("N406", 1)])]
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=rows)
    result = ingest(_cfg(missing_news="drop"), train=tmp_path / "train", out_dir=tmp_path / "out")
    ds = open_dataset(tmp_path / "out")
    train = ds.impressions("train")
    assert train.impression_id.tolist() == [1, 2, 3, 4, 5]  # 6 lost its only candidate
    assert train.history_of(4).tolist() == [ds.news_id_to_idx["N1"]]
    assert train.candidates_of(4).tolist() == [ds.news_id_to_idx["N2"]]
    assert train.labels_of(4).tolist() == [0]
    assert ds.manifest["missing_news"] == {"ids": 3, "references": 4, "impressions_dropped": 1}
    assert ds.manifest["splits"]["train"]["no_click_impressions"] == 1
    assert any("missing news dropped" in line for line in result.summary_lines())


# --------------------------------------------------------------------------------------------
# GloVe


def test_glove_vectors_aligned_to_vocabulary(tmp_path):
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=GOOD)  # vocab: title, number, 1..5
    glove = tmp_path / "glove.txt"
    glove.write_text("Title 9 9 9\n"  # cased: used for "title" only when no exact match
                     "title 0.5 -0.5 1.0\n"
                     "number 1 2 3\n"
                     "3 0 0 1\n"
                     "unrelated 7 7 7\n"
                     "broken 1 2\n", encoding="utf-8")
    result = ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out", glove=glove)
    ds = open_dataset(tmp_path / "out")
    vec = ds.word_vectors
    word = {w: i for i, w in enumerate(ds.vocab)}
    assert vec.shape == (len(ds.vocab), 3) and vec.dtype == np.float32
    np.testing.assert_allclose(vec[word["title"]], [0.5, -0.5, 1.0])
    np.testing.assert_allclose(vec[word["number"]], [1, 2, 3])
    np.testing.assert_allclose(vec[word["3"]], [0, 0, 1])
    assert not vec[0].any()
    glove_info = result.manifest["glove"]
    assert glove_info["found"] == 3 and glove_info["not_found"] == len(ds.vocab) - 2 - 3
    assert glove_info["dim"] == 3


def test_glove_vocabulary_covers_every_split_and_reports_coverage(tmp_path):
    paths = standard_corpus(tmp_path / "raw")
    # "zyzzyva" and "brand" appear in dev/test titles only; "unseen" too, but GloVe lacks it
    glove = tmp_path / "glove.txt"
    glove.write_text("zyzzyva 1 0\nbrand 0 1\nstocks 2 2\n", encoding="utf-8")
    plain = ingest(_cfg(title_len=6), train=paths["train"], dev=paths["dev"], test=paths["test"],
                   out_dir=tmp_path / "plain")
    result = ingest(_cfg(title_len=6), train=paths["train"], dev=paths["dev"], test=paths["test"],
                    out_dir=tmp_path / "out", glove=glove)
    base, ds = open_dataset(tmp_path / "plain"), open_dataset(tmp_path / "out")
    assert "zyzzyva" not in base.vocab
    assert ds.vocab[:len(base.vocab)] == base.vocab  # the train vocabulary first, unchanged
    assert ds.vocab[len(base.vocab):] == ["brand", "zyzzyva"]  # dev/test words GloVe knows
    assert "unseen" not in ds.vocab and "story" not in ds.vocab  # nothing would train their rows
    np.testing.assert_allclose(ds.word_vectors[ds.vocab.index("zyzzyva")], [1, 0])
    n7 = ds.title_tokens[ds.news_id_to_idx["N7"]]  # "Brand new zyzzyva story"
    assert [ds.vocab[t] for t in n7[:4]] == ["brand", "<unk>", "zyzzyva", "<unk>"]
    assert result.manifest["glove"]["added_outside_train"] == 2
    # coverage per split, counted independently from the titles each split's news.tsv lists
    cov, cov_plain = result.manifest["title_coverage"], plain.manifest["title_coverage"]
    assert cov_plain["train"]["known"] == 1.0 and cov["train"]["known"] == 1.0
    # test: "Brand new zyzzyva story" + "Unseen words only": 7 words; known: brand, zyzzyva
    assert cov["test"]["words"] == 7 and cov["test"]["known"] == pytest.approx(2 / 7)
    assert cov_plain["test"]["known"] == 0.0 and cov["test"]["pretrained"] == pytest.approx(2 / 7)
    assert any("title words in the vocabulary" in line and "test 28.6%" in line
               for line in result.summary_lines())


def test_glove_case_fallback_and_missing_file(tmp_path):
    write_split(tmp_path / "train", news=GOOD_NEWS, behaviors=GOOD)
    glove = tmp_path / "glove.txt"
    glove.write_text("Title 9 9 9\nNumber 1 1 1\n")
    ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out", glove=glove)
    ds = open_dataset(tmp_path / "out")
    np.testing.assert_allclose(ds.word_vectors[ds.vocab.index("title")], [9, 9, 9])
    with pytest.raises(DataError, match="GloVe file not found"):
        ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out2", glove=tmp_path / "no.txt")


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_ingest_summary_and_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWSREC_PROGRESS", "0")  # keep the captured output to what is printed
    paths = standard_corpus(tmp_path / "raw", as_zip=True)
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", "--train", str(paths["train"]), "--dev", str(paths["dev"]),
                                  "--test", str(paths["test"]), "--out", str(tmp_path / "out"),
                                  "-o", "data.title_len=8"])
    assert result.exit_code == 0, result.output
    assert "news: 9" in result.output and "train: 3 impressions" in result.output
    assert open_dataset(tmp_path / "out").title_len == 8

    write_split(tmp_path / "bad", news=GOOD_NEWS, behaviors=BAD_CASES["time"][0])
    result = runner.invoke(main, ["ingest", "--train", str(tmp_path / "bad"), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and "behaviors.tsv:3:" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "o2").exists()

    result = runner.invoke(main, ["ingest", "--train", str(tmp_path / "bad"), "--out", str(tmp_path / "o3"),
                                  "--on-bad-rows", "skip"])
    assert result.exit_code == 0, result.output
    assert "skipped rows: train/behaviors time 1" in result.output


def test_ids_not_of_mind_form_map_through_the_general_path(tmp_path):
    news = [news_row(i) for i in ("a-1", "N2", "N07")]  # a dash, a plain MIND id, a leading zero
    rows = [behaviors_row(1, "U1", ["N07"], [("a-1", 1), ("N2", 0)]),
            behaviors_row(2, "U2", ["a-1", "N2"], [("N07", 1)])]
    write_split(tmp_path / "train", news=news, behaviors=rows)
    ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    ds = open_dataset(tmp_path / "out")
    train = ds.impressions("train")
    assert [ds.news_idx_to_id[i] for i in train.candidates] == ["a-1", "N2", "N07"]
    assert [ds.news_idx_to_id[i] for i in train.history] == ["N07", "a-1", "N2"]
    assert train.labels.tolist() == [1, 0, 1]


def test_ids_that_only_look_numeric_stay_distinct(tmp_path):
    # only N<digits> without a sign or a leading zero is read as a number: N+5 and N05 are not N5
    news = [news_row(i) for i in ("N5", "N05", "N+5")]
    rows = [behaviors_row(1, "U1", ["N05", "N+5"], [("N5", 1), ("N05", 0), ("N+5", 0)]),
            behaviors_row(2, "U2", ["N5"], [("N+5", 1)])]
    write_split(tmp_path / "train", news=news, behaviors=rows)
    ingest(Config(), train=tmp_path / "train", out_dir=tmp_path / "out")
    ds = open_dataset(tmp_path / "out")
    train = ds.impressions("train")
    assert [ds.news_idx_to_id[i] for i in train.candidates] == ["N5", "N05", "N+5", "N+5"]
    assert [ds.news_idx_to_id[i] for i in train.history] == ["N05", "N+5", "N5"]
