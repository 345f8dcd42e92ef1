"""``newsrec evaluate``, ``newsrec submit`` and ``newsrec score`` (library: ``newsrec.eval``)."""
from __future__ import annotations

import click

from newsrec.cli import config_options, main, model_option
from newsrec.errors import ConfigError
from newsrec.eval.baselines import BASELINES

_DEVICE = click.option("--device", default=None, type=click.Choice(["cpu", "cuda", "auto"]),
                       help="Where to run the model (default: the model's train.device).")
_DATA = click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
                     help="Dataset artifact folder written by `newsrec ingest`.")
_BASELINE = click.option("--baseline", default=None, type=click.Choice(BASELINES),
                         help="Score with a hand-made baseline instead of a model (settings: the "
                              "config's baseline section, -o baseline.KEY=VALUE).")
_RERANKER = click.option("--reranker", "reranker_dir", default=None, type=click.Path(file_okay=False),
                         help="RERANKER_DIR trained on this model: score with both stages.")


def _metrics_line(metrics: dict) -> str:
    return (f"AUC {metrics['auc']:.4f}  MRR {metrics['mrr']:.4f}  nDCG@5 {metrics['ndcg@5']:.4f}  "
            f"nDCG@10 {metrics['ndcg@10']:.4f}  impressions {metrics['impressions']}")


def _model_or_baseline(model_dir: str | None, baseline: str | None, reranker_dir: str | None,
                       config_path: str | None, overrides: tuple[str, ...], device: str | None) -> None:
    """Exactly one of --model / --baseline; a model's settings are fixed by its folder. One line
    (ConfigError) when the options clash."""
    if (model_dir is None) == (baseline is None):
        raise ConfigError("give exactly one of --model MODEL_DIR and --baseline NAME")
    if baseline is not None and (reranker_dir is not None or device is not None):
        raise ConfigError("--reranker and --device apply to a model: use them with --model, not --baseline")
    if model_dir is not None and (config_path or overrides):
        raise ConfigError("-c/-o set the baseline section: a model's settings come from MODEL_DIR")
    other = [o for o in overrides if not o.strip().startswith("baseline.")]
    if other:
        raise ConfigError(f"-o {other[0]}: a baseline reads only the baseline section (-o baseline.KEY=VALUE)")


@main.command("evaluate")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="MODEL_DIR written by `newsrec train`.")
@_BASELINE
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
@config_options
def evaluate_command(model_dir: str | None, baseline: str | None, reranker_dir: str | None, data_dir: str,
                     split: str, out_path: str | None, check_slow: int, no_mlflow: bool, device: str | None,
                     config_path: str | None, overrides: tuple[str, ...]) -> None:
    """AUC, MRR, nDCG@5, nDCG@10 on a labelled split, with history-length and cold-news breakdowns."""
    _model_or_baseline(model_dir, baseline, reranker_dir, config_path, overrides, device)
    if baseline is not None:
        if check_slow:
            raise ConfigError("--check-slow compares a model's fast path with its full forward pass: "
                              "use it with --model")
        _evaluate_baseline(baseline, data_dir, split, out_path, config_path, overrides)
        return
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


def _evaluate_baseline(baseline: str, data_dir: str, split: str, out_path: str | None, config_path: str | None,
                       overrides: tuple[str, ...]) -> None:
    from newsrec.config import load_config
    from newsrec.eval.baselines import evaluate_baseline

    config = load_config(config_path, overrides).baseline
    result = evaluate_baseline(baseline, data_dir, split=split, out=out_path, config=config)
    m = result.metrics
    click.echo(f"{split}: baseline {baseline}, {m['impressions']} impressions, {m['candidates']} candidates "
               f"({m['no_click']} without a click, {m['no_nonclick']} without a non-click: not in the AUC mean)")
    click.echo(result.table())
    t = m["timing"]
    fitted = f"fitted in {t['fit_seconds']:.1f}s, " if t["fit_seconds"] else ""
    click.echo(f"{fitted}scored in {t['score_seconds']:.1f}s, metrics in {t['metrics_seconds']:.2f}s")
    if result.out is not None:
        click.echo(f"metrics: {result.out}")


@main.command("submit")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="MODEL_DIR written by `newsrec train` (to write a submission).")
@_BASELINE
@_RERANKER
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Dataset artifact folder written by `newsrec ingest` (with --check: where the "
                   "behaviors source of --split is recorded).")
@click.option("--split", default="test", show_default=True, help="Split whose impressions are ranked.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Submission to write, e.g. prediction.zip (prediction.txt at its root).")
@click.option("--check", "check_path", default=None, type=click.Path(dir_okay=False),
              help="Validate an existing prediction.zip / prediction.txt against the behaviors file "
                   "instead.")
@click.option("--behaviors", "behaviors_path", default=None, type=click.Path(exists=True),
              help="With --check: the behaviors.tsv (or its split folder/zip) to check against "
                   "(default: the source of --split recorded in --data by ingest).")
