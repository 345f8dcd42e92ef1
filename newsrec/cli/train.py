"""``newsrec train``: first-stage training (library: ``newsrec.train.fit``) and, with
``--stage rerank``, the second-stage re-ranker (library: ``newsrec.train.rerank.fit_reranker``)."""
from __future__ import annotations

from pathlib import Path

import click

from newsrec.cli import config_options, main
from newsrec.config import load_config


@main.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Dataset artifact folder written by `newsrec ingest`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="MODEL_DIR to write (config, weights, manifest; checkpoints/ inside).")
@click.option("--resume", is_flag=True, help="Continue from MODEL_DIR/checkpoints/last.pt exactly.")
@click.option("--stage", type=click.Choice(["retrieve", "rerank"]), default="retrieve", show_default=True,
              help="retrieve: the first-stage model; rerank: the re-ranker over a trained first stage.")
@click.option("--fit-splits", "fit_splits", default=None, metavar="SPLITS",
              help="Labelled splits to fit on, comma-separated (e.g. train,dev): sets train.fit_splits. "
                   "The epoch is chosen on the latest train.holdout_fraction of their union.")
@click.option("--retriever", "retriever_dir", type=click.Path(file_okay=False), default=None,
              help="With --stage rerank: the first-stage MODEL_DIR the re-ranker builds on.")
@config_options
def train_command(data_dir: str, out_dir: str, resume: bool, stage: str, fit_splits: str | None,
                  retriever_dir: str | None, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Train the news recommender (NRMS objective), choosing the epoch and early-stopping on a
    held-out latest slice of the training log and reporting dev, or (--stage rerank) the re-ranker
    on top of a trained one."""
    from newsrec.train import fit
    from newsrec.train.loop import NO_SELECTION, fitted_not_reported

    if fit_splits is not None:
        overrides = (*overrides, f"train.fit_splits={fit_splits}")
    config = load_config(config_path, overrides)
    if stage == "rerank":
        if fit_splits is not None:
            raise click.BadParameter("only for the first stage", param_hint="--fit-splits")
        _train_reranker(config, data_dir=data_dir, out_dir=out_dir, retriever_dir=retriever_dir)
        return
    if retriever_dir is not None:
        raise click.BadParameter("only with --stage rerank", param_hint="--retriever")
    result = fit(config, data_dir=Path(data_dir), out_dir=Path(out_dir), resume=resume)
    if not result.finished:
        return
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    click.echo(f"model: {result.model_dir}")
    click.echo(f"epochs: {result.epochs_trained}  steps: {result.global_step}  "
               f"train samples/s: {result.train_samples_per_second:.0f}"
               + ("  (stopped early)" if result.stopped_early else ""))
    h = result.holdout
    if result.holdout_metrics:
        click.echo(f"held out: latest {h['holdout_impressions']} of {h['fit_impressions']} impressions of "
                   f"{','.join(h['fit_splits'])} ({h['holdout_time_from']} .. {h['holdout_time_to']})")
        click.echo(f"held-out (best epoch {result.best_epoch + 1}): " + _metrics_line(result.holdout_metrics))
    else:
        click.echo(NO_SELECTION)
    note = fitted_not_reported(config)
    if note:
        click.echo(note)
    if result.metrics:
        which = "best" if result.holdout_metrics else "last"
        click.echo(f"dev ({which} epoch {result.best_epoch + 1}): " + _metrics_line(result.metrics)
                   + "  (reported only)")
    elif not note:
        click.echo("dev: no labelled dev split to report")
    if result.run_id:
        click.echo(f"mlflow run: {result.run_id}")


def _metrics_line(m: dict) -> str:
    return (f"AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  nDCG@5 {m['ndcg@5']:.4f}  nDCG@10 {m['ndcg@10']:.4f}  "
            f"impressions {m.get('impressions', 0)}")


def _train_reranker(config, *, data_dir: str, out_dir: str, retriever_dir: str | None) -> None:
    from newsrec.inference.rerank import two_stage_decision
    from newsrec.train.rerank import fit_reranker

    if retriever_dir is None:
        raise click.BadParameter("--stage rerank needs the first-stage MODEL_DIR", param_hint="--retriever")
    result = fit_reranker(config, retriever_dir=Path(retriever_dir), data_dir=Path(data_dir),
                          out_dir=Path(out_dir))
    click.echo(f"re-ranker: {result.out_dir}  ({result.train_samples} training samples, {result.seconds:.0f} s)")
    source = result.guard.get("first_stage_source")
    click.echo(f"first-stage scores of its slice: {source} "
               + ("(the retriever never trained on the slice)" if source == "retriever"
                  else "(a first stage fit on the log before the slice)"))
    click.echo(two_stage_decision({"guard": result.guard}, "auto")[1])
    for name, m in result.metrics.items():
        if isinstance(m, dict) and "auc" in m:
            click.echo(f"dev {name:<12} AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  "
                       f"nDCG@5 {m['ndcg@5']:.4f}  nDCG@10 {m['ndcg@10']:.4f}")
    if result.run_id:
        click.echo(f"mlflow run: {result.run_id}")
