"""Model selection on a held-out latest slice of the fit log; dev only reported; --fit-splits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import config_from_dict
from newsrec.data import schema
from newsrec.data.artifact import concat_impressions, open_dataset
from newsrec.errors import ArtifactError, ConfigError
from newsrec.train import fit, loop
from newsrec.train.loop import split_fit_log
from tests.test_train import SMALL_MODEL, _assert_same_weights
from tests.train_fixtures import write_known_answer_artifact

CLI_OVERRIDES = ["data.title_len=8", "data.history_len=6", "model.hidden_size=32", "model.num_heads=4",
                 "model.embedding_dim=32", "model.pooling_hidden=32", "train.epochs=1",
                 "train.batch_size=32", "train.lr=0.003", "train.warmup_steps=2", "train.num_threads=1",
                 "train.eval_batch_size=256", "tracking.enabled=false"]


def _config(**train):
    opts = {"epochs": 2, "batch_size": 32, "lr": 0.003, "warmup_steps": 2, "num_workers": 1,
            "early_stopping_patience": 0, "eval_batch_size": 256, "num_threads": 1}
    opts.update(train)
    return config_from_dict({"data": {"title_len": 8, "history_len": 6}, "model": dict(SMALL_MODEL),
                             "train": opts, "tracking": {"enabled": False}})


def _rewrite(root: Path, split: str, **columns) -> None:
    path = root / schema.behaviors_file(split)
    df = pl.read_parquet(path).with_columns(**{k: pl.Series(k, v, dtype=pl.read_parquet(path)[k].dtype)
                                               for k, v in columns.items()})
    df.write_parquet(path)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory) -> Path:
    """Known-answer data whose impression times are out of file order, with ties, and a labelled dev
    whose times interleave with train's; plus an unlabelled test split."""
    root = write_known_answer_artifact(tmp_path_factory.mktemp("shuffled") / "data")
    rng = np.random.default_rng(7)
    for split, shift in (("train", 0), ("dev", 30)):
        n = len(pl.read_parquet(root / schema.behaviors_file(split)))
        minutes = rng.integers(0, n // 2, size=n) + shift  # many ties
        times = [np.datetime64("2019-11-09T00:00:00") + np.timedelta64(int(m), "m") for m in minutes]
        _rewrite(root, split, time=[t.astype("datetime64[us]").item() for t in times])
    test = pl.read_parquet(root / schema.behaviors_file("dev")).with_columns(
        pl.lit(None, dtype=pl.List(pl.Int8)).alias("labels"))
    test.write_parquet(root / schema.behaviors_file("test"))
    return root


def _expected_holdout_ids(dataset, splits: list[str], fraction: float) -> tuple[set, set]:
    """Independently: rows of the union sorted by (time, position in the union); the last ones."""
    rows = []
    for s in splits:
        imp = dataset.impressions(s)
        rows += [(imp.time[i], s, int(imp.impression_id[i])) for i in range(len(imp))]
    keyed = sorted(range(len(rows)), key=lambda k: (rows[k][0], k))
    n_holdout = math.ceil(fraction * len(rows))
    held = {rows[k][1:] for k in keyed[len(rows) - n_holdout:]}
    kept = {rows[k][1:] for k in keyed[:len(rows) - n_holdout]}
    return held, kept


def _tagged(impressions, dataset, splits):
    """(split, impression_id) of each row, found by matching id and time back to the splits."""
    out = set()
    for iid, t in zip(impressions.impression_id, impressions.time):
        owners = [s for s in splits if np.any((dataset.impressions(s).impression_id == iid)
                                              & (dataset.impressions(s).time == t))]
        assert len(owners) == 1
        out.add((owners[0], int(iid)))
    return out


@pytest.mark.parametrize("splits,fraction", [(["train"], 0.1), (["train", "dev"], 0.25)])
def test_holdout_is_exactly_the_latest_impressions_and_disjoint_from_training(shuffled, splits, fraction):
    dataset = open_dataset(shuffled)
    log = split_fit_log(dataset, _config(fit_splits=",".join(splits), holdout_fraction=fraction))
    held, kept = _expected_holdout_ids(dataset, splits, fraction)
    assert _tagged(log.holdout, dataset, splits) == held
    assert _tagged(log.train, dataset, splits) == kept
    assert not held & kept and len(log.holdout) + len(log.train) == sum(len(dataset.impressions(s)) for s in splits)
    assert log.train.time.max() <= log.holdout.time.min()
    assert np.all(np.diff(log.holdout.time.astype(np.int64)) >= 0)  # held-out rows in time order
    d = log.definition
    assert (d["holdout_impressions"], d["train_impressions"]) == (len(held), len(kept))
    assert d["fit_splits"] == splits and d["selection"] == "holdout"
    assert d["holdout_time_from"] == str(np.datetime_as_string(log.holdout.time.min(), "s"))
    # candidates, labels and histories travel with their rows
    for part in (log.holdout, log.train):
        for i in range(len(part)):
            src = next(dataset.impressions(s) for s in splits
                       if np.any((dataset.impressions(s).impression_id == part.impression_id[i])
                                 & (dataset.impressions(s).time == part.time[i])))
            j = int(np.flatnonzero((src.impression_id == part.impression_id[i]) & (src.time == part.time[i]))[0])
            assert np.array_equal(part.candidates_of(i), src.candidates_of(j))
            assert np.array_equal(part.labels_of(i), src.labels_of(j))
            assert np.array_equal(part.history_of(i), src.history_of(j))


def test_holdout_fraction_zero_keeps_every_row_for_training(shuffled):
    dataset = open_dataset(shuffled)
    log = split_fit_log(dataset, _config(holdout_fraction=0.0))
    assert log.holdout is None and len(log.train) == len(dataset.impressions("train"))
    assert np.array_equal(log.train.impression_id, dataset.impressions("train").impression_id)


def test_concat_impressions_keeps_every_row(shuffled):
    dataset = open_dataset(shuffled)
    train, dev = dataset.impressions("train"), dataset.impressions("dev")
    a, b = train.select(np.array([5, 0, 3])), dev.select(np.array([2, 9]))
    both = concat_impressions([a, b])
    assert both.split == "train+dev" and len(both) == 5
    for i, (src, j) in enumerate([(a, 0), (a, 1), (a, 2), (b, 0), (b, 1)]):
        assert both.impression_id[i] == src.impression_id[j] and both.time[i] == src.time[j]
        assert np.array_equal(both.history_of(i), src.history_of(j))
        assert np.array_equal(both.candidates_of(i), src.candidates_of(j))
        assert np.array_equal(both.labels_of(i), src.labels_of(j))
    with pytest.raises(ArtifactError, match="labelled and unlabelled"):
        concat_impressions([a, dataset.impressions("test")])


def _fake_metrics(sequences: dict[str, list[float]], calls: list[tuple[str, int]]):
    """An evaluate_split that returns a known AUC per split and call, recording what it scored."""
    def fake(model, dataset, impressions, *, config, device):
        name = "dev" if impressions.split == "dev" else "holdout"
        seen = sum(1 for n, _ in calls if n == name)
        calls.append((name, len(impressions)))
        auc = sequences[name][seen]
        return {"auc": auc, "mrr": auc / 2, "ndcg@5": auc / 3, "ndcg@10": auc / 4,
                "impressions": len(impressions)}
    return fake


def test_selection_follows_holdout_not_dev(shuffled, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loop, "evaluate_split",
                        _fake_metrics({"holdout": [0.6, 0.8, 0.7], "dev": [0.9, 0.5, 0.95]}, calls))
    result = fit(_config(epochs=3), data_dir=shuffled, out_dir=tmp_path / "m")
    assert result.best_epoch == 1  # dev would have picked epoch 2 (or 0)
    assert result.holdout_metrics["auc"] == 0.8 and result.metrics["auc"] == 0.5
    n_holdout = math.ceil(0.1 * len(open_dataset(shuffled).impressions("train")))
    assert ("holdout", n_holdout) in calls and len(calls) == 6
    extra = json.loads((tmp_path / "m" / "model.json").read_text())["extra"]
    assert extra["best_epoch"] == 1 and extra["metrics"]["auc"] == 0.5
    assert extra["holdout_metrics"]["auc"] == 0.8 and extra["holdout"]["holdout_impressions"] == n_holdout
    assert extra["reported_splits"] == ["dev"] and extra["selection"] == "best held-out AUC"
    assert [h["dev"]["auc"] for h in extra["history"]] == [0.9, 0.5, 0.95]


def test_early_stopping_counts_holdout_epochs_only(shuffled, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loop, "evaluate_split", _fake_metrics(
        {"holdout": [0.8, 0.7, 0.6, 0.9, 0.9], "dev": [0.5, 0.6, 0.7, 0.8, 0.9]}, calls))
    result = fit(_config(epochs=5, early_stopping_patience=2), data_dir=shuffled, out_dir=tmp_path / "m")
    assert result.stopped_early and result.epochs_trained == 3 and result.best_epoch == 0
    assert result.metrics["auc"] == 0.5


def test_no_selection_keeps_the_last_epoch(shuffled, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loop, "evaluate_split", _fake_metrics({"dev": [0.9, 0.5]}, calls))
    result = fit(_config(epochs=2, holdout_fraction=0.0, early_stopping_patience=1), data_dir=shuffled,
                 out_dir=tmp_path / "m")
    assert result.best_epoch == 1 and result.epochs_trained == 2 and not result.stopped_early
    assert result.metrics["auc"] == 0.5 and result.holdout_metrics == {}
    assert [name for name, _ in calls] == ["dev", "dev"]
    extra = json.loads((tmp_path / "m" / "model.json").read_text())["extra"]
    assert extra["selection"] == loop.NO_SELECTION and extra["holdout"]["holdout_impressions"] == 0


def test_resume_with_holdout_equals_a_straight_run(shuffled, tmp_path):
    cfg = _config(epochs=2, checkpoint_every_steps=3, early_stopping_patience=1)
    straight = fit(cfg, data_dir=shuffled, out_dir=tmp_path / "straight")
    fit(cfg, data_dir=shuffled, out_dir=tmp_path / "resumed", stop_after_steps=4)
    resumed = fit(cfg, data_dir=shuffled, out_dir=tmp_path / "resumed", resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert resumed.best_epoch == straight.best_epoch
    assert resumed.holdout_metrics["auc"] == pytest.approx(straight.holdout_metrics["auc"], abs=1e-9)
    assert resumed.metrics["auc"] == pytest.approx(straight.metrics["auc"], abs=1e-9)
    # changing the held-out slice between the two halves is refused
    fit(cfg, data_dir=shuffled, out_dir=tmp_path / "changed", stop_after_steps=2)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        fit(_config(epochs=2, checkpoint_every_steps=3, early_stopping_patience=1, holdout_fraction=0.2),
            data_dir=shuffled, out_dir=tmp_path / "changed", resume=True)


def _run_cli(data: Path, out: Path, *extra: str):
    args = ["train", "--data", str(data), "--out", str(out), *extra]
    for o in CLI_OVERRIDES:
        args += ["-o", o]
    return CliRunner().invoke(main, args)


def test_fit_splits_train_dev_trains_on_both_and_does_not_report_dev(shuffled, tmp_path, monkeypatch):
    fitted: list = []

    class RecordingBuilder(loop.BatchBuilder):
        def __init__(self, impressions, **kwargs):
            super().__init__(impressions, **kwargs)
            fitted.append((impressions, self))

    monkeypatch.setattr(loop, "BatchBuilder", RecordingBuilder)
    result = _run_cli(shuffled, tmp_path / "both", "--fit-splits", "train,dev")
    assert result.exit_code == 0, result.output
    dataset = open_dataset(shuffled)
    n_train, n_dev = len(dataset.impressions("train")), len(dataset.impressions("dev"))
    n_holdout = math.ceil(0.1 * (n_train + n_dev))
    impressions, builder = fitted[0]
    assert len(impressions) == n_train + n_dev - n_holdout
    held, kept = _expected_holdout_ids(dataset, ["train", "dev"], 0.1)
    assert _tagged(impressions, dataset, ["train", "dev"]) == kept
    assert {s for s, _ in kept} == {"train", "dev"}
    # samples: one per click of the kept rows of both splits
    clicks = 0
    for split, iid in kept:
        imp = dataset.impressions(split)
        clicks += int(imp.labels_of(int(np.flatnonzero(imp.impression_id == iid)[0])).sum())
    assert builder.n_samples == clicks
    assert "dev fitted on" in result.output and "dev (best epoch" not in result.output
    assert f"latest {n_holdout} of {n_train + n_dev} impressions of train,dev" in result.output
    extra = json.loads((tmp_path / "both" / "model.json").read_text())["extra"]
    assert extra["fit_splits"] == ["train", "dev"] and extra["reported_splits"] == []
    assert extra["metrics"] == {} and "dev fitted on" in extra["not_reported"]


@pytest.mark.parametrize("splits,message", [("train,test", "split 'test' has no labels"),
                                            ("train,foo", "train.fit_splits='train,foo'")])
def test_fit_splits_refuses_unlabelled_or_unknown_splits(shuffled, tmp_path, splits, message):
    result = _run_cli(shuffled, tmp_path / "m", "--fit-splits", splits)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_fit_splits_refuses_a_split_the_dataset_lacks(tmp_path):
    data = write_known_answer_artifact(tmp_path / "data")
    (data / schema.behaviors_file("dev")).unlink()
    with pytest.raises(ArtifactError, match="names 'dev'"):
        fit(_config(fit_splits="train,dev"), data_dir=data, out_dir=tmp_path / "m")


def test_a_holdout_without_measurable_impressions_fails_in_one_line(tmp_path):
    data = write_known_answer_artifact(tmp_path / "data")
    train = pl.read_parquet(data / schema.behaviors_file("train"))
    labels = train["labels"].to_list()
    labels[-1] = [1] * len(labels[-1])  # the latest impression: clicks only
    _rewrite(data, "train", labels=labels)
    with pytest.raises(ConfigError, match="none with both a click and a non-click.*raise train.holdout_fraction"):
        fit(_config(holdout_fraction=0.001), data_dir=data, out_dir=tmp_path / "m")


@pytest.mark.parametrize("key,value,message", [
    ("holdout_fraction", 1.0, "must be in \\[0, 1\\)"), ("holdout_fraction", -0.1, "must be in \\[0, 1\\)"),
    ("fit_splits", "", "expected distinct split names"), ("fit_splits", "train,train", "distinct"),
    ("fit_splits", "train,validation", "train.fit_splits='train,validation'")])
def test_config_validation(key, value, message):
    with pytest.raises(ConfigError, match=message):
        _config(**{key: value})
    assert _config(fit_splits=" train , dev ").train.fit_split_names == ["train", "dev"]