@_DEVICE
@config_options
def submit_command(model_dir: str | None, baseline: str | None, reranker_dir: str | None, data_dir: str | None,
                   split: str, out_path: str | None, check_path: str | None, behaviors_path: str | None,
                   device: str | None, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Write (or --check) a MIND leaderboard submission: `ImpressionID [r1,r2,...]` per impression."""
    if check_path is not None:
        if model_dir or baseline or out_path or config_path or overrides:
            raise click.UsageError("--check validates an existing file: do not combine it with "
                                   "--model/--baseline/--out/-c/-o")
        if behaviors_path is None and data_dir is None:
            raise click.UsageError("--check needs --behaviors PATH or --data DIR (whose ingest source is used)")
        from newsrec.eval.submission import check_against_behaviors

        check = check_against_behaviors(check_path, behaviors=behaviors_path, data_dir=data_dir, split=split)
        click.echo(f"{check.source}: valid ({check.impressions} impressions, {check.candidates} candidates, "
                   f"checked against {check.behaviors})")
        if check.metrics is not None:
            click.echo(f"local metrics (score = 1/rank): {_metrics_line(check.metrics)}")
        return
    if behaviors_path is not None:
        raise click.UsageError("--behaviors goes with --check")
    if not (model_dir or baseline) or not out_path or not data_dir:
        raise click.UsageError("give --model (or --baseline), --data and --out to write a submission, or "
                               "--check FILE to validate one")
    _model_or_baseline(model_dir, baseline, reranker_dir, config_path, overrides, device)
    if baseline is not None:
        from newsrec.config import load_config
        from newsrec.eval.baselines import submit_baseline

        result = submit_baseline(baseline, data_dir, out=out_path, split=split,
                                 config=load_config(config_path, overrides).baseline)
    else:
        from newsrec.eval.submission import submit

        result = submit(model_dir, data_dir, out=out_path, split=split, reranker=reranker_dir, device=device)
    click.echo(f"{result.out}: {result.impressions} impressions, {result.candidates} candidates "
               f"(split '{split}', validated)")
    if result.missing_news or result.rowless:
        click.echo(f"{result.missing_news} candidate(s) absent from news.tsv ranked last; "
                   f"{result.rowless} impression(s) ingest kept no row for scored as users without history")
    if result.metrics is not None:
        click.echo(f"local metrics (score = 1/rank): {_metrics_line(result.metrics)}")


@main.command("score")
@model_option
@_DATA
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="Output folder, e.g. scores.parquet (part-XXXXX.parquet files + a manifest).")
@click.option("--split", default=None, help="Score this split's impressions (or, with --pool split, "
                                            "the split whose candidates form the pool).")
@click.option("--top-k", "top_k", default=None, type=click.IntRange(min=1), metavar="K",
              help="Top K news per user (latest history) instead of a split's impressions.")
@click.option("--pool", default="all", show_default=True, type=click.Choice(["all", "split"]),
              help="With --top-k: all news of the artifact, or the candidates of --split.")
@click.option("--index", "index_dir", default=None, type=click.Path(file_okay=False),
              help="With --top-k over all news: retrieve through this INDEX_DIR (`newsrec index`) "
                   "instead of exact search.")
@click.option("--shard", default=None, metavar="i/n",
              help="Score only shard i of n (default: RANK/WORLD_SIZE under torchrun, else all).")
@click.option("--chunk-users", default=20_000, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Users (or impressions) per part file; memory grows with it.")
@click.option("--include-clicked", is_flag=True, help="With --top-k: do not exclude news the user clicked.")
@click.option("--force", is_flag=True, help="Discard parts written with other arguments and start over.")
@_DEVICE
def score_command(model_dir: str, data_dir: str, out_path: str, split: str | None, top_k: int | None,
                  pool: str, index_dir: str | None, shard: str | None, chunk_users: int,
                  include_clicked: bool, force: bool, device: str | None) -> None:
    """Batch scoring to Parquet: a split's candidates, or the top K news of a pool for every user."""
    from newsrec.eval.scoring import score

    retriever, retriever_name = None, "exact"
    if index_dir is not None:
        if top_k is None or pool != "all":
            raise click.UsageError("--index is used with --top-k over all news (--pool all)")
        from newsrec.serve.index import load_index

        retriever = load_index(index_dir)
        retriever_name = f"index:{retriever.kind}"
    result = score(model_dir, data_dir, out=out_path, split=split, top_k=top_k, pool=pool, shard=shard,
                   chunk_users=chunk_users, force=force, exclude_history=not include_clicked,
                   retriever=retriever, retriever_name=retriever_name, device=device)
    i, n = result.shard
    unit = "users" if top_k is not None else "impressions"
    click.echo(f"{result.out}: shard {i}/{n}, {result.chunks_written} part(s) written, "
               f"{result.chunks_skipped} already done; {result.items} {unit} in {result.seconds:.1f}s "
               f"({result.items_per_second:.0f} {unit}/s)")
