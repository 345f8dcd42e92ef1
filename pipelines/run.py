"""The end-to-end pipeline: data → ingest → train (Fastformer, MHSA baseline) → re-ranker →
evaluate → index → score → submit, as calls of the library stages.

One MLflow parent run holds a nested run per stage; a stage whose inputs and settings are unchanged
is skipped (``force`` redoes every stage). ``pipelines/demo.py``, ``mind_small.py`` and
``mind_large.py`` run this with their configs; ``newsrec pipeline run CONFIG`` is the same call.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from newsrec.config import Config, load_config
from newsrec.errors import ConfigError
from pipelines.core import StageResult, StageRunner

MIND_SPLIT_FILES = {
    "mind-small": {"train": "MINDsmall_train.zip", "dev": "MINDsmall_dev.zip"},
    "mind-large": {"train": "MINDlarge_train.zip", "dev": "MINDlarge_dev.zip", "test": "MINDlarge_test.zip"},
}


FIRST_STAGE, TWO_STAGE, BASELINE = "Fastformer", "Fastformer + re-ranker", "MHSA (NRMS)"
MODEL_NAMES = (FIRST_STAGE, TWO_STAGE, BASELINE)  # rows of the comparison table, as displayed


@dataclass
class PipelineResult:
    root: Path
    stages: list[StageResult]
    table: dict[str, dict[str, Any]]  # model name -> dev metrics
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def table_text(self) -> str:
        from newsrec.eval.metrics import format_table

        return format_table(self.table)


def run(config: Config, *, force: bool = False, echo: Callable[[str], None] = print) -> PipelineResult:
    from newsrec.train import tracking

    pcfg = config.pipeline
    root = Path(pcfg.root) / pcfg.name
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def track(name: str) -> Any:
        return tracking.start_run(config.tracking, run_name=name, nested=True)

    runner = StageRunner(force=force, track=track if config.tracking.enabled else None, echo=echo)
    with tracking.start_run(config.tracking, run_name=f"pipeline-{pcfg.name}") as parent:
        tracking.log_params({"pipeline.config": pcfg.name, **config.flat()})
        paths = _run_stages(config, root, runner, echo)
        table = _comparison_table(config, paths)
        tracking.log_metrics({f"{model}_{k}": v for model, row in table.items()
                              for k, v in row.items() if isinstance(v, (int, float)) and v == v})
        parent_id = parent.run_id
    result = PipelineResult(root=root, stages=runner.results, table=table, paths=paths,
                            seconds=time.perf_counter() - start)
    _write_summary(result, parent_id)
    return result


def _settings(config: Config, *sections: str) -> dict[str, Any]:
    d = config.to_dict()
    return {s: d[s] for s in sections}


def _run_stages(config: Config, root: Path, runner: StageRunner, echo: Callable[[str], None]) -> dict[str, Path]:
    from newsrec.data.ingest import ingest
    from newsrec.eval.evaluate import evaluate
    from newsrec.eval.scoring import score
    from newsrec.eval.submission import submit
    from newsrec.serve.service import index_news
    from newsrec.train import fit
    from newsrec.train.rerank import fit_reranker

    pcfg = config.pipeline
    paths: dict[str, Path] = {}

    # ---- data: generated, downloaded or given
    splits = _source_stage(config, root, runner, paths)

    # ---- ingest
    data_dir = root / "dataset"
    runner.run("ingest", output=data_dir, inputs=list(splits.values()), settings=_settings(config, "data"),
               fn=lambda: _info(ingest(config, out_dir=data_dir, **splits)))
    paths["dataset"] = data_dir

    # ---- first stage and its baseline; fit starts its own (nested) MLflow run. The models of the
    # dev comparison fit on train alone; with train.fit_splits beyond train (e.g. train,dev, as
    # leaderboard entrants do) a final model fits on those splits and serves index, score and submit.
    final_config = config
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, fit_splits="train"))
    refit = final_config.train.fit_split_names != ["train"]
    train_settings = _settings(config, "data", "model", "train")
    model_dir = root / "models" / "fastformer"
    runner.run("train", output=model_dir, inputs=[data_dir], settings=train_settings, tracked=False,
               fn=lambda: _fit_info(fit(config, data_dir=data_dir, out_dir=model_dir)))
    paths["model"] = model_dir
    models = {FIRST_STAGE: model_dir}
    if pcfg.baselines:
        mhsa_config = dataclasses.replace(config, model=dataclasses.replace(config.model, encoder="mhsa"))
        mhsa_dir = root / "models" / "mhsa"
        runner.run("train_mhsa", output=mhsa_dir, inputs=[data_dir], tracked=False,
                   settings=_settings(mhsa_config, "data", "model", "train"),
                   fn=lambda: _fit_info(fit(mhsa_config, data_dir=data_dir, out_dir=mhsa_dir)))
        models[BASELINE] = mhsa_dir

    def rerank_stage(name: str, stage_config: Config, retriever: Path) -> Path:
        out = root / "models" / name.replace("rerank", "reranker")
        runner.run(name, output=out, inputs=[data_dir, retriever], tracked=False,
                   settings=_settings(stage_config, "rerank"),
                   fn=lambda: _info(fit_reranker(stage_config, retriever_dir=retriever, data_dir=data_dir,
                                                 out_dir=out)))
        return out

    reranker_dir = None
    if pcfg.rerank:
        reranker_dir = paths["reranker"] = rerank_stage("rerank", config, model_dir)

    # ---- evaluate every model on dev (metrics logged into each model's run)
    metrics_dir = root / "metrics"
    evals = [(name, d, None) for name, d in models.items()]
    if reranker_dir is not None:
        evals.insert(1, (TWO_STAGE, model_dir, reranker_dir))
    for name, mdir, rdir in evals:
        out = metrics_dir / f"{_slug(name)}.json"
        inputs = [data_dir, mdir] + ([rdir] if rdir else [])
        runner.run(f"evaluate {name}", output=out, inputs=inputs,
                   settings={"split": "dev", "rerank_use": config.rerank.use if rdir else None}, tracked=False,
                   fn=lambda mdir=mdir, rdir=rdir, out=out: _eval_info(
                       evaluate(mdir, data_dir, split="dev", out=out, reranker=rdir, rerank_use=config.rerank.use)))
    paths["metrics"] = metrics_dir

    if refit:  # the final model (and its re-ranker) on every split of train.fit_splits
        final_dir = root / "models" / "fastformer_final"
        runner.run("train_final", output=final_dir, inputs=[data_dir], tracked=False,
                   settings=_settings(final_config, "data", "model", "train"),
                   fn=lambda: _fit_info(fit(final_config, data_dir=data_dir, out_dir=final_dir)))
        model_dir = paths["final_model"] = final_dir
        if pcfg.rerank:
            reranker_dir = paths["final_reranker"] = rerank_stage("rerank_final", final_config, final_dir)

    # ---- serving index, batch scores, leaderboard file
    index_dir = root / "index"
    runner.run("index", output=index_dir, inputs=[data_dir, model_dir], settings=_settings(config, "index"),
               fn=lambda: {"vectors": index_news(model_dir, data_dir=data_dir, out_dir=index_dir).count})
    paths["index"] = index_dir

    scores_out = root / "scores.parquet"
    runner.run("score", output=scores_out, inputs=[data_dir, model_dir], settings={"top_k": pcfg.top_k},
               fn=lambda: _info(score(model_dir, data_dir, out=scores_out, top_k=pcfg.top_k, force=True)))
    paths["scores"] = scores_out

    submit_split = pcfg.submit_split if pcfg.submit_split in _dataset_splits(data_dir) else "dev"
    submission = root / f"prediction-{submit_split}.zip"
    runner.run("submit", output=submission,
               inputs=[data_dir, model_dir] + ([reranker_dir] if reranker_dir else []),
               settings={"split": submit_split, "rerank_use": config.rerank.use},
               fn=lambda: _info(submit(model_dir, data_dir, out=submission, split=submit_split,
                                       reranker=reranker_dir, rerank_use=config.rerank.use)))
    paths["submission"] = submission
    return paths


def _source_stage(config: Config, root: Path, runner: StageRunner, paths: dict[str, Path]) -> dict[str, Path]:
    pcfg = config.pipeline
    if pcfg.source == "synth":
        from newsrec.data.synth import generate

        raw = root / "raw"
        runner.run("synth", output=raw, inputs=[], settings={"size": pcfg.synth_size, "seed": pcfg.synth_seed},
                   fn=lambda: _synth_info(generate(raw, size=pcfg.synth_size, seed=pcfg.synth_seed)))
        paths["raw"] = raw
        return {split: raw / f"MINDsynth_{split}.zip" for split in ("train", "dev", "test")}
    if pcfg.source in MIND_SPLIT_FILES:
        from newsrec.data.download import download

        raw = Path(pcfg.raw_dir) if pcfg.raw_dir else Path("data/raw") / pcfg.source
        variant = pcfg.source.split("-")[1]
        files = MIND_SPLIT_FILES[pcfg.source]
        if not all((raw / f).is_file() for f in files.values()):
            download(variant, dest=raw)
        paths["raw"] = raw
        return {split: raw / name for split, name in files.items()}
    # source == "folder": raw_dir holds train/dev[/test] as MIND zips or folders
    if not pcfg.raw_dir:
        raise ConfigError("pipeline.source=folder needs pipeline.raw_dir (a folder with train/dev/test)")
    raw = Path(pcfg.raw_dir)
    found = {}
    for split in ("train", "dev", "test"):
        matches = sorted(p for p in raw.iterdir() if split in p.name.lower()) if raw.is_dir() else []
        if matches:
            found[split] = matches[0]
    if "train" not in found:
        raise ConfigError(f"pipeline.raw_dir={raw}: no train split found (a zip or folder named *train*)")
    paths["raw"] = raw
    return found


def _dataset_splits(data_dir: Path) -> list[str]:
    from newsrec.data.artifact import DatasetArtifact

    return DatasetArtifact(data_dir).splits


def _slug(name: str) -> str:
    """File-name form of a model's display name: "Fastformer + re-ranker" → "fastformer_re_ranker"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _info(result: Any) -> dict[str, Any]:
    """A JSON-able summary of a stage result dataclass (paths and numbers; arrays left out)."""
    if not dataclasses.is_dataclass(result):
        return {}
    out = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[f.name] = value
        elif isinstance(value, Path):
            out[f.name] = str(value)
        elif isinstance(value, dict):
            out[f.name] = json.loads(json.dumps(value, default=str))
    return out


