"""The recommendation service over a tiny generated data set, an untrained model and its index:
clicked news are excluded, k items come sorted, scores are dot(user, news), fresh news are found,
unknown users and ids fail clearly, and the `index` / `recommend` commands work end to end."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import ServeConfig, config_from_dict
from newsrec.data.artifact import DatasetArtifact, open_dataset
from newsrec.errors import ArtifactError, NewsrecError
from newsrec.serve.index import load_index
from newsrec.serve.service import (DuplicateNewsError, Recommender, UnknownNewsError, UnknownUserError,
                                   index_news)

SMALL_MODEL = {"model": {"embedding_dim": 32, "hidden_size": 32, "num_heads": 4, "pooling_hidden": 16},
               "data": {"title_len": 12, "history_len": 20}}


@dataclass
class ServingFixture:
    root: Path
    data_dir: Path
    model_dir: Path
    index_dir: Path
    dataset: DatasetArtifact


@pytest.fixture(scope="session")
def serving_dirs(tmp_path_factory) -> ServingFixture:
    """synth (tiny) → ingest → untrained model saved → index built: the plumbing of a real service."""
    from newsrec.data.ingest import ingest
    from newsrec.data.synth import generate
    from newsrec.inference.model_io import build_model, save_model

    root = tmp_path_factory.mktemp("serving")
    generate(root / "raw", size="tiny", seed=0)
    cfg = config_from_dict(SMALL_MODEL)
    ingest(cfg, train=root / "raw" / "MINDsynth_train.zip", dev=root / "raw" / "MINDsynth_dev.zip",
           test=root / "raw" / "MINDsynth_test.zip", out_dir=root / "data")
    dataset = open_dataset(root / "data")
    torch.manual_seed(0)
    save_model(root / "model", build_model(cfg, dataset), cfg, dataset=dataset)
    index_news(root / "model", data_dir=root / "data", out_dir=root / "index")
    return ServingFixture(root, root / "data", root / "model", root / "index", dataset)


@pytest.fixture()
def service(serving_dirs) -> Recommender:
    return Recommender.load(serving_dirs.model_dir, serving_dirs.index_dir,
                            serve_cfg=ServeConfig(retrieve_k=50, max_k=20, max_history=30))


def latest_history(dataset: DatasetArtifact, user_id: str) -> np.ndarray:
    """Independent reading of a user's latest history: scan every split's impressions."""
    best = None
    for split in dataset.splits:
        imps = dataset.impressions(split)
        for row in np.flatnonzero(imps.user_id == user_id):
            if best is None or imps.time[row] >= best[0]:
                best = (imps.time[row], imps.history_of(row))
    return best[1]


def a_user_with_history(dataset: DatasetArtifact, min_len: int = 5, max_len: int = 10**9) -> str:
    imps = dataset.impressions("train")
    for row in range(len(imps)):
        user = imps.user_id[row]
        if min_len <= len(latest_history(dataset, user)) <= max_len:
            return user
    raise AssertionError("no user with a history in the tiny set")


def test_index_covers_every_news_with_encoder_vectors(serving_dirs):
    from newsrec.inference.scoring import encode_all_news
    from newsrec.inference.model_io import load_model

    index = load_index(serving_dirs.index_dir)
    n_news = serving_dirs.dataset.n_news
    np.testing.assert_array_equal(index.keys, np.arange(1, n_news + 1))
    model = load_model(serving_dirs.model_dir).model
    with torch.inference_mode():
        expected = encode_all_news(model, serving_dirs.dataset, show_progress=False)[1:].numpy()
    np.testing.assert_allclose(index.vectors, expected, rtol=1e-5, atol=1e-6)
    manifest = json.loads((serving_dirs.index_dir / "manifest.json").read_text())
    assert manifest["kind"] == "flat" and manifest["count"] == n_news and manifest["model_json_sha256"]


def test_recommend_for_user_excludes_clicks_and_sorts(service, serving_dirs):
    dataset = serving_dirs.dataset
    user = a_user_with_history(dataset)
    history = latest_history(dataset, user)
    rec = service.recommend(user_id=user, k=10)
    assert len(rec.items) == 10
    scores = [item.score for item in rec.items]
    assert scores == sorted(scores, reverse=True)
    clicked = {dataset.news_idx_to_id[i] for i in history}
    assert not clicked & {item.news_id for item in rec.items}
    assert rec.history_used == min(len(history), 20)

    # independent computation: user vector from the model, exact dot products over all unclicked news
    model = service.model
    vectors = service.index.vectors  # row i = news_idx i + 1
    recent = history[-20:]
    with torch.inference_mode():
        user_vec = model.encode_user(torch.from_numpy(vectors[recent - 1])[None],
                                     torch.ones(1, len(recent), dtype=torch.bool))[0].numpy()
    all_scores = vectors @ user_vec
    all_scores[np.asarray(list(set(history.tolist()))) - 1] = -np.inf
    top = np.argsort(-all_scores, kind="stable")[:10] + 1
    assert [item.news_id for item in rec.items] == [dataset.news_idx_to_id[i] for i in top]
    np.testing.assert_allclose(scores, all_scores[top - 1], rtol=1e-4, atol=1e-6)


def test_given_history_equals_user_history(service, serving_dirs):
    dataset = serving_dirs.dataset
    user = a_user_with_history(dataset, max_len=30)  # within the service's max_history
    history_ids = [dataset.news_idx_to_id[i] for i in latest_history(dataset, user)]
    by_user = service.recommend(user_id=user, k=5)
    by_history = service.recommend(history=history_ids, k=5)
    assert [i.news_id for i in by_user.items] == [i.news_id for i in by_history.items]


def test_unknown_user_and_ids_and_limits(service):
    with pytest.raises(UnknownUserError, match="unknown user 'nobody'"):
        service.recommend(user_id="nobody")
    known = str(service.dataset.news_idx_to_id[1])
    with pytest.raises(UnknownNewsError, match="NOPE1, NOPE2"):
        service.recommend(history=[known, "NOPE1", "NOPE2"])
    rec = service.recommend(history=[known, "NOPE1"], ignore_unknown=True, k=3)
    assert rec.ignored_ids == ["NOPE1"] and rec.history_used == 1 and len(rec.items) == 3
    with pytest.raises(NewsrecError, match="serve.max_k"):
        service.recommend(history=[known], k=21)
    with pytest.raises(NewsrecError, match="serve.max_history"):
        service.recommend(history=[known] * 31)
    empty = service.recommend(history=[], k=4)  # no clicks: still a valid answer
    assert len(empty.items) == 4 and all(np.isfinite(i.score) for i in empty.items)


def test_fresh_news_added_then_retrieved_and_saved(service, serving_dirs, tmp_path):
    category = serving_dirs.dataset.categories["category"][1]
    title = str(serving_dirs.dataset.news["title"][0])  # same words as a known news: same tokens
    key = service.add_news("FRESH-1", title, category=category)
    assert key == serving_dirs.dataset.n_news + 1 and "FRESH-1" in {service.news_id_of(key)}
    with pytest.raises(DuplicateNewsError):
        service.add_news("FRESH-1", "again")
    with pytest.raises(DuplicateNewsError):
        service.add_news(str(serving_dirs.dataset.news_idx_to_id[1]), "a known id")
    fresh_vec = service.index.vectors_of(np.array([key]))
    # retrieval runs over the grown pool: equal to brute force over every vector, fresh one included
    for history in ([], [str(serving_dirs.dataset.news_idx_to_id[i]) for i in (1, 2, 3)]):
        rec = service.recommend(history=history, k=20)
        user_vec = service.encode_history(service.resolve_history(history, ignore_unknown=False)[0])
        all_scores = service.index.vectors @ user_vec  # row i holds key i + 1
        all_scores[[service.key_of(h) - 1 for h in history]] = -np.inf
        top = np.argsort(-all_scores, kind="stable")[:20] + 1
        # the same top 20 up to ties: the category-lift block gives news of one subcategory equal
        # parts of their scores, and an untrained deep part separates them by rounding only
        np.testing.assert_allclose([i.score for i in rec.items], all_scores[top - 1], rtol=0, atol=1e-5)
        for item in rec.items:
            assert all_scores[service.key_of(item.news_id) - 1] == pytest.approx(item.score, abs=1e-5)
    # the fresh news as the only click: it is encoded from the index and never recommended back
    rec = service.recommend(history=["FRESH-1"], k=20)
    assert "FRESH-1" not in {i.news_id for i in rec.items} and rec.history_used == 1
    with torch.inference_mode():
        expected_user = service.model.encode_user(torch.from_numpy(fresh_vec)[None],
                                                  torch.ones(1, 1, dtype=torch.bool))[0].numpy()
    np.testing.assert_allclose(service.encode_history(np.array([key])), expected_user, rtol=1e-5)
    out = tmp_path / "index"
    service.save(out)
    reloaded = Recommender.load(serving_dirs.model_dir, out)
    assert reloaded.key_of("FRESH-1") == key
    np.testing.assert_allclose(reloaded.index.vectors_of(np.array([key])), fresh_vec)


def test_fresh_title_tokens_match_ingest(service, serving_dirs):
    dataset = serving_dirs.dataset
    for idx in (1, 2, dataset.n_news):
        title = str(dataset.news.filter(dataset.news["news_idx"] == idx)["title"][0])
        fresh = service.news_features().fresh([title], [0], [0])["title_tokens"][0]
        np.testing.assert_array_equal(fresh, dataset.title_tokens[idx])


def test_index_refused_for_another_model(serving_dirs, tmp_path):
    from newsrec.inference.model_io import build_model, save_model

    other = tmp_path / "other_model"
    cfg = config_from_dict({**SMALL_MODEL, "model": {**SMALL_MODEL["model"], "hidden_size": 16}})
    model = build_model(cfg, serving_dirs.dataset)
    save_model(other, model, cfg, dataset=serving_dirs.dataset)
    with pytest.raises(ArtifactError, match=f"{model.news_dim}-d"):
        Recommender.load(other, serving_dirs.index_dir)


def test_cli_index_and_recommend(serving_dirs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "idx"
    result = runner.invoke(main, ["index", "--model", str(serving_dirs.model_dir), "--data",
                                  str(serving_dirs.data_dir), "--out", str(out), "-o", "index.kind=hnsw"])
    assert result.exit_code == 0, result.output
    assert "kind hnsw" in result.output and load_index(out).kind == "hnsw"
    user = a_user_with_history(serving_dirs.dataset)
    result = runner.invoke(main, ["recommend", "--model", str(serving_dirs.model_dir), "--index", str(out),
                                  "--user", user, "-k", "4"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()[:2].rstrip(".").isdigit()]
    assert len(lines) == 4
    result = runner.invoke(main, ["recommend", "--model", str(serving_dirs.model_dir), "--index", str(out),
                                  "--user", "nobody"])
    assert result.exit_code == 1 and "unknown user 'nobody'" in result.output
    result = runner.invoke(main, ["recommend", "--model", str(serving_dirs.model_dir), "--index", str(out)])
    assert result.exit_code == 2 and "exactly one of --user" in result.output


def test_search_settings_given_at_load_replace_the_built_ones(serving_dirs):
    from newsrec.config import IndexConfig

    built = Recommender.load(serving_dirs.model_dir, serving_dirs.index_dir)
    assert built.index.params["search_threads"] != 3
    tuned = Recommender.load(serving_dirs.model_dir, serving_dirs.index_dir, index_cfg=IndexConfig(search_threads=3))
    assert tuned.index.params["search_threads"] == 3
