"""``newsrec train``: first-stage training (library: ``newsrec.train.fit``)."""
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
@config_options
def train_command(data_dir: str, out_dir: str, resume: bool, config_path: str | None,
                  overrides: tuple[str, ...]) -> None:
    """Train the news recommender (NRMS objective) with per-epoch dev evaluation and early stopping."""
    from newsrec.train import fit

    config = load_config(config_path, overrides)
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
    if result.metrics:
        m = result.metrics
        click.echo(f"dev (best epoch {result.best_epoch + 1}): AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  "
                   f"nDCG@5 {m['ndcg@5']:.4f}  nDCG@10 {m['ndcg@10']:.4f}  "
                   f"impressions {m.get('impressions', 0)}")
    else:
        click.echo("dev: no labelled dev split; the last epoch's weights were kept")
    if result.run_id:
        click.echo(f"mlflow run: {result.run_id}")
