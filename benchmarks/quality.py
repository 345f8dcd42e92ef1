"""One quality table: every model on several generated worlds and a real-text world, beside the
hand-made baselines, the history-only limit and the oracle, with the spread over seeds.

    python benchmarks/quality.py [--worlds default,cold-test,...] [--news PATH/news.tsv]
                                 [--seeds 0,1,2] [--size demo] [--work DIR] [-o key=value ...]
                                 [--report-only | --refit-reranker | --retrain]

For every (world, seed) cell: ``newsrec synth`` writes the world (``--news`` makes the ``real-*``
worlds: simulated users over a real MIND news.tsv), the test split is given its true labels from
``ground_truth/`` (the generator knows them; MIND's own test has none), everything is ingested, and
then every row is scored on dev and on test:

- oracle: the generator's true click probabilities;
- history-only limit: what a score that sees only the history (and, separately, the true
  popularity) can reach, where the generator computes it;
- popularity, heuristic (category/subcategory share-lift), title-match (the content-based score:
  LSA cosine of the candidate's title to the history's), logreg (logistic regression over
  history-share, entity-overlap, smoothed-CTR and history-length features): ``evaluate --baseline``;
- Fastformer (``configs/demo.yaml``), MHSA (``configs/nrms_mhsa.yaml``: the same but the layer),
  and Fastformer + re-ranker, each trained with selection on the latest slice of the training log.

Dev and test only report; nothing is selected on them. "test cold" is the test impressions whose
candidates were all unseen in training (the MIND test week's situation). Each finished cell is saved
under ``--work`` and skipped when the script runs again, so an interrupted run resumes;
``--refit-reranker`` fits only the re-ranker again in saved cells (over their trained first stage)
and re-scores its rows; ``--retrain`` trains every model of a saved cell again over its saved world
(after a config change) and re-scores their rows, skipping cells already trained with the same
configs (the table leaves out cells trained with other configs). Writes
docs/benchmarks/quality.{json,png} and prints the table (mean ± std over the seeds that finished).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import statistics
import sys
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, use_agg_backend, write_results  # noqa: E402

import numpy as np  # noqa: E402

from newsrec.config import load_config  # noqa: E402
from newsrec.data.artifact import open_dataset  # noqa: E402
from newsrec.data.ingest import ingest  # noqa: E402
from newsrec.data.synth import generate  # noqa: E402
from newsrec.eval.evaluate import evaluate, seen_news_mask  # noqa: E402
from newsrec.eval.metrics import compute_metrics  # noqa: E402
from newsrec.train import fit  # noqa: E402
from newsrec.utils.io import atomic_dir, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")
SPLITS = ("dev", "test", "test_cold")
GENERATED_WORLDS = ("default", "cold-test", "uniform-exposure", "entity-interest", "drift", "text-topics")
# name -> generator world; real-text-cold: the cold-test world over real news (its test week shows
# only news unseen in training, so "test cold" holds thousands of impressions, not a few dozen)
REAL_WORLDS = {"real-text": "default", "real-text-cold": "cold-test", "real-text-topics": "text-topics"}
BASELINE_ROWS = ("popularity", "heuristic", "title-match", "logreg")
ROWS = ("oracle", "history-only", "history-only + popularity", *BASELINE_ROWS,
        "MHSA", "Fastformer", "Fastformer + re-ranker", "Fastformer + re-ranker (forced)")


# ---------------------------------------------------------------------------------------------
# one cell


def labelled_test(synth_dir: Path, out_dir: Path) -> Path:
    """A MIND folder holding the test split with its true labels (from ground_truth/) so that it can
    be ingested and evaluated like dev. The candidates' order is checked against the truth."""
    import polars as pl

    truth = pl.read_parquet(synth_dir / "ground_truth" / "test_truth.parquet")
    labels = {int(i): (c, l) for i, c, l in zip(truth["impression_id"], truth["candidates"], truth["label"])}
    with zipfile.ZipFile(synth_dir / "MINDsynth_test.zip") as zf:
        members = {Path(n).name: n for n in zf.namelist()}
        news = zf.read(members["news.tsv"])
        behaviors = zf.read(members["behaviors.tsv"]).decode("utf-8")
        extra = {name: zf.read(members[name]) for name in ("entity_embedding.vec", "relation_embedding.vec")
                 if name in members}
    lines = []
    for line in io.StringIO(behaviors):
        fields = line.rstrip("\n").split("\t")
        candidates, truth_labels = labels[int(fields[0])]
        listed = fields[4].split()
        if listed != list(candidates):
            raise RuntimeError(f"test impression {fields[0]}: candidates differ from ground truth")
        fields[4] = " ".join(f"{c}-{int(y)}" for c, y in zip(listed, truth_labels))
        lines.append("\t".join(fields))
    with atomic_dir(out_dir) as tmp:
        (tmp / "news.tsv").write_bytes(news)
        (tmp / "behaviors.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
    return out_dir


def split_metrics(dataset: Any, split: str, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Metrics on ``split`` and, for test, on its impressions whose candidates are all unseen in train."""
    imp = dataset.impressions(split)
    out = {split: _plain(compute_metrics(imp.labels, scores, imp.candidate_offsets))}
    if split == "test":
        seen = seen_news_mask(dataset)[imp.candidates]
        starts, ends = imp.candidate_offsets[:-1], imp.candidate_offsets[1:]
        any_seen = np.add.reduceat(seen.astype(np.int64), starts[ends > starts]) > 0
        rows = np.flatnonzero(ends > starts)[~any_seen]
        if len(rows):
            cold = imp.select(rows)
            keep = np.concatenate([np.arange(starts[r], ends[r]) for r in rows])
            out["test_cold"] = _plain(compute_metrics(cold.labels, scores[keep], cold.candidate_offsets))
            out["test_cold"]["impressions"] = int(len(rows))
    return out


def _plain(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: (None if metrics[k] is None or (isinstance(metrics[k], float) and math.isnan(metrics[k]))
                else float(metrics[k])) for k in METRICS if k in metrics}


def run_cell(world: str, seed: int, *, size: str, news: Path | None, work: Path, config: Path,
             mhsa_config: Path, overrides: list[str], echo: Callable[[str], None]) -> dict[str, Any]:
    cell_dir = work / world / f"seed{seed}"
    synth_dir, data_dir, models = cell_dir / "synth", cell_dir / "dataset", cell_dir / "models"
    generator_world = REAL_WORLDS.get(world, world)
    news_path = news if world in REAL_WORLDS else None
    timing: dict[str, float] = {}
    started = time.perf_counter()
    summary = generate(synth_dir, size=size, seed=seed, world=generator_world, news_path=news_path)
    timing["synth_s"] = time.perf_counter() - started
    test_dir = labelled_test(synth_dir, cell_dir / "test-labelled")
    cfg = load_config(config, [*overrides, "tracking.enabled=false"])
    started = time.perf_counter()
    ingest(cfg, train=synth_dir / "MINDsynth_train.zip", dev=synth_dir / "MINDsynth_dev.zip", test=test_dir,
           out_dir=data_dir)
    timing["ingest_s"] = time.perf_counter() - started
    dataset = open_dataset(data_dir)

    rows: dict[str, dict[str, Any]] = {}
    for key, name in (("oracle", "oracle"), ("history_only", "history-only"),
                      ("history_only_popularity", "history-only + popularity")):
        if summary.get(key):
            rows[name] = {split: _plain(summary[key][split]) for split in ("dev", "test") if split in summary[key]}

    scored = _scorer(dataset, rows, timing, f"{world} seed {seed}", echo)
    baseline_rows(data_dir, scored, BASELINE_ROWS)

    guard = model_rows(dataset, models, rows, timing, seed=seed, config=config, mhsa_config=mhsa_config,
                       overrides=overrides, scored=scored)
    return {"world": world, "seed": seed, "size": size, "rows": rows, "timing": timing, "guard": guard,
            "synth": {k: summary.get(k) for k in ("users", "news", "splits")}}


def model_rows(dataset: Any, models: Path, rows: dict[str, Any], timing: dict[str, float], *, seed: int,
               config: Path, mhsa_config: Path, overrides: list[str], scored: Callable[..., None]) -> dict[str, Any]:
    """Train MHSA and Fastformer over the cell's dataset, then the re-ranker, and score their rows;
    returns the re-ranker's guard record."""
    for name, path in (("MHSA", mhsa_config), ("Fastformer", config)):
        t0 = time.perf_counter()
        model_cfg = load_config(path, [*overrides, "tracking.enabled=false", f"train.seed={seed}"])
        fit(model_cfg, data_dir=dataset.root, out_dir=models / name.lower())
        timing[f"{name}_train_s"] = time.perf_counter() - t0
        scored(name, _model_scores(dataset.root, models / name.lower()))
    return rerank_rows(dataset, models, rows, timing, seed=seed, config=config, overrides=overrides, scored=scored)


def _scorer(dataset: Any, rows: dict[str, Any], timing: dict[str, float], label: str,
            echo: Callable[[str], None]) -> Callable[[str, Callable[[str], np.ndarray]], None]:
    """``scored(name, score)``: put row ``name``'s dev and test metrics (``score(split)`` gives the
    split's candidate scores) into ``rows`` and its time into ``timing``."""
    def scored(name: str, score: Callable[[str], np.ndarray]) -> None:
        t0 = time.perf_counter()
        try:
            result: dict[str, Any] = {}
            for split in ("dev", "test"):
                result.update(split_metrics(dataset, split, score(split)))
            rows[name] = result
        except Exception as exc:  # one row failing must not lose the others; it is reported
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
            echo(traceback.format_exc())
        timing[f"{name}_s"] = time.perf_counter() - t0
        dev_auc = rows[name].get("dev", {}).get("auc")
        echo(f"  {label}: {name:<24} dev AUC {dev_auc if dev_auc is None else round(dev_auc, 4)}")
    return scored


def _model_scores(data_dir: Path, model_dir: Path, reranker: Path | None = None,
                  use: str | None = None) -> Callable[[str], np.ndarray]:
    return lambda split: evaluate(model_dir, data_dir, split=split, reranker=reranker, rerank_use=use,
                                  log_to_mlflow=False, show_progress=False).scores


def baseline_rows(data_dir: Path, scored: Callable[..., None], names: tuple[str, ...]) -> None:
    from newsrec.eval.baselines import evaluate_baseline

    for baseline in names:
        scored(baseline, lambda split, b=baseline: evaluate_baseline(b, data_dir, split=split).scores)


def rerank_rows(dataset: Any, models: Path, rows: dict[str, Any], timing: dict[str, float], *, seed: int,
                config: Path, overrides: list[str], scored: Callable[..., None]) -> dict[str, Any]:
    """Fit the re-ranker over the cell's trained Fastformer and score its two rows (as its guard
    ships it, and forced on); returns the guard record."""
    from newsrec.train.rerank import fit_reranker

    t0 = time.perf_counter()
    rerank_cfg = load_config(config, [*overrides, "tracking.enabled=false", f"rerank.seed={seed}"])
    guard = fit_reranker(rerank_cfg, retriever_dir=models / "fastformer", data_dir=dataset.root,
                         out_dir=models / "reranker").guard
    timing["re-ranker_train_s"] = time.perf_counter() - t0
    scored("Fastformer + re-ranker", _model_scores(dataset.root, models / "fastformer", models / "reranker"))
    scored("Fastformer + re-ranker (forced)",
           _model_scores(dataset.root, models / "fastformer", models / "reranker", "always"))
    return guard


# ---------------------------------------------------------------------------------------------
# the table


def aggregate(cells: list[dict[str, Any]], worlds: list[str]) -> dict[str, Any]:
    """{row: {world: {split: {metric: {"mean", "std", "n"}}}}} over the seeds of each world."""
    table: dict[str, Any] = {}
    for row in ROWS:
        for world in worlds:
            for split in SPLITS:
                for metric in METRICS:
                    values = [c["rows"][row][split][metric] for c in cells
                              if c["world"] == world and row in c["rows"] and split in c["rows"][row]
                              and c["rows"][row][split].get(metric) is not None]
                    if values:
                        table.setdefault(row, {}).setdefault(world, {}).setdefault(split, {})[metric] = {
                            "mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return table


def markdown(table: dict[str, Any], worlds: list[str], *, split: str = "dev", metric: str = "auc") -> str:
    head = f"| {split} {metric} | " + " | ".join(worlds) + " |"
    lines = [head, "| --- |" + " --- |" * len(worlds)]
    for row in ROWS:
        if row not in table:
            continue
        cells = []
        for world in worlds:
            v = table[row].get(world, {}).get(split, {}).get(metric)
            cells.append("–" if v is None else f"{v['mean']:.3f} ± {v['std']:.3f}" + ("" if v["n"] == 3 else f" (n={v['n']})"))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(table: dict[str, Any], worlds: list[str]) -> dict[str, dict[str, float | None]]:
    """Per world: Fastformer − max(heuristic, title-match, logreg) dev AUC (target ≥ +0.01), Fastformer − MHSA
    (target ≥ −0.005), two-stage (as shipped) − first stage in AUC and nDCG@10 (targets ≥ −0.002),
    the same for the two-stage model forced on, history-only − Fastformer."""
    def dev_mean(row: str, world: str, metric: str = "auc") -> float | None:
        v = table.get(row, {}).get(world, {}).get("dev", {}).get(metric)
        return None if v is None else v["mean"]

    out = {}
    for world in worlds:
        ff = dev_mean("Fastformer", world)
        hand = [x for x in (dev_mean(b, world) for b in BASELINE_ROWS if b != "popularity") if x is not None]
        diff = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
        out[world] = {"fastformer_minus_best_handmade": diff(ff, max(hand) if hand else None),
                      "fastformer_minus_mhsa": diff(ff, dev_mean("MHSA", world)),
                      "two_stage_minus_first_stage": diff(dev_mean("Fastformer + re-ranker", world), ff),
                      "two_stage_minus_first_stage_ndcg10": diff(
                          dev_mean("Fastformer + re-ranker", world, "ndcg@10"), dev_mean("Fastformer", world, "ndcg@10")),
                      "forced_two_stage_minus_first_stage": diff(
                          dev_mean("Fastformer + re-ranker (forced)", world), ff),
                      "history_only_minus_fastformer": diff(dev_mean("history-only", world), ff)}
    return out


def plot(table: dict[str, Any], worlds: list[str]) -> None:
    use_agg_backend()
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r in table]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(worlds)), 4.2))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        means = [table[row].get(w, {}).get("dev", {}).get("auc", {}).get("mean", np.nan) for w in worlds]
        stds = [table[row].get(w, {}).get("dev", {}).get("auc", {}).get("std", 0.0) for w in worlds]
        ax.bar([j + i * width for j in range(len(worlds))], means, width, yerr=stds, label=row, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], worlds, fontsize=8)
    ax.set_ylim(0.45, None)
    ax.set_ylabel("dev AUC (mean ± std over seeds)")
    ax.set_title("Dev AUC by world")
    ax.legend(ncol=3, fontsize=7)
    save_figure(fig, "quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default=",".join((*GENERATED_WORLDS, *REAL_WORLDS)),
                        help="comma-separated; real-* worlds need --news")
    parser.add_argument("--news", type=Path, default=None, help="a real MIND news.tsv for the real-* worlds")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", default="demo", help="synth size of every generated world")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "runs" / "quality",
                        help="where cells are built and saved (resumable)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--mhsa", type=Path, default=REPO / "configs" / "nrms_mhsa.yaml")
    parser.add_argument("-o", "--override", dest="overrides", action="append", default=[])
    parser.add_argument("--report-only", action="store_true", help="aggregate the saved cells, train nothing")
    parser.add_argument("--refit-reranker", action="store_true",
                        help="in saved cells, fit the re-ranker again over their trained first stage "
                             "and re-score its rows (everything else is kept)")
    parser.add_argument("--retrain", action="store_true",
                        help="in saved cells, train every model again (MHSA, Fastformer, re-ranker) with "
                             "the given configs over the saved dataset and re-score their rows; the "
                             "world, its dataset and the other rows are kept")
    args = parser.parse_args()

    worlds = [w for w in args.worlds.split(",") if w]
    unknown = [w for w in worlds if w not in GENERATED_WORLDS and w not in REAL_WORLDS]
    if unknown:
        parser.error(f"unknown worlds {unknown}; valid: {', '.join((*GENERATED_WORLDS, *REAL_WORLDS))}")
    if any(w in REAL_WORLDS for w in worlds) and args.news is None:
        parser.error("the real-* worlds need --news PATH (a real MIND news.tsv)")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    # which configs a cell's models were trained with: --retrain skips cells already trained so
    config_stamp = hashlib.sha256(json.dumps([args.config.read_text(), args.mhsa.read_text(),
                                              args.overrides]).encode()).hexdigest()[:16]
    cells: list[dict[str, Any]] = []

    def echo(line: str) -> None:
        print(line, flush=True)

    for seed in seeds:  # seed-major: every world gets a first seed before any gets a second
        for world in worlds:
            path = args.work / world / f"seed{seed}" / "cell.json"
            if path.exists():
                cell = json.loads(path.read_text())
                missing = tuple(b for b in BASELINE_ROWS if b not in cell["rows"])
                stale = cell.get("config") != config_stamp
                if (missing or args.refit_reranker or (args.retrain and stale)) and not args.report_only:
                    dataset = open_dataset(path.parent / "dataset")
                    scored = _scorer(dataset, cell["rows"], cell["timing"], f"{world} seed {seed}", echo)
                if missing and not args.report_only:  # a baseline added after the cell was built
                    echo(f"[{world} seed {seed}: {', '.join(missing)}]")
                    baseline_rows(dataset.root, scored, missing)
                    write_json(path, cell)
                if args.retrain and stale and not args.report_only:
                    echo(f"[{world} seed {seed}: retrain]")
                    cell["guard"] = model_rows(dataset, path.parent / "models", cell["rows"], cell["timing"],
                                               seed=seed, config=args.config, mhsa_config=args.mhsa,
                                               overrides=args.overrides, scored=scored)
                    cell["config"] = config_stamp
                    write_json(path, cell)
                elif args.refit_reranker and not args.report_only:
                    echo(f"[{world} seed {seed}: re-ranker]")
                    cell["guard"] = rerank_rows(dataset, path.parent / "models", cell["rows"], cell["timing"],
                                                seed=seed, config=args.config, overrides=args.overrides,
                                                scored=scored)
                    write_json(path, cell)
                if cell.get("config") != config_stamp:  # the table describes the configs given
                    echo(f"[{world} seed {seed}: left out, its models were trained with other configs "
                         "than these (--retrain trains them again)]")
                    continue
                cells.append(cell)
                continue
            if args.report_only:
                continue
            print(f"[{world} seed {seed}]", flush=True)
            cell = run_cell(world, seed, size=args.size, news=args.news, work=args.work, config=args.config,
                            mhsa_config=args.mhsa, overrides=args.overrides, echo=echo)
            cell["config"] = config_stamp
            write_json(path, cell)
            cells.append(cell)

    table = aggregate(cells, worlds)
    result_checks = checks(table, worlds)
    for split, metric in (("dev", "auc"), ("dev", "ndcg@10"), ("test", "auc"), ("test_cold", "auc")):
        print(f"\n{markdown(table, worlds, split=split, metric=metric)}")
    print("\nper world (dev AUC): Fastformer − best hand-made (target ≥ +0.01) · Fastformer − MHSA "
          "(≥ −0.005) · two-stage − first stage (≥ −0.002), its nDCG@10 (≥ −0.002) · forced "
          "two-stage − first stage · history-only − Fastformer")
    for world, c in result_checks.items():
        print(f"  {world:<18} " + "  ".join("–" if v is None else f"{v:+.4f}" for v in c.values()))
    write_results("quality", {"worlds": worlds, "seeds": seeds, "size": args.size,
                              "news": args.news.name if args.news else None, "config": args.config.name,
                              "overrides": args.overrides, "table": table, "checks": result_checks,
                              "cells": cells})
    plot(table, worlds)


if __name__ == "__main__":
    main()
