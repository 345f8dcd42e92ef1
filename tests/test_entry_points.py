"""The same impressions through every entry point give the same scores.

A tiny generated data set whose behaviors hold histories longer than ``data.history_len``, news
clicked twice within the kept clicks, and empty histories; a model saved without training (its
scores depend on every kept click); a re-ranker around it with random weights (so that it moves
the scores). The model carries every wide block (category lift, title match), once with one user
vector and once with three interest vectors per user (scored by their maximum, retrieved by three
searches merged). Each entry point scores a handful of impressions: the ``evaluate`` library function,
training's dev evaluation, ``submit`` (its ranks), ``score`` (its CLI output), the service
(in-process, batched, over HTTP and the ``recommend`` CLI), the MLflow model loaded back with
``mlflow.pyfunc.load_model``, and two-stage scoring with the re-ranker. They must agree to 1e-5,
and the test checks that the chosen impressions would tell a path that cut, deduplicated or
padded histories differently.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import Config, IndexConfig, ServeConfig, TrackingConfig, config_from_dict
from newsrec.data.artifact import DatasetArtifact, Impressions, open_dataset
from newsrec.inference.histories import Histories
from newsrec.inference.model_io import load_model
from newsrec.inference.scoring import encode_all_news, score_histories

HISTORY_LEN = 5
RERANK_HISTORY_LEN = 3
ATOL = 1e-5
CONFIG = {"model": {"embedding_dim": 32, "hidden_size": 32, "num_heads": 4, "pooling_hidden": 16,
                    "position_embeddings": True, "title_match_dim": 16},
          "data": {"title_len": 12, "history_len": HISTORY_LEN},
          "train": {"eval_batch_size": 7},  # batches of several lengths: padding must not matter
          "rerank": {"hidden_size": 16, "num_heads": 2, "history_len": RERANK_HISTORY_LEN, "eval_batch_size": 5},
          "tracking": {"enabled": False}}


@dataclass
class World:
    root: Path
    data_dir: Path
    model_dir: Path
    index_dir: Path
    reranker_dir: Path
    dataset: DatasetArtifact
    config: Config
    rows: np.ndarray  # dev impressions every entry point scores
    reference: np.ndarray  # `evaluate`'s first-stage scores of every dev candidate
    two_stage: np.ndarray  # `evaluate`'s two-stage scores of every dev candidate


def _with_repeated_clicks(zip_path: Path) -> None:
    """Rewrite the behaviors of a MIND zip so that every fourth line with at least two clicks
    clicks its two latest news again (duplicates among the most recent clicks)."""
    with zipfile.ZipFile(zip_path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    lines = members["behaviors.tsv"].decode("utf-8").splitlines()
    for i, line in enumerate(lines):
        fields = line.split("\t")
        clicks = fields[3].split()
        if i % 4 == 0 and len(clicks) >= 2:
            fields[3] = " ".join(clicks + [clicks[-2], clicks[-1]])
            lines[i] = "\t".join(fields)
    members["behaviors.tsv"] = ("\n".join(lines) + "\n").encode("utf-8")
    with zipfile.ZipFile(zip_path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _pick_rows(imps: Impressions) -> np.ndarray:
    """Impressions covering each way histories can be cut: empty, shorter than, as long as and
    longer than history_len, and a repeated click among the kept ones."""
    lengths = imps.history_lengths
    recent = Histories.of_impressions(imps).recent(HISTORY_LEN)
    repeated = [i for i in range(len(imps)) if len(np.unique(recent.row(i))) < len(recent.row(i))]
    picks = [np.flatnonzero(lengths == 0)[:2], np.flatnonzero((lengths > 0) & (lengths < HISTORY_LEN))[:2],
             np.flatnonzero(lengths == HISTORY_LEN)[:1], np.flatnonzero(lengths > 3 * HISTORY_LEN)[:2],
             np.asarray(repeated[:3], dtype=np.int64)]
    assert all(len(p) for p in picks), "the data set lacks a kind of history the test needs"
    return np.unique(np.concatenate(picks))


def _write_reranker(world_root: Path, config: Config, dataset: DatasetArtifact, model_dir: Path) -> Path:
    """A re-ranker over the model's news vectors with random weights (its correction is not zero)."""
    from newsrec.data import schema
    from newsrec.inference.features import FEATURE_NAMES, EventLog, news_tables
    from newsrec.inference.rerank import save_reranker
    from newsrec.models.reranker import Reranker
    from newsrec.utils.io import sha256_file

    log = EventLog.of_dataset(dataset)
    vectors = encode_all_news(load_model(model_dir).model, dataset, show_progress=False).numpy()
    tables = news_tables(dataset, vectors, log)
    torch.manual_seed(1)
    model = Reranker(config.rerank, news_dim=vectors.shape[1], n_features=len(FEATURE_NAMES))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    return save_reranker(world_root / "reranker", model, config, retriever_dir=model_dir, dataset_root=dataset.root,
                         dataset_manifest_sha256=sha256_file(dataset.root / schema.MANIFEST), tables=tables,
                         mean_ctr=log.mean_ctr, log_end=log.end_seconds)


