"""``newsrec pipeline run CONFIG``: the whole pipeline as calls of the library stages."""
from __future__ import annotations

import click

from newsrec.cli import main


@main.group()
def pipeline() -> None:
    """End-to-end pipelines (synth/download → ingest → train → re-rank → evaluate → index → score → submit)."""


@pipeline.command("run")
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. -o pipeline.synth_size=tiny (repeatable).")
@click.option("--force", is_flag=True, help="Redo every stage, even those whose inputs are unchanged.")
def run_command(config_path: str, overrides: tuple[str, ...], force: bool) -> None:
    """Run the pipeline that CONFIG_PATH describes (its `pipeline:` section); unchanged stages are skipped."""
    from newsrec.config import load_config
    from pipelines.run import report, run

    config = load_config(config_path, overrides)
    result = run(config, force=force, echo=lambda m: click.echo(m, err=True))
    click.echo(report(result, config))
