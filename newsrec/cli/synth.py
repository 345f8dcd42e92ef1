"""``newsrec synth``: a MIND-format data set with known click probabilities."""
from __future__ import annotations

from typing import Any

import click

from newsrec.cli import main
from newsrec.data.synth import SIZES, generate
from newsrec.data.worlds import WORLDS

_METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")


@main.command("synth")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for MINDsynth_{train,dev,test}.zip and ground_truth/.")
@click.option("--size", type=click.Choice(list(SIZES)), default="small", show_default=True,
              help="tiny (tests, seconds), small (MIND-small scale), medium, large (MIND-large train scale).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed gives byte-identical zips.")
@click.option("--world", default="default", show_default=True,
              help=f"What drives clicks and showing: {', '.join(WORLDS)}; combine with '+' "
                   f"(e.g. cold-test+uniform-exposure).")
@click.option("--news", "news_path", type=click.Path(exists=True),
              help="Simulate users over a real MIND news.tsv (file, folder or zip) instead of generated news; "
                   "sizes scale to the news available.")
def synth(out_dir: str, size: str, seed: int, world: str, news_path: str | None) -> None:
    """Generate MIND-format train/dev/test zips (test without labels) plus a ground-truth folder."""
    summary = generate(out_dir, size=size, seed=seed, world=world, news_path=news_path)
    click.echo(format_summary(summary))


def format_summary(summary: dict[str, Any]) -> str:
    history = summary["history_len"]
    lines = [
        f"synth {summary['size']} world {summary['world']} (seed {summary['seed']}): {summary['users']:,} users, "
        f"{summary['news']:,} news, {summary['categories']} categories / "
        f"{summary['subcategories']} subcategories / {summary['topics']} topics",
        f"history length: median {history['median']:.0f}, p99 {history['p99']:.0f}, max {history['max']:,}",
        f"{'split':<6} {'impressions':>11} {'candidates':>11} {'per imp':>8} {'click rate':>10} {'cold cand':>9}",
    ]
    for split, info in summary["splits"].items():
        cold = info.get("cold_candidate_share")
        lines.append(f"{split:<6} {info['impressions']:>11,} {info['candidates']:>11,} "
                     f"{info['mean_candidates']:>8.1f} {info['click_rate']:>10.2%} "
                     f"{'-' if cold is None else f'{cold:.1%}':>9}")
    lines.append(f"{'oracle':<6} " + " ".join(f"{m:>8}" for m in _METRICS))
    for split, metrics in summary["oracle"].items():
        lines.append(f"{split:<6} " + " ".join(f"{metrics[m]:>8.4f}" for m in _METRICS))
    for key, label in (("history_only", "history-only limit (posterior interests)"),
                       ("history_only_popularity", "history-only limit + true popularity/freshness")):
        lines.append(f"{label}: " + ", ".join(f"{split} AUC {m['auc']:.4f} nDCG@10 {m['ndcg@10']:.4f}"
                                              for split, m in summary[key].items()))
    lines.append(f"  ({summary['history_only_effective_draws']['median']:.1f} effective prior draws per user, median)")
    lines.append(f"oracle dev AUC {summary['oracle']['dev']['auc']:.4f}")
    for split, path in summary["zips"].items():
        lines.append(f"{split:<6} {path}")
    lines.append(f"truth  {summary['ground_truth']}")
    return "\n".join(lines)