@pytest.fixture(scope="module", params=[1, 3], ids=["one-user-vector", "three-interests"])
def world(tmp_path_factory, request) -> World:
    from newsrec.data.ingest import ingest
    from newsrec.data.synth import generate
    from newsrec.eval.evaluate import evaluate
    from newsrec.inference.model_io import build_model, save_model
    from newsrec.serve.service import index_news

    root = tmp_path_factory.mktemp("entry_points")
    generate(root / "raw", size="tiny", seed=0)
    for split in ("dev", "test"):
        _with_repeated_clicks(root / "raw" / f"MINDsynth_{split}.zip")
    config = config_from_dict({**CONFIG, "model": {**CONFIG["model"], "user_interests": request.param}})
    ingest(config, train=root / "raw" / "MINDsynth_train.zip", dev=root / "raw" / "MINDsynth_dev.zip",
           test=root / "raw" / "MINDsynth_test.zip", out_dir=root / "data")
    dataset = open_dataset(root / "data")
    torch.manual_seed(0)
    model = build_model(config, dataset)
    with torch.no_grad():  # larger weights than at initialisation: scores far apart, every click counts
        for p in model.parameters():
            p.mul_(3.0)
        model.title_match.weight.fill_(0.05)  # the title match starts at 0: make it count here
    save_model(root / "model", model, config, dataset=dataset)
    index_news(root / "model", data_dir=root / "data", out_dir=root / "index", index_cfg=IndexConfig(kind="flat"))
    reranker_dir = _write_reranker(root, config, dataset, root / "model")
    rows = _pick_rows(dataset.impressions("dev"))
    plain = evaluate(root / "model", root / "data", log_to_mlflow=False, show_progress=False)
    two = evaluate(root / "model", root / "data", reranker=reranker_dir, rerank_use="always",
                   log_to_mlflow=False, show_progress=False)
    assert two.metrics["reranked"]
    return World(root, root / "data", root / "model", root / "index", reranker_dir, dataset, config, rows,
                 plain.scores, two.scores)


# ------------------------------------------------------------------------------------------------
# helpers


def _dev(world: World) -> Impressions:
    return world.dataset.impressions("dev")


def _candidate_positions(imps: Impressions, rows: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(imps.candidate_offsets[i], imps.candidate_offsets[i + 1]) for i in rows])


def _ids(world: World, idx: np.ndarray) -> list[str]:
    return [str(x) for x in world.dataset.news_idx_to_id[np.asarray(idx, dtype=np.int64)]]


def _assert_ranks_follow(ranks: list[int], scores: np.ndarray) -> None:
    """``ranks`` (1-based, one per candidate) order ``scores`` best first (ties within ATOL)."""
    order = np.argsort(np.asarray(ranks))
    assert sorted(ranks) == list(range(1, len(ranks) + 1))
    assert (np.diff(scores[order]) <= ATOL).all(), (ranks, scores)


def _submission_ranks(path: Path) -> dict[int, list[int]]:
    with zipfile.ZipFile(path) as z:
        text = z.read("prediction.txt").decode("utf-8")
    out = {}
    for line in text.splitlines():
        impression_id, ranks = line.split(" ")
        out[int(impression_id)] = [int(r) for r in ranks.strip("[]").split(",")]
    return out


