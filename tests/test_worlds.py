"""Generator worlds: each generates, ingests and shows the property it claims; real news.tsv input."""
from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from scipy.stats import spearmanr

from newsrec.cli import main
from newsrec.config import config_from_dict
from newsrec.data.artifact import open_dataset
from newsrec.data.ingest import ingest
from newsrec.data.synth import generate
from newsrec.data.worlds import WORLDS, World, resolve_world
from newsrec.errors import NewsrecError
from tests.mindfiles import news_row
from tests.test_synth import rank_auc

_CACHE: dict[str, tuple[dict, object, Path]] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """world name -> (summary, ingested dataset, ground_truth dir), generated once per module."""

    def get(world: str):
        if world not in _CACHE:
            root = tmp_path_factory.mktemp(world)
            summary = generate(root / "raw", size="tiny", seed=0, world=world)
            ingest(config_from_dict({}), train=root / "raw" / "MINDsynth_train.zip",
                   dev=root / "raw" / "MINDsynth_dev.zip", test=root / "raw" / "MINDsynth_test.zip",
                   out_dir=root / "data")
            _CACHE[world] = (summary, open_dataset(root / "data"), root / "raw" / "ground_truth")
        return _CACHE[world]

    return get


def candidate_frame(dataset, split: str) -> dict[str, np.ndarray]:
    imp = dataset.impressions(split)
    counts = np.diff(imp.candidate_offsets)
    return {"row": np.repeat(np.arange(len(imp)), counts), "news": imp.candidates.astype(np.int64),
            "label": imp.labels, "imp": imp}


def history_share(imp, rows: np.ndarray, news: np.ndarray, group_of_news: np.ndarray) -> np.ndarray:
    """Share of the row's history whose group equals the candidate news' group."""
    out = np.zeros(len(rows))
    for k, (r, n) in enumerate(zip(rows, news)):
        h = imp.history[imp.history_offsets[r]: imp.history_offsets[r + 1]]
        if len(h):
            out[k] = np.mean(group_of_news[h] == group_of_news[n])
    return out


def by_idx(dataset, column: str, fill=0) -> np.ndarray:
    """A news column as an array indexed by news_idx (entry 0: the padding news)."""
    values = dataset.news[column].to_list()
    out = np.empty(dataset.n_news + 1, dtype=object if isinstance(fill, list) else type(fill))
    out[0] = fill
    for i, v in zip(dataset.news["news_idx"].to_list(), values):
        out[i] = v
    return out


def truth_news(dataset, truth: Path) -> pl.DataFrame:
    """Ground-truth news rows aligned with the dataset's news_idx (row i = news_idx i; row 0 padding)."""
    news = pl.read_parquet(truth / "news.parquet")
    ids = pl.DataFrame({"news_id": dataset.news_idx_to_id.astype(str)})
    return ids.join(news, on="news_id", how="left", maintain_order="left")


def test_world_registry_and_composition():
    with pytest.raises(NewsrecError, match=r"unknown world 'nope' \(valid: default, cold-test, uniform-exposure"):
        resolve_world("nope")
    both = resolve_world("cold-test+uniform-exposure")
    assert both.cold_test and both.exposure == "uniform" and both.name == "cold-test+uniform-exposure"
    with pytest.raises(NewsrecError, match="conflict on level_scale"):
        resolve_world("entity-interest+text-topics")
    assert resolve_world("default") == World()
    assert set(WORLDS) >= {"default", "cold-test", "uniform-exposure", "entity-interest", "drift", "text-topics"}


