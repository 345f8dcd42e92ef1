"""``newsrec evaluate``, ``newsrec submit`` and ``newsrec score`` (library: ``newsrec.eval``)."""
from __future__ import annotations

import click

from newsrec.cli import main

_DEVICE = click.option("--device", default=None, type=click.Choice(["cpu", "cuda", "auto"]),
                       help="Where to run the model (default: the model's train.device).")
_MODEL = click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
                      help="MODEL_DIR written by `newsrec train`.")
_DATA = click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
                     help="Dataset artifact folder written by `newsrec ingest`.")
_RERANKER = click.option("--reranker", "reranker_dir", default=None, type=click.Path(file_okay=False),
                         help="RERANKER_DIR trained on this model: score with both stages.")


def _metrics_line(metrics: dict) -> str:
    return (f"AUC {metrics['auc']:.4f}  MRR {metrics['mrr']:.4f}  nDCG@5 {metrics['ndcg@5']:.4f}  "
            f"nDCG@10 {metrics['ndcg@10']:.4f}  impressions {metrics['impressions']}")


@main.command("evaluate")
@_MODEL
@_RERANKER
@_DATA
@click.option("--split", default="dev", show_default=True, help="Labelled split to evaluate.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Write the metrics (with breakdowns) as JSON here, e.g. metrics.json.")
@click.option("--check-slow", default=0, type=click.IntRange(min=0), show_default=True, metavar="N",
              help="Also score N random impressions with the full model per impression and fail "
                   "unless the fast path agrees to 1e-5.")
@click.option("--no-mlflow", is_flag=True, help="Do not log the metrics to MLflow.")
@_DEVICE
def evaluate_command(model_dir: str, reranker_dir: str | None, data_dir: str, split: str,
                     out_path: str | None, check_slow: int, no_mlflow: bool, device: str | None) -> None:
    """AUC, MRR, nDCG@5, nDCG@10 on a labelled split, with history-length and cold-news breakdowns."""
    from newsrec.eval.evaluate import evaluate

    result = evaluate(model_dir, data_dir, split=split, out=out_path, reranker=reranker_dir,
                      check_slow=check_slow, device=device, log_to_mlflow=not no_mlflow)
    m = result.metrics
    click.echo(f"{split}: {m['impressions']} impressions, {m['candidates']} candidates "
               f"({m['no_click']} without a click, {m['no_nonclick']} without a non-click: not in the AUC mean)")
    click.echo(result.table())
    if "first_stage" in m:
        click.echo(f"first stage alone: {_metrics_line(m['first_stage'])}")
    if "check_slow" in m:
        c = m["check_slow"]
        click.echo(f"fast path == full model on {c['impressions']} impressions (max |diff| {c['max_abs_diff']:.2e})")
    t = m["timing"]
    click.echo(f"scored in {t['score_seconds']:.1f}s, metrics in {t['metrics_seconds']:.2f}s")
    if result.out is not None:
        click.echo(f"metrics: {result.out}")
    if result.run_id:
        click.echo(f"mlflow run: {result.run_id}")


@main.command("submit")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="MODEL_DIR written by `newsrec train` (to write a submission).")
@_RERANKER
@_DATA
@click.option("--split", default="test", show_default=True, help="Split whose impressions are ranked.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Submission to write, e.g. prediction.zip (prediction.txt at its root).")
@click.option("--check", "check_path", default=None, type=click.Path(dir_okay=False),
              help="Validate an existing prediction.zip / prediction.txt against the split instead.")
@_DEVICE
def submit_command(model_dir: str | None, reranker_dir: str | None, data_dir: str, split: str,
                   out_path: str | None, check_path: str | None, device: str | None) -> None:
    """Write (or --check) a MIND leaderboard submission: `ImpressionID [r1,r2,...]` per impression."""
    if check_path is not None:
        if model_dir or out_path:
            raise click.UsageError("--check validates an existing file: do not combine it with --model/--out")
        from newsrec.data.artifact import DatasetArtifact
        from newsrec.eval.submission import check_submission

        impressions = DatasetArtifact(data_dir).impressions(split)
        check = check_submission(check_path, impressions)
        click.echo(f"{check.source}: valid ({check.impressions} impressions, {check.candidates} candidates, "
                   f"split '{split}')")
        if check.metrics is not None:
            click.echo(f"local metrics (score = 1/rank): {_metrics_line(check.metrics)}")
        return
    if not model_dir or not out_path:
        raise click.UsageError("give --model and --out to write a submission, or --check FILE to validate one")
    from newsrec.eval.submission import submit

    result = submit(model_dir, data_dir, out=out_path, split=split, reranker=reranker_dir, device=device)
    click.echo(f"{result.out}: {result.impressions} impressions, {result.candidates} candidates "
               f"(split '{split}', validated)")
    if result.metrics is not None:
        click.echo(f"local metrics (score = 1/rank): {_metrics_line(result.metrics)}")
