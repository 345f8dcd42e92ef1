"""News inputs gathered by news index: title words, categories and title entities (pretrained table
when ingested, else learned over the train split's news), and fresh news tokenised like ingest."""
from __future__ import annotations

import numpy as np
import pytest

from newsrec.config import config_from_dict
from newsrec.data import schema
from newsrec.data.artifact import open_dataset
from newsrec.data.features import entity_table, news_features
from newsrec.data.ingest import ingest
from tests.mindfiles import BASE_TIME, behaviors_row, news_row, write_split


@pytest.fixture(scope="module")
def entity_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("entities")
    train_news = [news_row("N1", title="alpha one", title_entities=[("Q1", 1.0), ("Q2", 0.5)]),
                  news_row("N2", title="beta two", title_entities=[("Q3", 1.0)]),
                  news_row("N3", title="gamma", category="sports")]
    dev_news = [news_row("N4", title="alpha delta", title_entities=[("Q9", 1.0), ("Q1", 1.0)])]
    write_split(root / "train", news=train_news,
                behaviors=[behaviors_row(1, "U1", ["N1"], [("N2", 1), ("N3", 0)], when=BASE_TIME)])
    write_split(root / "dev", news=dev_news,
                behaviors=[behaviors_row(2, "U1", ["N1"], [("N4", 1), ("N3", 0)], when=BASE_TIME)])
    cfg = config_from_dict({"data": {"title_len": 3}})
    ingest(cfg, train=root / "train", dev=root / "dev", out_dir=root / "learned")
    write_split(root / "train-vec", news=train_news, entities=["Q2\t0.5\t1.5\t", "Q9\t-1\t2\t"],
                behaviors=[behaviors_row(1, "U1", ["N1"], [("N2", 1), ("N3", 0)], when=BASE_TIME)])
    ingest(cfg, train=root / "train-vec", dev=root / "dev", out_dir=root / "pretrained")
    return open_dataset(root / "learned"), open_dataset(root / "pretrained")


def _config(**model):
    return config_from_dict({"model": {"use_entities": True, "max_entities": 2, **model}})


def test_learned_entities_come_from_train_news_only(entity_data):
    learned, _ = entity_data
    table = entity_table(learned)
    assert table.ids == ["", "Q1", "Q2", "Q3"] and table.vectors is None  # Q9: dev news only
    features = news_features(learned, _config())
    idx = learned.news_id_to_idx
    rows = np.array([idx["N1"], idx["N4"], idx["N3"], 0])
    got = features.gather(rows)
    np.testing.assert_array_equal(got["entities"], [[1, 2], [1, 0], [0, 0], [0, 0]])  # Q9 unknown → dropped
    np.testing.assert_array_equal(got["title_tokens"], learned.title_tokens[rows])
    np.testing.assert_array_equal(got["category"], learned.news_categories[0][rows])
    assert "text_states" not in got


def test_pretrained_entity_table_is_the_ingested_vectors(entity_data):
    _, pretrained = entity_data
    table = entity_table(pretrained)
    assert table.ids == ["", "Q2", "Q9"]
    np.testing.assert_allclose(table.vectors, [[0, 0], [0.5, 1.5], [-1, 2]])
    features = news_features(pretrained, _config())
    idx = pretrained.news_id_to_idx
    np.testing.assert_array_equal(features.gather(np.array([idx["N1"], idx["N4"]]))["entities"], [[1, 0], [2, 0]])


def test_fresh_news_are_tokenised_like_ingest(entity_data):
    learned, _ = entity_data
    features = news_features(learned, _config())
    idx = learned.news_id_to_idx["N1"]
    fresh = features.fresh(["Alpha one"], [1], [2], [["Q2", "Q404", "Q1"]])
    np.testing.assert_array_equal(fresh["title_tokens"][0], learned.title_tokens[idx])
    np.testing.assert_array_equal(fresh["entities"], [[2, 1]])
    np.testing.assert_array_equal(fresh["category"], [1])
    assert learned.vocab[schema.UNK] == schema.UNK_WORD
