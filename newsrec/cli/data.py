"""``newsrec download`` and ``newsrec ingest``: thin wrappers over newsrec.data.download / ingest."""
from __future__ import annotations

import click

from newsrec.cli import config_options, main
from newsrec.config import load_config
from newsrec.data.download import BASE_URL_ENV, MIND_FILES, base_url_default, download_mind


@main.command("download")
@click.argument("size", type=click.Choice(sorted(MIND_FILES)))
@click.option("--dest", type=click.Path(file_okay=False), default="data/raw", show_default=True,
              help="Folder the zips are written to.")
@click.option("--base-url", default=None, metavar="URL",
              help=f"Where the MIND zips are served (default: ${BASE_URL_ENV}, else the official host).")
def download_command(size: str, dest: str, base_url: str | None) -> None:
    """Download the official MIND zips (small: train+dev; large: train+dev+test).

    Resumes a partial download, checks size and checksum, tests the zip, renames atomically.
    """
    url = base_url or base_url_default()
    click.echo(f"downloading MIND {size} from {url}")
    for item in download_mind(size, dest=dest, base_url=url):
        if item.already_present:
            state = "already present"
        elif item.resumed_from:
            state = f"resumed at {item.resumed_from:,} bytes"
        else:
            state = "downloaded"
        click.echo(f"{item.path}  {item.size / 2**20:,.1f} MiB  sha256 {item.sha256[:16]}…  ({state})")


@main.command("ingest")
@click.option("--train", "train_path", required=True, type=click.Path(exists=False),
              help="Train split: a MIND zip or a folder holding news.tsv and behaviors.tsv.")
@click.option("--dev", "dev_path", default=None, type=click.Path(exists=False), help="Dev split (zip or folder).")
@click.option("--test", "test_path", default=None, type=click.Path(exists=False),
              help="Test split (zip or folder; unlabelled).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Dataset artifact folder to write (replaced atomically).")
@click.option("--glove", default=None, type=click.Path(dir_okay=False),
              help="GloVe text file; writes word_vectors.npy aligned to the vocabulary.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default=None,
              help="Stop at the first bad line (error) or skip and count bad rows "
                   "(default: data.on_bad_rows).")
@click.option("--missing-news", type=click.Choice(["error", "drop"]), default=None,
              help="News ids absent from news.tsv: fail, or drop them and count "
                   "(default: data.missing_news).")
@config_options
def ingest_command(train_path: str, dev_path: str | None, test_path: str | None, out_dir: str,
                   glove: str | None, on_bad_rows: str | None, missing_news: str | None,
                   config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Validate MIND train/dev/test and write the dataset artifact (one vocabulary, built on train)."""
    from newsrec.data.ingest import ingest

    extra = []
    if on_bad_rows is not None:
        extra.append(f"data.on_bad_rows={on_bad_rows}")
    if missing_news is not None:
        extra.append(f"data.missing_news={missing_news}")
    config = load_config(config_path, [*overrides, *extra])
    result = ingest(config, train=train_path, dev=dev_path, test=test_path, out_dir=out_dir, glove=glove)
    for line in result.summary_lines():
        click.echo(line)
