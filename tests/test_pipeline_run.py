"""The whole pipeline end to end on a tiny generated world, with MLflow tracking on: every stage
runs, the comparison table holds every model, the submission is valid, the parent run has a nested
run per stage, and a second run skips every stage."""
from __future__ import annotations

import json

import pytest

from newsrec.config import config_from_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config(tmp_path):
    return config_from_dict({
        "data": {"title_len": 12, "history_len": 20},
        "model": {"embedding_dim": 32, "hidden_size": 32, "num_heads": 4, "pooling_hidden": 16},
        "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 256},
        "rerank": {"hidden_size": 16, "num_heads": 2, "epochs": 1, "hard_negative_pool": 20},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "pipeline-test"},
        "pipeline": {"name": "tiny", "root": str(tmp_path / "runs"), "source": "synth", "synth_size": "tiny",
                     "top_k": 10},
    })


def test_pipeline_runs_every_stage_then_skips_them(tmp_path):
    import mlflow

    from newsrec.data.artifact import open_dataset
    from newsrec.eval.submission import check_submission
    from pipelines.run import run

    config = _config(tmp_path)
    lines: list[str] = []
    first = run(config, echo=lines.append)
    names = [s.name for s in first.stages]
    assert {"synth", "ingest", "train", "train_mhsa", "rerank", "index", "score", "submit"} <= set(names)
    assert not any(s.skipped for s in first.stages)
    table = first.table
    assert {"Fastformer", "Fastformer + re-ranker", "MHSA (NRMS)", "Popularity (train CTR)",
            "Logistic regression (history features)", "Category share-lift",
            "Oracle (true probabilities)"} <= set(table)
    for row in table.values():
        assert 0.0 <= row["auc"] <= 1.0
    test = open_dataset(first.paths["dataset"]).impressions("test")
    assert check_submission(first.paths["submission"], test).impressions == len(test)
    summary = json.loads((first.root / "summary.json").read_text())
    parent = summary["mlflow_parent_run"]
    client = mlflow.tracking.MlflowClient(tracking_uri=config.tracking.tracking_uri)
    parent_run = client.get_run(parent)
    assert "MHSA_NRMS_auc" in parent_run.data.metrics
    experiment = client.get_experiment_by_name("pipeline-test")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    names_run = {r.info.run_name for r in children}
    assert {"rerank", "index", "score", "submit"} <= names_run and len(names_run) >= 8, names_run

    second = run(config, echo=lines.append)
    assert all(s.skipped for s in second.stages), [(s.name, s.skipped) for s in second.stages]
    assert second.table["Fastformer"]["auc"] == pytest.approx(table["Fastformer"]["auc"])


    # fitting the final model on train,dev leaves the dev table's stages as they were and refits
    # only what serves: the final model and its re-ranker, then index, scores and submission
    from newsrec.utils.io import read_json
    from pipelines.run import report

    refit = config_from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "fit_splits": "train,dev"}})
    third = run(refit, echo=lines.append)
    ran = {s.name for s in third.stages if not s.skipped}
    assert ran == {"train_final", "rerank_final", "index", "score", "submit"}, ran
    assert third.table["Fastformer"]["auc"] == pytest.approx(table["Fastformer"]["auc"])
    table_model = read_json(third.paths["model"] / "model.json")["extra"]
    final_model = read_json(third.paths["final_model"] / "model.json")["extra"]
    assert table_model["fit_splits"] == ["train"] and table_model["reported_splits"] == ["dev"]
    assert final_model["fit_splits"] == ["train", "dev"] and final_model["reported_splits"] == []
    dataset = open_dataset(third.paths["dataset"])
    assert final_model["holdout"]["fit_impressions"] == len(dataset.impressions("train")) + len(
        dataset.impressions("dev"))
    assert check_submission(third.paths["submission"], test).impressions == len(test)
    assert "final      :" in report(third, refit)
    # the table's re-ranker learns from the retriever's own held-out slice (out of sample for it);
    # the final retriever trained on every train row, so the final re-ranker refits a first stage
    guard = read_json(third.paths["reranker"] / "reranker.json")["guard"]
    final_guard = read_json(third.paths["final_reranker"] / "reranker.json")["guard"]
    assert guard["first_stage_source"] == "retriever"
    assert final_guard["first_stage_source"] == "refit"
