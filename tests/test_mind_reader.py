"""MIND reading: locating files in zips and folders, parsing, BOM/CRLF, line numbers."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from newsrec.data import mind
from newsrec.errors import DataError
from tests.mindfiles import behaviors_row, entity_row, news_row, write_split

NEWS = [news_row("N1", title='A "quoted" title, with commas', title_entities=[("Q7", 0.75)]),
        news_row("N2", abstract="Some abstract.")]
BEHAVIORS = [behaviors_row(5, "U1", ["N1", "N2"], [("N2", 1), ("N1", 0)]),
             behaviors_row(6, "U2", [], [("N1", 0), ("N2", 0)],
                           when=dt.datetime(2019, 11, 14, 23, 5, 1)),
             behaviors_row(7, "U1", ["N2"], [("N1", 1)], when=dt.datetime(2019, 11, 15, 0, 0, 0))]


@pytest.mark.parametrize("as_zip", [False, True])
@pytest.mark.parametrize("subfolder", [None, "MINDsmall_train"])
def test_locate_split_root_or_one_subfolder(tmp_path, as_zip, subfolder):
    dest = tmp_path / ("split.zip" if as_zip else "split")
    write_split(dest, news=NEWS, behaviors=BEHAVIORS, entities=[entity_row("Q7", [1, 2])],
                as_zip=as_zip, subfolder=subfolder)
    source = mind.locate_split(dest)
    assert source.is_zip is as_zip
    assert source.news.label.endswith("news.tsv") and source.behaviors.label.endswith("behaviors.tsv")
    assert source.entity_embedding is not None
    assert mind.read_news(source.news).frame["news_id"].to_list() == ["N1", "N2"]


def test_locate_split_without_behaviors_names_what_is_missing(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "news.tsv").write_text(NEWS[0] + "\n")
    with pytest.raises(DataError, match="no behaviors.tsv"):
        mind.locate_split(tmp_path / "only")
    with pytest.raises(DataError, match="not found"):
        mind.locate_split(tmp_path / "nowhere.zip")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        mind.locate_split(tmp_path / "bad.zip")


def test_behaviors_parsed_values(tmp_path):
    write_split(tmp_path / "s", news=NEWS, behaviors=BEHAVIORS)
    table = mind.read_behaviors(mind.locate_split(tmp_path / "s").behaviors)
    assert table.frame["impression_id"].to_list() == [5, 6, 7]
    assert table.frame["user_id"].to_list() == ["U1", "U2", "U1"]
    assert table.frame["time"].to_list() == [dt.datetime(2019, 11, 15, 8, 55, 22),
                                            dt.datetime(2019, 11, 14, 23, 5, 1),
                                            dt.datetime(2019, 11, 15, 0, 0, 0)]
    assert table.frame["line_no"].to_list() == [1, 2, 3]
    assert table.history_counts.tolist() == [2, 0, 1]
    assert table.history_ids.to_strings().to_list() == ["N1", "N2", "N2"]
    assert table.candidate_counts.tolist() == [2, 2, 1]
    assert table.candidate_ids.to_strings().to_list() == ["N2", "N1", "N1", "N2", "N1"]
    assert table.labels.tolist() == [1, 0, 0, 0, 1]
    assert table.no_click == 1


def test_unlabelled_split_has_no_labels(tmp_path):
    rows = [behaviors_row(1, "U1", ["N1"], ["N2", "N1"]), behaviors_row(2, "U2", [], ["N2"])]
    write_split(tmp_path / "t", news=NEWS, behaviors=rows)
    table = mind.read_behaviors(mind.locate_split(tmp_path / "t").behaviors)
    assert table.labels is None
    assert table.candidate_ids.to_strings().to_list() == ["N2", "N1", "N2"]
    assert table.candidate_counts.tolist() == [2, 1]


def test_bom_and_crlf_are_tolerated(tmp_path):
    write_split(tmp_path / "plain", news=NEWS, behaviors=BEHAVIORS)
    write_split(tmp_path / "win", news=NEWS, behaviors=BEHAVIORS, bom=True, crlf=True)
    plain, win = (mind.locate_split(tmp_path / n) for n in ("plain", "win"))
    assert mind.read_news(win.news).frame.drop("line_no").equals(mind.read_news(plain.news).frame.drop("line_no"))
    a, b = mind.read_behaviors(plain.behaviors), mind.read_behaviors(win.behaviors)
    assert a.frame.equals(b.frame)
    assert a.candidate_ids.to_strings().to_list() == b.candidate_ids.to_strings().to_list()
    assert np.array_equal(a.labels, b.labels)
    assert b.frame["user_id"][0] == "U1"  # no BOM glued to the first field


def test_news_entities_and_quotes(tmp_path):
    write_split(tmp_path / "s", news=NEWS, behaviors=BEHAVIORS)
    frame = mind.read_news(mind.locate_split(tmp_path / "s").news).frame
    assert frame["title"][0] == 'A "quoted" title, with commas'
    assert frame["title_entities"].to_list() == [["Q7"], []]
    assert frame["title_entity_confidence"][0].to_list() == [0.75]
    assert frame["abstract"].to_list() == ["", "Some abstract."]


def test_entity_vectors_with_trailing_tab(tmp_path):
    write_split(tmp_path / "s", news=NEWS, behaviors=BEHAVIORS,
                entities=[entity_row("Q7", [0.5, -1.25, 2.0]), entity_row("Q8", [0, 0, 1])])
    vec = mind.read_entity_vectors(mind.locate_split(tmp_path / "s").entity_embedding)
    assert vec.ids == ["Q7", "Q8"]
    np.testing.assert_allclose(vec.vectors, [[0.5, -1.25, 2.0], [0, 0, 1]])


def test_blank_line_inside_file_is_a_bad_row_but_trailing_blanks_are_not(tmp_path):
    raw = ("\n".join(BEHAVIORS[:1]) + "\n\n" + BEHAVIORS[1] + "\n\n\n").encode()
    write_split(tmp_path / "s", news=NEWS, behaviors=[], raw_behaviors=raw)
    with pytest.raises(DataError) as err:
        mind.read_behaviors(mind.locate_split(tmp_path / "s").behaviors)
    assert err.value.line == 2 and "empty line" in str(err.value)
    write_split(tmp_path / "t", news=NEWS, behaviors=[], raw_behaviors=(BEHAVIORS[0] + "\n\n\n").encode())
    assert len(mind.read_behaviors(mind.locate_split(tmp_path / "t").behaviors).frame) == 1


def test_utf8_error_line_counts_lines_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(mind, "_UTF8_CHUNK", 64)  # force several chunks, with multi-byte chars
    rows = [news_row(f"N{i}", title=f"caf\u00e9 na\u00efve {i}") for i in range(1, 30)]
    data = ("\n".join(rows) + "\n").encode()
    cut = data.index(b"N17\t")
    data = data[:cut + 5] + b"\xff" + data[cut + 5:]
    write_split(tmp_path / "s", news=[], behaviors=BEHAVIORS, raw_news=data)
    with pytest.raises(DataError) as err:
        mind.read_news(mind.locate_split(tmp_path / "s").news)
    assert err.value.line == 17 and "UTF-8" in str(err.value)


def test_chunked_parsing_equals_one_pass_and_checks_across_chunks(tmp_path):
    rows = [behaviors_row(i, f"U{i % 3}", ["N1"] * (i % 4), [("N2", i % 2), ("N1", 1 - i % 2)])
            for i in range(1, 12)]
    write_split(tmp_path / "s", news=NEWS, behaviors=rows)
    source = mind.locate_split(tmp_path / "s").behaviors
    whole, chunked = mind.read_behaviors(source), mind.read_behaviors(source, chunk_rows=3)
    assert whole.frame.equals(chunked.frame)
    assert np.array_equal(whole.history_counts, chunked.history_counts)
    assert np.array_equal(whole.candidate_counts, chunked.candidate_counts)
    assert np.array_equal(whole.labels, chunked.labels)
    assert np.array_equal(whole.candidate_ids.numbers, chunked.candidate_ids.numbers)
    assert whole.history_counts.tolist() == [i % 4 for i in range(1, 12)]

    # an unlabelled row in a later chunk, and a duplicate id spanning chunks
    mixed = rows[:7] + [behaviors_row(99, "U9", [], ["N1"])] + rows[7:]
    write_split(tmp_path / "m", news=NEWS, behaviors=mixed)
    with pytest.raises(DataError) as err:
        mind.read_behaviors(mind.locate_split(tmp_path / "m").behaviors, chunk_rows=3)
    assert err.value.line == 8 and "from line 1" in str(err.value)
    dup = rows + [behaviors_row(2, "U9", [], [("N1", 1)])]
    write_split(tmp_path / "d", news=NEWS, behaviors=dup)
    table = mind.read_behaviors(mind.locate_split(tmp_path / "d").behaviors, on_bad_rows="skip",
                                chunk_rows=4)
    assert table.skipped == {"duplicate_impression_id": 1} and len(table.frame) == 11
    assert table.candidate_counts.sum() == len(table.labels) == len(table.candidate_ids) == 22