# ------------------------------------------------------------------------------------------------
# the one truncation rule


def test_histories_keep_the_most_recent_clicks_as_clicked_and_pad_right():
    rows = [np.array([4, 7, 4, 9, 4, 2]), np.array([], dtype=np.int64), np.array([3, 3]), np.array([8])]
    histories = Histories.of_lists(rows)
    idx, mask = histories.padded(history_len=4)
    want = [r[-4:] for r in rows]  # an independent slice: the last four, repeats kept
    assert idx.shape == mask.shape == (4, 4)
    for b, w in enumerate(want):
        assert idx[b][mask[b]].tolist() == w.tolist()
        assert mask[b].tolist() == [True] * len(w) + [False] * (4 - len(w))  # right-padded
        assert (idx[b][~mask[b]] == 0).all()
    assert Histories.of_lists([np.array([], dtype=np.int64)]).padded(history_len=4)[0].shape == (1, 1)
    distinct, of_row = Histories.of_lists(rows + [np.array([1, 3, 3])]).distinct(2)
    assert of_row.tolist() == [0, 1, 2, 3, 2]  # [3, 3] twice: encoded once
    assert [distinct.row(j).tolist() for j in range(len(distinct))] == [[4, 2], [], [3, 3], [8]]
    with pytest.raises(ValueError, match="history_len"):
        histories.padded(history_len=0)


# ------------------------------------------------------------------------------------------------
# the impressions tell a path that reads histories differently


def test_the_impressions_tell_other_ways_of_reading_a_history(world):
    """Scoring the chosen impressions with the history cut one click longer, deduplicated, or
    with an empty history read as one padding click, moves their scores: a path that did so
    would fail the tests below."""
    imps = _dev(world)
    model = load_model(world.model_dir).model
    vectors = encode_all_news(model, world.dataset, show_progress=False)
    recent = Histories.of_impressions(imps).recent(HISTORY_LEN)

    def scores(histories: list[np.ndarray], history_len: int, rows: list[int]) -> np.ndarray:
        counts = imps.candidate_counts[rows]
        cands = np.concatenate([imps.candidates_of(i) for i in rows])
        return score_histories(model, vectors, Histories.of_lists(histories), cands, counts, history_len=history_len)

    lengths = imps.history_lengths[world.rows]
    long_rows = [int(i) for i in world.rows[lengths > HISTORY_LEN]]
    repeated = [int(i) for i in world.rows if len(np.unique(recent.row(i))) < len(recent.row(i))]
    empty = [int(i) for i in world.rows[lengths == 0]]
    assert long_rows and repeated and empty
    reference = {i: world.reference[_candidate_positions(imps, [i])] for i in world.rows}
    for i in long_rows:  # one click more
        other = scores([imps.history_of(i)], HISTORY_LEN + 1, [i])
        assert np.abs(other - reference[i]).max() > 100 * ATOL
    for i in repeated:  # each news once
        kept = recent.row(i)
        _, first = np.unique(kept, return_index=True)
        other = scores([kept[np.sort(first)]], HISTORY_LEN, [i])
        assert np.abs(other - reference[i]).max() > 100 * ATOL
    for i in empty:  # the padding news read as a click
        with torch.inference_mode():
            user = model.encode_user(torch.zeros(1, 1, model.news_dim), torch.ones(1, 1, dtype=torch.bool))
            cand = vectors[torch.from_numpy(imps.candidates_of(i).astype(np.int64))][None]
            other = model.score(user, cand)[0].numpy()
        assert np.abs(other - reference[i]).max() > 100 * ATOL
    assert np.std(world.reference) > 300 * ATOL  # scores far apart compared with the tolerance


# ------------------------------------------------------------------------------------------------
# first stage


def test_training_dev_evaluation_scores_like_evaluate(world, monkeypatch):
    from newsrec.eval import metrics
    from newsrec.train.loop import evaluate_split

    seen: list[np.ndarray] = []
    compute = metrics.compute_metrics

    def spy(labels, scores, offsets):
        seen.append(np.asarray(scores).copy())
        return compute(labels, scores, offsets)

    monkeypatch.setattr(metrics, "compute_metrics", spy)
    imps = _dev(world)
    model = load_model(world.model_dir).model
    model.train()  # as training leaves it
    out = evaluate_split(model, world.dataset, imps.select(world.rows), config=world.config,
                         device=torch.device("cpu"))
    assert model.training and np.isfinite(out["auc"])
    np.testing.assert_allclose(seen[0], world.reference[_candidate_positions(imps, world.rows)], atol=ATOL, rtol=0)