def test_cli_unknown_world_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "x"), "--size", "tiny", "--world", "nope"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: synth: unknown world 'nope' (valid: default, cold-test")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("world", list(WORLDS))
def test_history_only_limit_below_oracle(built, world):
    summary, dataset, truth = built(world)
    for split in ("dev", "test"):
        oracle, alone = summary["oracle"][split], summary["history_only"][split]
        with_pop = summary["history_only_popularity"][split]
        for metric in ("auc", "ndcg@10"):
            assert 0.5 <= alone[metric] <= oracle[metric] if metric == "auc" else alone[metric] <= oracle[metric]
            assert with_pop[metric] <= oracle[metric] + 1e-9
    stored = json.loads((truth / "summary.json").read_text())
    assert stored["history_only"]["dev"]["auc"] == summary["history_only"]["dev"]["auc"]
    assert stored["world"] == world
    assert dataset.impressions("dev").labels.sum() == summary["splits"]["dev"]["clicks"]


def test_cold_test_candidates_never_seen_before(built):
    for world, expect_cold in (("cold-test", True), ("default", False)):
        summary, dataset, _ = built(world)
        history_news = np.zeros(dataset.n_news + 1, bool)
        for split in ("train", "dev", "test"):
            history_news[dataset.impressions(split).history] = True
        for split in ("dev", "test"):
            cand = np.unique(dataset.impressions(split).candidates)
            train_seen = (by_idx(dataset, "train_impressions")[cand] > 0) | (by_idx(dataset, "train_clicks")[cand] > 0)
            in_history = history_news[cand]
            if expect_cold:
                assert not train_seen.any() and not in_history.any()
                assert summary["splits"][split]["cold_candidate_share"] == 1.0
            else:
                assert train_seen.mean() > 0.2  # the default world repeats train news in dev/test


def test_uniform_exposure_shows_independent_of_popularity(built):
    results = {}
    for world in ("uniform-exposure", "default"):
        summary, dataset, truth = built(world)
        news = truth_news(dataset, truth)
        cand = candidate_frame(dataset, "train")
        shown = np.bincount(cand["news"], minlength=dataset.n_news + 1)
        day = (news["publish_time"].dt.day().to_numpy())
        full = np.isin(day, [10, 11, 12])  # published on train days 2-4: in the pool all of day 3 to 5
        popularity = news["popularity"].to_numpy()
        rho = spearmanr(shown[full], popularity[full]).statistic
        click_auc = rank_auc(cand["label"].astype(int), popularity[cand["news"]])
        results[world] = (rho, click_auc)
    assert abs(results["uniform-exposure"][0]) < 0.15, results
    assert results["default"][0] > 0.6, results
    assert results["uniform-exposure"][1] > 0.53, results  # clicks still rise with popularity


def _category_and_entity_auc(dataset) -> tuple[float, float]:
    cand = candidate_frame(dataset, "dev")
    imp = cand["imp"]
    category = dataset.news_categories[0]
    entities = [set(a or []) | set(b or []) for a, b in
                zip(by_idx(dataset, "title_entities", []), by_idx(dataset, "abstract_entities", []))]
    overlap = np.zeros(len(cand["row"]))
    history_entities: dict[int, set] = {}
    for k, (r, n) in enumerate(zip(cand["row"], cand["news"])):
        if r not in history_entities:
            h = imp.history[imp.history_offsets[r]: imp.history_offsets[r + 1]]
            history_entities[r] = set().union(*(entities[i] for i in h)) if len(h) else set()
        overlap[k] = len(entities[n] & history_entities[r])
    share = history_share(imp, cand["row"], cand["news"], category)
    labels = cand["label"].astype(int)
    return rank_auc(labels, share), rank_auc(labels, overlap)


def test_entity_interest_clicks_follow_entities(built):
    cat_e, ent_e = _category_and_entity_auc(built("entity-interest")[1])
    cat_d, ent_d = _category_and_entity_auc(built("default")[1])
    assert ent_e > cat_e + 0.03, (cat_e, ent_e)
    assert cat_d > ent_d, (cat_d, ent_d)  # the default world: categories explain clicks better


def test_drift_moves_interests(built):
    def cosine_and_category_hit(world: str) -> tuple[float, float]:
        summary, dataset, truth = built(world)
        users = pl.read_parquet(truth / "users.parquet")
        cosines = []
        if "impression_interest" in users.columns:
            for row in users.iter_rows(named=True):
                a = dict(zip(row["interest"] or [], row["interest_weight"] or []))
                b = dict(zip(row["impression_interest"] or [], row["impression_interest_weight"] or []))
                keys = sorted(set(a) | set(b))
                va, vb = np.array([a.get(k, 0.0) for k in keys]), np.array([b.get(k, 0.0) for k in keys])
                cosines.append(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
        cand = candidate_frame(dataset, "dev")
        clicked = cand["label"] == 1
        share = history_share(cand["imp"], cand["row"][clicked], cand["news"][clicked],
                              dataset.news_categories[0])
        return (float(np.mean(cosines)) if cosines else 1.0), float(np.mean(share > 0))

    cos_drift, hit_drift = cosine_and_category_hit("drift")
    cos_default, hit_default = cosine_and_category_hit("default")
    assert cos_default == 1.0 and cos_drift < 0.75
    assert hit_drift < hit_default - 0.05, (hit_drift, hit_default)


def test_text_topics_clicks_follow_text(built):
    def aucs(world: str) -> tuple[float, float]:
        summary, dataset, truth = built(world)
        cand = candidate_frame(dataset, "dev")
        labels = cand["label"].astype(int)
        topic = truth_news(dataset, truth)["text_topic"].fill_null(-1).to_numpy()
        category = dataset.news_categories[0]
        return (rank_auc(labels, history_share(cand["imp"], cand["row"], cand["news"], topic)),
                rank_auc(labels, history_share(cand["imp"], cand["row"], cand["news"], category)))

    text_auc, category_auc = aucs("text-topics")
    assert text_auc > category_auc + 0.05, (text_auc, category_auc)
    assert text_auc > 0.6


# ---------------------------------------------------------------------------------------------
# real news.tsv


def write_news_tsv(path: Path, n: int = 240) -> list[str]:
    """A MIND news.tsv whose words follow 4 topics across 3 categories, with MIND's quirks."""
    rng = random.Random(5)
    topics = [[f"{stem}{i}" for i in range(12)] for stem in ("storm", "vote", "goal", "recipe")]
    rows = []
    for i in range(n):
        topic = topics[i % 4]
        category = ("news", "sports", "lifestyle")[rng.randrange(3)]
        title = " ".join(rng.choice(topic) for _ in range(6))
        if i % 7 == 0:
            title = f'"{title}" says official'
        abstract = "" if i % 5 == 0 else " ".join(rng.choice(topic) for _ in range(12))
        entities = [] if i % 3 == 0 else [(f"Q{100 + (i % 4) * 10 + rng.randrange(3)}", 0.99)]
        rows.append(news_row(f"N{1000 + i}", category=category, subcategory=f"{category}{i % 2}", title=title,
                             abstract=abstract, title_entities=entities))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return rows


def test_real_news_world(tmp_path):
    rows = write_news_tsv(tmp_path / "news.tsv")
    with zipfile.ZipFile(tmp_path / "news.zip", "w") as archive:
        archive.write(tmp_path / "news.tsv", "MINDx/news.tsv")
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "out"), "--size", "tiny", "--world",
                                       "text-topics", "--news", str(tmp_path / "news.zip")])
    assert result.exit_code == 0, result.output
    assert "history-only limit" in result.output
    summary = json.loads((tmp_path / "out" / "ground_truth" / "summary.json").read_text())
    assert summary["news"] == 240 and summary["news_source"].endswith("news.zip:MINDx/news.tsv")
    with zipfile.ZipFile(tmp_path / "out" / "MINDsynth_train.zip") as archive:
        listed = archive.read("news.tsv").decode().splitlines()
        vectors = archive.read("entity_embedding.vec").decode().splitlines()
    assert set(listed) <= set(rows) and len(listed) > 50  # the real lines, byte for byte
    mentioned = {e["WikidataId"] for line in listed for e in json.loads(line.split("\t")[6])}
    assert {v.split("\t")[0] for v in vectors} == mentioned
    out = tmp_path / "out"
    ingest(config_from_dict({}), train=out / "MINDsynth_train.zip", dev=out / "MINDsynth_dev.zip",
           test=out / "MINDsynth_test.zip", out_dir=tmp_path / "data")
    dataset = open_dataset(tmp_path / "data")
    assert set(dataset.news["news_id"].to_list()[1:]) <= {r.split("\t")[0] for r in rows}
    # the NMF text topics recover the 4 word groups: news of one group share a topic
    news = pl.read_parquet(out / "ground_truth" / "news.parquet")
    group = news["news_id"].str.slice(1).cast(pl.Int64).to_numpy() % 4
    topic = news["text_topic"].to_numpy()
    purity = sum(np.bincount(topic[group == g]).max() for g in range(4)) / len(topic)
    assert purity > 0.9
    for split in ("dev", "test"):
        assert summary["history_only"][split]["auc"] <= summary["oracle"][split]["auc"]


def test_real_news_bad_row_names_file_and_line(tmp_path):
    rows = write_news_tsv(tmp_path / "news.tsv")
    rows[10] = "\t".join(rows[10].split("\t")[:5])
    (tmp_path / "news.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "out"), "--size", "tiny",
                                       "--news", str(tmp_path / "news.tsv")])
    assert result.exit_code == 1
    assert "news.tsv:11: expected 8 tab-separated columns" in result.output, result.output
    with pytest.raises(NewsrecError, match="at least 50"):
        write_news_tsv(tmp_path / "few.tsv", n=20)
        generate(tmp_path / "few", size="tiny", news_path=tmp_path / "few.tsv")
