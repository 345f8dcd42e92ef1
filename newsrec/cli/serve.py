"""``newsrec index``, ``newsrec recommend`` and ``newsrec serve`` (library: ``newsrec.serve``)."""
from __future__ import annotations

import click

from newsrec.cli import config_options, main, model_option
from newsrec.config import saved_model_config
from newsrec.errors import ConfigError

_INDEX = click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False),
                      help="INDEX_DIR written by `newsrec index`.")
_RERANKER = click.option("--reranker", "reranker_dir", default=None, type=click.Path(file_okay=False),
                         help="RERANKER_DIR written by `newsrec train --stage rerank` (optional).")
_DATA = click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
                     help="Dataset artifact (default: the one the model was trained on).")


def _settings(config_path: str | None, overrides: tuple[str, ...], model_dir: str):
    """The model's saved config with serve.* and index.* from -c FILE and -o (see config.py)."""
    return saved_model_config(config_path, overrides, model_dir)


def _search_settings(config, config_path: str | None, overrides: tuple[str, ...]):
    """The index section when the user gave one (-c FILE or -o index.*): its search-time settings
    replace those the index was built with; otherwise None (keep the built ones)."""
    given = config_path is not None or any(o.strip().startswith("index.") for o in overrides)
    return config.index if given else None


@main.command("index")
@model_option
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Dataset artifact whose news are indexed (default: the model's).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="INDEX_DIR to write (index.faiss, ids.npy, vectors.npy, manifest.json).")
@config_options
def index_command(model_dir: str, data_dir: str | None, out_dir: str, config_path: str | None,
                  overrides: tuple[str, ...]) -> None:
    """Encode every news with the trained news encoder into a FAISS inner-product index."""
    from newsrec.serve.service import index_news

    config = _settings(config_path, overrides, model_dir)
    index = index_news(model_dir, data_dir=data_dir, out_dir=out_dir, index_cfg=config.index)
    click.echo(f"index: {out_dir}  kind {index.kind}  news {index.count}  dim {index.dim}  "
               f"built in {index.manifest.get('build_seconds', 0):.1f} s on {index.manifest.get('device')}")


@main.command("recommend")
@model_option
@_INDEX
@_RERANKER
@click.option("--user", "user_id", default=None, help="A user id of the dataset (latest history is used).")
@click.option("--history", default=None, metavar="N1,N2,...", help="Clicked news ids, oldest first.")
@click.option("-k", "k", type=int, default=None, help="How many news to recommend (default serve.default_k).")
@click.option("--ignore-unknown", is_flag=True, help="Drop history ids the dataset does not know.")
@_DATA
@config_options
def recommend_command(model_dir: str, index_dir: str, reranker_dir: str | None, user_id: str | None,
                      history: str | None, k: int | None, ignore_unknown: bool, data_dir: str | None,
                      config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Recommend news for one user of the dataset or for a given history."""
    from newsrec.serve.service import Recommender

    if (user_id is None) == (history is None):
        raise click.UsageError("give exactly one of --user ID or --history N1,N2,...")
    config = _settings(config_path, overrides, model_dir)
    service = Recommender.load(model_dir, index_dir, reranker_dir=reranker_dir, data_dir=data_dir,
                               serve_cfg=config.serve, index_cfg=_search_settings(config, config_path, overrides))
    news_ids = None if history is None else [h.strip() for h in history.split(",") if h.strip()]
    rec = service.recommend(user_id=user_id, history=news_ids, k=k, ignore_unknown=ignore_unknown or None)
    who = f"user {user_id}" if user_id is not None else "the given history"
    click.echo(f"top {len(rec.items)} for {who} ({rec.history_used} clicks used"
               f"{', re-ranked' if rec.reranked else ''}):")
    for rank, item in enumerate(rec.items, 1):
        tag = " [fresh]" if item.fresh else ""
        click.echo(f"{rank:3d}. {item.news_id:<12} {item.score:9.4f}  {item.category:<14} {item.title}{tag}")
    if rec.ignored_ids:
        click.echo(f"ignored unknown history ids: {', '.join(rec.ignored_ids)}")


@main.command("serve")
@model_option
@_INDEX
@_RERANKER
@_DATA
@click.option("--host", default=None, help="Interface to bind (default serve.host, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default serve.port, 8000).")
@click.option("--allow-open-writes", is_flag=True,
              help="Serve POST /news and /index/save without an admin token on a non-loopback host "
                   "(serve.allow_open_writes).")
@config_options
def serve_command(model_dir: str, index_dir: str, reranker_dir: str | None, data_dir: str | None,
                  host: str | None, port: int | None, allow_open_writes: bool, config_path: str | None,
                  overrides: tuple[str, ...]) -> None:
    """Serve recommendations over HTTP (FastAPI + uvicorn); the API is at /docs."""
    import torch
    import uvicorn

    from newsrec.serve.app import check_open_writes, create_app
    from newsrec.serve.service import Recommender

    if allow_open_writes:
        overrides = (*overrides, "serve.allow_open_writes=true")
    config = _settings(config_path, overrides, model_dir)
    host = host or config.serve.host
    check_open_writes(config.serve, host)
    port = config.serve.port if port is None else port
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: expected 1..65535")
    torch.set_num_threads(config.serve.torch_threads)
    service = Recommender.load(model_dir, index_dir, reranker_dir=reranker_dir, data_dir=data_dir,
                               serve_cfg=config.serve, index_cfg=_search_settings(config, config_path, overrides))
    app = create_app(service, config.serve)
    click.echo(f"serving {service.index.count} news ({service.index.kind} index"
               f"{', re-ranker' if service.reranker is not None else ''}) on http://{host}:{port} "
               f"(API: http://{host}:{port}/docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