def _fit_info(result: Any) -> dict[str, Any]:
    return _info(result)


def _eval_info(result: Any) -> dict[str, Any]:
    from newsrec.eval.evaluate import json_safe

    keys = ("auc", "mrr", "ndcg@5", "ndcg@10", "impressions")
    info = {k: result.metrics[k] for k in keys}
    if "first_stage" in result.metrics:
        info["first_stage"] = {k: result.metrics["first_stage"][k] for k in keys}
    info["cold"] = result.metrics["breakdown"]["candidates"].get("unseen", {})
    if result.metrics.get("rerank_decision"):
        info["rerank_decision"] = result.metrics["rerank_decision"]
    return json_safe(info)


def _synth_info(summary: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({"oracle": summary.get("oracle", {})}, default=str))


def _comparison_table(config: Config, paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Dev metrics of every model evaluated, the hand-made baselines and (synthetic data) the oracle."""
    from newsrec.eval.baselines import BASELINES, DISPLAY_NAMES, evaluate_baseline
    from newsrec.utils.io import read_json

    keys = ("auc", "mrr", "ndcg@5", "ndcg@10", "impressions")
    table: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in paths["metrics"].glob("*.json") if not p.name.startswith(".")):
        m = read_json(path)
        name = {_slug(n): n for n in MODEL_NAMES}.get(path.stem, path.stem)
        table[name] = {k: m[k] for k in keys}
    for baseline in BASELINES:
        bm = evaluate_baseline(baseline, paths["dataset"], split="dev", config=config.baseline).metrics
        table[DISPLAY_NAMES[baseline]] = {k: bm[k] for k in keys}
    oracle = paths.get("raw", Path("/nonexistent")) / "ground_truth" / "oracle_metrics.json"
    if oracle.is_file():
        o = read_json(oracle)
        o = o.get("dev", o)
        table["Oracle (true probabilities)"] = {k: o.get(k) for k in keys}
    order = [TWO_STAGE, FIRST_STAGE, BASELINE, *(DISPLAY_NAMES[b] for b in ("logreg", "heuristic", "popularity")),
             "Oracle (true probabilities)"]
    return {k: table[k] for k in order if k in table} | {k: v for k, v in table.items() if k not in order}


def _write_summary(result: PipelineResult, run_id: str | None) -> None:
    from newsrec.utils.io import write_json

    write_json(result.root / "summary.json", {
        "table": result.table,
        "paths": {k: str(v) for k, v in result.paths.items()},
        "stages": [{"name": s.name, "skipped": s.skipped, "seconds": round(s.seconds, 2)} for s in result.stages],
        "seconds": result.seconds,
        "mlflow_parent_run": run_id,
    })


def _rerank_decision_line(result: PipelineResult) -> list[str]:
    """Whether the two-stage row used the re-ranker, and why (one line; none without a re-ranker)."""
    from newsrec.utils.io import read_json

    path = result.paths.get("metrics", Path("/nonexistent")) / f"{_slug(TWO_STAGE)}.json"
    decision = read_json(path).get("rerank_decision") if path.is_file() else None
    return [f"{TWO_STAGE}: {decision}"] if decision else []


def report(result: PipelineResult, config: Config | None = None) -> str:
    """The closing summary: the comparison table, where the outputs are, how to look at the runs."""
    from newsrec.train.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config.tracking) if config is not None else "sqlite:///mlflow.db"
    ran = [s.name for s in result.stages if not s.skipped]
    skipped = [s.name for s in result.stages if s.skipped]
    lines = [
        "",
        f"Dev metrics ({result.table.get(FIRST_STAGE, {}).get('impressions', '?')} impressions):",
        result.table_text(),
        *_rerank_decision_line(result),
        "",
        f"submission : {result.paths.get('submission')}",
        f"scores     : {result.paths.get('scores')}",
        f"index      : {result.paths.get('index')}",
        f"models     : {result.paths.get('model')}" + (f", {result.paths['reranker']}" if "reranker" in result.paths else ""),
        *([f"final      : {result.paths['final_model']}"
           + (f", {result.paths['final_reranker']}" if "final_reranker" in result.paths else "")
           + " (fit on train.fit_splits; index, scores and submission use it)"]
          if "final_model" in result.paths else []),
        f"stages     : {len(ran)} ran, {len(skipped)} skipped (unchanged) in {result.seconds:.0f} s",
        f"MLflow UI  : mlflow ui --backend-store-uri {tracking_uri}",
    ]
    return "\n".join(lines)


def main(config_path: str | Path, argv: list[str] | None = None) -> None:
    """Entry point of ``python -m pipelines.<name>``: ``--force`` redoes every stage."""
    import argparse

    parser = argparse.ArgumentParser(description=f"Run the pipeline of {config_path}.")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(config_path, args.override)
    result = run(config, force=args.force)
    print(report(result, config))
