"""The synthetic MIND-format generator: exact format, determinism, tails, cold start, oracle."""
from __future__ import annotations

import json
import re
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.data.synth import generate, sample_history_lengths, sample_impression_sizes
from newsrec.errors import NewsrecError

TIME_PATTERN = re.compile(r"^\d{1,2}/\d{1,2}/\d{4} ([1-9]|1[0-2]):[0-5]\d:[0-5]\d (AM|PM)$")
SPLIT_DATES = {"train": {"11/9/2019", "11/10/2019", "11/11/2019", "11/12/2019", "11/13/2019"},
               "dev": {"11/14/2019"}, "test": {"11/15/2019"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return out, generate(out, size="tiny", seed=0)


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (equals sklearn's roc_auc_score)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def test_rank_auc_known_values():
    assert rank_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == 1.0
    assert rank_auc(np.array([1, 0, 1, 0]), np.array([0.1, 0.9, 0.2, 0.8])) == 0.0
    assert rank_auc(np.array([0, 1, 1, 0]), np.array([0.5, 0.5, 0.9, 0.1])) == 0.875


def read_member(zip_path: Path, name: str) -> str:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(name).decode("utf-8")


def behaviors(out: Path, split: str) -> list[list[str]]:
    return [line.split("\t") for line in read_member(out / f"MINDsynth_{split}.zip", "behaviors.tsv").splitlines()]


def news_rows(out: Path, split: str) -> list[list[str]]:
    return [line.split("\t") for line in read_member(out / f"MINDsynth_{split}.zip", "news.tsv").splitlines()]


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    generate(tmp_path / "again", size="tiny", seed=0)
    generate(tmp_path / "other", size="tiny", seed=1)
    for split in ("train", "dev", "test"):
        name = f"MINDsynth_{split}.zip"
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes()
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_zip_members_at_root(tiny):
    out, _ = tiny
    for path in [*out.glob("*.zip"), out / "ground_truth", *(out / "ground_truth").iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, f"{path} should be readable by others"
    for split in ("train", "dev", "test"):
        with zipfile.ZipFile(out / f"MINDsynth_{split}.zip") as archive:
            assert set(archive.namelist()) == {"news.tsv", "behaviors.tsv", "entity_embedding.vec",
                                               "relation_embedding.vec"}


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_behaviors_format(tiny, split):
    out, summary = tiny
    rows = behaviors(out, split)
    listed = {row[0] for row in news_rows(out, split)}
    assert len(rows) == summary["splits"][split]["impressions"]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    n_candidates = n_clicks = 0
    for row in rows:
        assert len(row) == 5
        assert re.fullmatch(r"U\d+", row[1])
        assert TIME_PATTERN.match(row[2]), row[2]
        datetime.strptime(row[2], "%m/%d/%Y %I:%M:%S %p")
        assert row[2].split(" ")[0] in SPLIT_DATES[split]
        history = row[3].split(" ") if row[3] else []
        assert len(set(history)) == len(history)
        assert set(history) <= listed
        candidates = row[4].split(" ")
        assert 2 <= len(candidates) <= 300
        if split == "test":
            assert all(re.fullmatch(r"N\d+", c) for c in candidates)
            ids = candidates
        else:
            assert all(re.fullmatch(r"N\d+-[01]", c) for c in candidates)
            ids = [c.rsplit("-", 1)[0] for c in candidates]
            clicks = sum(c.endswith("-1") for c in candidates)
            assert clicks >= 1
            n_clicks += clicks
        assert len(set(ids)) == len(ids)
        assert set(ids) <= listed
        n_candidates += len(ids)
    if split != "test":
        assert 0.03 <= n_clicks / n_candidates <= 0.05
    assert 20 <= n_candidates / len(rows) <= 45


def test_news_format(tiny):
    out, _ = tiny
    rows = news_rows(out, "dev")
    quoted = 0
    for row in rows:
        assert len(row) == 8
        news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities = row
        assert re.fullmatch(r"N\d+", news_id) and category and subcategory and title
        assert url.startswith("https://") and url.endswith(".html")
        quoted += '"' in title
        for text, cell in ((title, title_entities), (abstract, abstract_entities)):
            for entity in json.loads(cell):
                assert set(entity) == {"Label", "Type", "WikidataId", "Confidence", "OccurrenceOffsets",
                                       "SurfaceForms"}
                offset = entity["OccurrenceOffsets"][0]
                surface = entity["SurfaceForms"][0]
                assert text[offset:offset + len(surface)] == surface
    assert quoted > 0, "titles should sometimes hold double quotes"
    vec = read_member(out / "MINDsynth_dev.zip", "entity_embedding.vec").splitlines()
    referenced = {e["WikidataId"] for row in rows for cell in row[6:] for e in json.loads(cell)}
    assert {line.split("\t")[0] for line in vec} == referenced
    assert all(len(line.split("\t")) == 101 for line in vec)


def test_cold_start_and_dev_repeats_train_news(tiny):
    out, summary = tiny
    train_referenced = {row[0] for row in news_rows(out, "train")}
    dev_news = {row[0] for row in news_rows(out, "dev")}
    dev_candidates = {c.rsplit("-", 1)[0] for row in behaviors(out, "dev") for c in row[4].split(" ")}
    assert dev_candidates - train_referenced, "dev must hold news never seen in train"
    assert dev_news & train_referenced, "dev's news.tsv repeats train news"
    test_candidates = {c for row in behaviors(out, "test") for c in row[4].split(" ")}
    cold_dev = len(dev_candidates - train_referenced) / len(dev_candidates)
    cold_test = len(test_candidates - train_referenced) / len(test_candidates)
    assert cold_test > cold_dev  # test is colder than dev, as in MIND
    assert 0.1 < summary["splits"]["dev"]["cold_candidate_share"] < summary["splits"]["test"]["cold_candidate_share"]


def test_history_precedes_impression(tiny):
    out, _ = tiny
    published = dict(pl.read_parquet(out / "ground_truth" / "news.parquet")
                     .select("news_id", "publish_time").iter_rows())
    for split in ("train", "dev"):
        for row in behaviors(out, split)[:300]:
            shown_at = datetime.strptime(row[2], "%m/%d/%Y %I:%M:%S %p")
            history = row[3].split(" ") if row[3] else []
            times = [published[n] for n in history]
            assert times == sorted(times), "history is oldest first"
            assert all(t < shown_at for t in times)
            assert all(published[c.rsplit("-", 1)[0]] <= shown_at for c in row[4].split(" "))


def test_ground_truth_matches_zips_and_oracle_metrics(tiny):
    out, summary = tiny
    truth_dir = out / "ground_truth"
    oracle = json.loads((truth_dir / "oracle_metrics.json").read_text())
    for split in ("dev", "test"):
        truth = pl.read_parquet(truth_dir / f"{split}_truth.parquet")
        rows = behaviors(out, split)
        assert truth["impression_id"].to_list() == [int(r[0]) for r in rows]
        aucs = []
        for row, candidates, probability, label in zip(rows, truth["candidates"], truth["probability"],
                                                       truth["label"]):
            shown = row[4].split(" ")
            if split == "test":
                assert shown == list(candidates)
            else:
                assert shown == [f"{c}-{y}" for c, y in zip(candidates, label)]
            aucs.append(rank_auc(np.asarray(label), np.asarray(probability)))
        assert oracle[split]["auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
        assert summary["oracle"][split]["auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
        probabilities = np.concatenate(truth["probability"].to_list())
        labels = np.concatenate(truth["label"].to_list())
        assert abs(probabilities.mean() - labels.mean()) < 0.02  # calibrated up to forced clicks
        assert labels[probabilities > np.quantile(probabilities, 0.9)].mean() > 3 * labels.mean()
    users = pl.read_parquet(truth_dir / "users.parquet")
    assert users.height == summary["users"]
    assert users["interest"].list.len().min() >= 3  # >= 1 category, subcategory and topic each


def test_history_length_tail():
    lengths = sample_history_lengths(np.random.default_rng(0), 100_000)
    assert 17 <= np.median(lengths) <= 23
    assert np.percentile(lengths, 99) >= 500
    assert lengths.max() >= 2000
    assert 0 < np.mean(lengths == 0) < 0.05


def test_impression_sizes_like_mind():
    sizes = sample_impression_sizes(np.random.default_rng(0), 100_000)
    assert 33 <= sizes.mean() <= 41
    assert sizes.min() == 2 and sizes.max() == 300


def test_cli_prints_oracle_auc_in_range(tmp_path):
    # the demo size has the structure of small (the default) at a tenth of its impressions; tiny is
    # too small for its AUC to say anything about the defaults
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d"), "--size", "demo", "--seed", "3"])
    assert result.exit_code == 0, result.output
    match = re.search(r"oracle dev AUC (\d\.\d+)", result.output)
    assert match, result.output
    assert 0.72 <= float(match.group(1)) <= 0.82
    assert (tmp_path / "d" / "MINDsynth_test.zip").is_file()
    assert (tmp_path / "d" / "ground_truth" / "oracle_metrics.json").is_file()


def test_bad_size_and_seed():
    with pytest.raises(NewsrecError, match="unknown size 'huge'"):
        generate("unused", size="huge")
    with pytest.raises(NewsrecError, match="seed"):
        generate("unused", size="tiny", seed=-1)
    result = CliRunner().invoke(main, ["synth", "--out", "unused", "--size", "huge"])
    assert result.exit_code == 2 and "huge" in result.output