def _run_split_cli(world, command: str, out) -> None:
    """``newsrec COMMAND`` over the world's dev split, writing to ``out``; it must succeed."""
    result = CliRunner().invoke(main, [command, "--model", str(world.model_dir), "--data", str(world.data_dir),
                                       "--split", "dev", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_submit_ranks_follow_the_scores(world, tmp_path):
    out = tmp_path / "prediction.zip"
    _run_split_cli(world, "submit", out)
    ranks = _submission_ranks(out)
    imps = _dev(world)
    for i in world.rows:
        _assert_ranks_follow(ranks[int(imps.impression_id[i])], world.reference[_candidate_positions(imps, [i])])


def test_score_cli_writes_the_scores(world, tmp_path):
    from newsrec.eval.scoring import read_scores

    out = tmp_path / "scores"
    _run_split_cli(world, "score", out)
    frame = read_scores(out)
    imps = _dev(world)
    assert frame["impression_id"].to_list() == np.repeat(imps.impression_id, imps.candidate_counts).tolist()
    positions = _candidate_positions(imps, world.rows)
    np.testing.assert_allclose(frame["score"].to_numpy()[positions], world.reference[positions], atol=ATOL, rtol=0)


def _service(world: World, **kw):
    from newsrec.serve.service import Recommender

    n = world.dataset.n_news
    return Recommender.load(world.model_dir, world.index_dir,
                            serve_cfg=ServeConfig(retrieve_k=n, max_k=n, default_k=10, batch_max=8), **kw)


def _check_items(world: World, i: int, items: dict[str, float], scores: np.ndarray) -> None:
    """Every candidate of impression ``i`` the user has not clicked is recommended with its score."""
    imps = _dev(world)
    clicked = set(imps.history_of(i).tolist())
    cands = imps.candidates_of(i)
    checked = 0
    for news_id, idx, want in zip(_ids(world, cands), cands, scores[_candidate_positions(imps, [i])]):
        if int(idx) in clicked:
            assert news_id not in items  # clicked news are never recommended back
            continue
        assert abs(items[news_id] - want) <= ATOL, (i, news_id, items[news_id], want)
        checked += 1
    assert checked


def test_service_scores_like_evaluate_alone_batched_and_over_http(world):
    from fastapi.testclient import TestClient

    from newsrec.serve.app import create_app

    imps = _dev(world)
    n = world.dataset.n_news
    service = _service(world)
    try:
        for i in world.rows:  # one request at a time
            rec = service.recommend(history=_ids(world, imps.history_of(i)), k=n)
            assert rec.history_used == min(int(imps.history_lengths[i]), HISTORY_LEN)
            _check_items(world, int(i), {it.news_id: it.score for it in rec.items}, world.reference)
        sizes: list[int] = []
        service.on_batch = sizes.append

        async def together():
            return await asyncio.gather(*[service.recommend_async(history=_ids(world, imps.history_of(i)), k=n)
                                          for i in world.rows])

        for i, rec in zip(world.rows, asyncio.run(together())):  # requests of several lengths batched
            _check_items(world, int(i), {it.news_id: it.score for it in rec.items}, world.reference)
        assert max(sizes) > 1
        with TestClient(create_app(service, save_on_shutdown=False)) as client:
            for i in world.rows[:4]:
                response = client.post("/recommend", json={"history": _ids(world, imps.history_of(i)), "k": n})
                assert response.status_code == 200, response.text
                items = {it["news_id"]: it["score"] for it in response.json()["items"]}
                _check_items(world, int(i), items, world.reference)
    finally:
        service.close()


def test_recommend_cli_prints_the_scores(world):
    imps = _dev(world)
    i = int(next(r for r in world.rows if imps.history_lengths[r] > HISTORY_LEN))
    result = CliRunner().invoke(main, ["recommend", "--model", str(world.model_dir), "--index", str(world.index_dir),
                                       "--history", ",".join(_ids(world, imps.history_of(i))),
                                       "-k", str(world.dataset.n_news), "-o", f"serve.max_k={world.dataset.n_news}"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"({HISTORY_LEN} clicks used)" in result.output
    printed = {}
    for line in result.output.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[0].rstrip(".").isdigit():
            printed[parts[1]] = float(parts[2])
    cands = imps.candidates_of(i)
    want = world.reference[_candidate_positions(imps, [i])]
    clicked = set(imps.history_of(i).tolist())
    for news_id, idx, score in zip(_ids(world, cands), cands, want):
        if int(idx) not in clicked:
            assert abs(printed[news_id] - score) <= 5e-5 + ATOL  # printed with 4 decimals


def test_mlflow_model_scores_like_evaluate(world, tmp_path):
    import mlflow
    import pandas as pd

    from newsrec.train import tracking

    tracking_cfg = TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                  experiment="entry-points")
    with tracking.start_run(tracking_cfg, run_name="entry-points"):
        uri = tracking.log_model(world.model_dir, dataset=world.dataset)
    assert uri
    loaded = mlflow.pyfunc.load_model(uri)
    imps = _dev(world)
    frame = pd.DataFrame({"history": [" ".join(_ids(world, imps.history_of(i))) for i in world.rows],
                          "candidates": [" ".join(_ids(world, imps.candidates_of(i))) for i in world.rows]})
    got = loaded.predict(frame)["scores"]
    for r, i in enumerate(world.rows):
        np.testing.assert_allclose(np.asarray(got[r]), world.reference[_candidate_positions(imps, [i])],
                                   atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# two stages


def test_two_stage_scores_agree_across_evaluate_submit_and_the_library(world, tmp_path):
    from newsrec.eval.submission import submit
    from newsrec.inference.features import EventLog
    from newsrec.inference.rerank import load_reranker, score_impressions_two_stage

    imps = _dev(world)
    positions = _candidate_positions(imps, world.rows)
    assert np.abs(world.two_stage - world.reference).max() > 100 * ATOL  # the re-ranker moves scores
    reranker = load_reranker(world.reranker_dir, retriever_dir=world.model_dir)
    library = score_impressions_two_stage(load_model(world.model_dir), reranker, imps.select(world.rows),
                                          log=EventLog.of_dataset(world.dataset), show_progress=False)
    np.testing.assert_allclose(library, world.two_stage[positions], atol=ATOL, rtol=0)
    result = submit(world.model_dir, world.data_dir, out=tmp_path / "p.zip", split="dev",
                    reranker=world.reranker_dir, rerank_use="always", show_progress=False)
    assert "rerank.use=always" in result.rerank_decision
    ranks = _submission_ranks(tmp_path / "p.zip")
    for i in world.rows:
        _assert_ranks_follow(ranks[int(imps.impression_id[i])], world.two_stage[_candidate_positions(imps, [i])])


def test_service_reranks_like_the_replayed_log(world):
    """After the log's end the service's two-stage scores equal those of the same impressions
    scored with the log replayed to that moment (the path evaluate takes)."""
    from newsrec.inference.features import EventLog
    from newsrec.inference.rerank import load_reranker

    imps = _dev(world)
    reranker = load_reranker(world.reranker_dir)
    later = reranker.log_end() + 3600.0
    moved = dataclasses.replace(imps, time=np.full(len(imps), np.datetime64(int(later), "s")).astype(imps.time.dtype))
    want = reranker.score_impressions(moved, retrieval_scores=world.reference, log=EventLog.of_dataset(world.dataset),
                                      show_progress=False)
    service = _service(world, reranker_dir=world.reranker_dir, rerank_use="always")
    when = dt.datetime.fromtimestamp(later, tz=dt.timezone.utc).replace(tzinfo=None)
    try:
        for i in world.rows:
            rec = service.recommend(history=_ids(world, imps.history_of(i)), k=world.dataset.n_news, now=when)
            assert rec.reranked
            _check_items(world, int(i), {it.news_id: it.retrieval_score for it in rec.items}, world.reference)
            _check_items(world, int(i), {it.news_id: it.score for it in rec.items}, want)
    finally:
        service.close()
