"""MLflow tracking: a CLI training run leaves params, metrics, artifacts and a loadable model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import TrackingConfig
from newsrec.train import tracking
from tests.train_fixtures import write_known_answer_artifact

OVERRIDES = ["data.title_len=8", "data.history_len=6", "model.hidden_size=32", "model.num_heads=4",
             "model.embedding_dim=32", "model.pooling_hidden=32", "train.epochs=2", "train.batch_size=16",
             "train.lr=0.003", "train.warmup_steps=4", "train.log_every_steps=5", "train.num_threads=1",
             "train.eval_batch_size=256", "tracking.experiment=unit", "tracking.register_name=newsrec-unit"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    data = write_known_answer_artifact(tmp / "data")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = ["train", "--data", str(data), "--out", str(tmp / "model")]
    for o in OVERRIDES + [f"tracking.tracking_uri={uri}"]:
        args += ["-o", o]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp, uri, data, result.output


def test_cli_run_logs_params_metrics_and_artifacts(trained):
    tmp, uri, _, output = trained
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("unit")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id in output and "dev (best epoch" in output
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.hidden_size"] == "32"
    assert params["tracking.register_name"] == "newsrec-unit"
    assert int(params["train.samples"]) > 0
    assert run.data.tags["sys.world_size"] == "1"
    dev_auc = client.get_metric_history(run.info.run_id, "dev_auc")
    assert [m.step for m in dev_auc] == sorted(m.step for m in dev_auc) and len(dev_auc) == 2
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) >= 2 and all(np.isfinite(m.value) for m in losses)
    holdout_auc = client.get_metric_history(run.info.run_id, "holdout_auc")
    best = max(holdout_auc, key=lambda m: (m.value, -m.step))  # the first epoch of the best held-out AUC
    assert run.data.metrics["best_holdout_auc"] == pytest.approx(best.value)
    assert run.data.metrics["best_dev_auc"] == pytest.approx(next(m.value for m in dev_auc if m.step == best.step))
    for key in ("dev_mrr", "dev_ndcg_at_5", "dev_ndcg_at_10"):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "dataset")] == ["dataset/manifest.json"]
    versions = client.search_model_versions("name='newsrec-unit'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    mlflow.set_tracking_uri(uri)


def test_logged_model_loads_back_and_scores_like_the_model_dir(trained):
    tmp, uri, data, _ = trained
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from newsrec.data.artifact import open_dataset
    from newsrec.inference.model_io import load_model

    mlflow.set_tracking_uri(uri)
    run = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("unit").experiment_id])[0]
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert pyfunc.metadata.signature is not None
    # the logged input example scores through the loaded model (what `mlflow models serve` checks)
    from mlflow.models import Model
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model")
    example = Model.load(local).load_input_example(local)
    assert list(example.columns) == ["history", "candidates"] and len(example) == 1
    example_scores = pyfunc.predict(example)["scores"][0]
    assert len(example_scores) == len(example["candidates"][0].split()) == 3
    assert np.isfinite(example_scores).all()
    dataset = open_dataset(data)
    dev = dataset.impressions("dev")
    ids = dataset.news_idx_to_id
    rows = [0, 5]
    frame = pd.DataFrame({"history": [" ".join(ids[dev.history_of(i, 6)]) for i in rows],
                          "candidates": [" ".join(ids[dev.candidates_of(i)]) for i in rows]})
    scores = pyfunc.predict(frame)["scores"]
    loaded = load_model(tmp / "model").model
    for r, i in enumerate(rows):
        hist = torch.from_numpy(dev.history_of(i, 6).astype(np.int64))
        cand = torch.from_numpy(dev.candidates_of(i).astype(np.int64))
        cat, sub = (torch.from_numpy(a) for a in dataset.news_categories)
        tokens = torch.from_numpy(dataset.title_tokens.astype(np.int64))
        with torch.no_grad():
            hv = loaded.encode_news(tokens[hist], cat[hist], sub[hist])[None]
            user = loaded.encode_user(hv, torch.ones(1, len(hist), dtype=torch.bool))
            cv = loaded.encode_news(tokens[cand], cat[cand], sub[cand])[None]
            expected = loaded.score(user, cv)[0].numpy()
        np.testing.assert_allclose(np.array(scores[r]), expected, rtol=1e-5, atol=1e-5)


def test_log_evaluation_into_the_training_run_and_into_a_new_run(trained, tmp_path):
    tmp, uri, _, _ = trained
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=uri, experiment="unit")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.search_runs([client.get_experiment_by_name("unit").experiment_id])[0].info.run_id
    report = tmp_path / "metrics.json"
    report.write_text('{"auc": 0.5}')
    assert tracking.log_evaluation(cfg, run_id=run_id, metrics={"auc": 0.75, "ndcg@10": 0.5},
                                   artifacts=[report], prefix="eval_") == run_id
    run = client.get_run(run_id)
    assert run.data.metrics["eval_auc"] == 0.75 and run.data.metrics["eval_ndcg_at_10"] == 0.5
    assert "metrics.json" in {a.path for a in client.list_artifacts(run_id)}
    new_id = tracking.log_evaluation(cfg, run_id=None, metrics={"auc": 0.6})
    assert new_id != run_id and client.get_run(new_id).data.metrics["auc"] == 0.6


def test_nested_runs_and_disabled_tracking(trained):
    cfg = TrackingConfig(tracking_uri=trained[1], experiment="nest")
    with tracking.start_run(cfg, run_name="pipeline") as parent:
        with tracking.start_run(cfg, run_name="stage", nested=True) as child:
            tracking.log_metrics({"x": 1.0, "skipped": float("nan"), "label": "text"})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    got = client.get_run(child.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert got.data.metrics == {"x": 1.0}
    with tracking.start_run(TrackingConfig(enabled=False), run_name="off") as off:
        tracking.log_params({"a": 1})  # no active run: a no-op, no error
        assert off.run_id is None and not off.active


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(TrackingConfig()) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:5999"
    assert tracking.resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_metric_keys_are_valid_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name

    from newsrec.train.tracking import metric_key

    cases = {"ndcg@10": "ndcg_at_10", "MHSA (NRMS)_auc": "MHSA_NRMS_auc",
             "Fastformer + re-ranker_ndcg@5": "Fastformer_re-ranker_ndcg_at_5", "dev_auc": "dev_auc"}
    for name, expected in cases.items():
        assert metric_key(name) == expected
        _validate_metric_name(metric_key(name))  # raises on a name MLflow refuses
