"""The ``newsrec`` command: a click group with one thin command per stage.

Commands parse options, call one library function and print a short summary. Errors the user can
fix (``NewsrecError``) print as one line and exit 1; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import click

from newsrec.errors import NewsrecError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NewsrecError as exc:
            if ctx.meta.get("newsrec.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="newsrec")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """newsrec: Fastformer news recommendation on MIND-format data."""
    ctx.meta["newsrec.debug"] = debug


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-c/--config FILE`` and repeated ``-o section.key=value``; pass both to ``load_config``."""
    fn = click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config key, e.g. -o train.epochs=2 (repeatable).")(fn)
    fn = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
                      help="YAML config file (defaults: newsrec/config.py).")(fn)
    return fn


model_option = click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
                            help="MODEL_DIR written by `newsrec train`.")


def _register() -> None:
    from newsrec.cli import commands  # noqa: F401  (imports attach commands to `main`)


_register()
