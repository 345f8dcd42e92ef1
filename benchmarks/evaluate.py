"""Evaluation throughput on a MIND-small-dev-sized split: fast path vs the full model per impression.

    .venv/bin/python benchmarks/evaluate.py [--data DIR] [--slow-sample 200] [--threads 2]

Generates `newsrec synth --size small` and ingests it when DIR holds no artifact (cached under
data/processed/bench_small). The model is the default config, untrained: speed does not depend on
the weights. Prints a table, writes docs/benchmarks/evaluate.{json,png}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import format_table, peak_memory, save_figure, use_agg_backend, write_results  # noqa: E402
from newsrec.config import Config  # noqa: E402
from newsrec.data.artifact import DatasetArtifact  # noqa: E402
from newsrec.eval import metrics as M  # noqa: E402
from newsrec.inference.scoring import encode_all_news, score_impressions, score_impressions_slow  # noqa: E402


def ensure_artifact(data: Path) -> DatasetArtifact:
    if (data / "manifest.json").is_file():
        return DatasetArtifact(data)
    from newsrec.data.ingest import ingest
    from newsrec.data.synth import generate

    raw = data.parent.parent / "raw" / f"{data.name}_synth"
    if not (raw / "MINDsynth_dev.zip").is_file():
        generate(raw, size="small", seed=0)
    ingest(Config(), train=raw / "MINDsynth_train.zip", dev=raw / "MINDsynth_dev.zip",
           test=raw / "MINDsynth_test.zip", out_dir=data)
    return DatasetArtifact(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/processed/bench_small"))
    parser.add_argument("--slow-sample", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = ensure_artifact(args.data)
    config = Config()
    from newsrec.inference.model_io import build_model

    torch.manual_seed(0)
    model = build_model(config, dataset).eval()
    dev = dataset.impressions("dev")
    n_candidates = len(dev.candidates)
    with peak_memory() as peak:
        start = time.perf_counter()
        news_vectors = encode_all_news(model, dataset, batch_size=config.train.eval_batch_size)
        t_news = time.perf_counter() - start
        scores = score_impressions(model, dataset, dev, history_len=config.data.history_len,
                                   batch_size=config.train.eval_batch_size, news_vectors=news_vectors)
        t_fast = time.perf_counter() - start
    start = time.perf_counter()
    metrics = M.compute_metrics(dev.labels, scores, dev.candidate_offsets)
    t_metrics = time.perf_counter() - start
    rows = np.sort(np.random.default_rng(0).choice(len(dev), size=min(args.slow_sample, len(dev)), replace=False))
    start = time.perf_counter()
    slow = score_impressions_slow(model, dataset, dev, rows, history_len=config.data.history_len)
    t_slow_sample = time.perf_counter() - start
    picked = np.concatenate([np.arange(dev.candidate_offsets[i], dev.candidate_offsets[i + 1]) for i in rows])
    max_diff = float(np.abs(scores[picked] - slow).max())
    t_slow_full = t_slow_sample / len(rows) * len(dev)
    table = [
        {"path": "fast (news once, histories once)", "impressions": len(dev), "candidates": n_candidates,
         "seconds": t_fast, "of which news": t_news, "peak MiB": peak.peak_mib},
        {"path": f"full model per impression (x{len(rows)}, extrapolated)", "impressions": len(dev),
         "candidates": n_candidates, "seconds": t_slow_full, "of which news": None, "peak MiB": None},
    ]
    print(format_table(table))
    print(f"speed-up fast vs per-impression: {t_slow_full / t_fast:.1f}x  (max |score diff| on the sample "
          f"{max_diff:.2e}); metrics over {len(dev)} impressions / {n_candidates} candidates: {t_metrics:.2f}s")
    payload = {"impressions": len(dev), "candidates": n_candidates, "news": dataset.n_news,
               "fast_seconds": t_fast, "encode_news_seconds": t_news, "fast_peak_mib": peak.peak_mib,
               "slow_sample": len(rows), "slow_seconds_sample": t_slow_sample,
               "slow_seconds_extrapolated": t_slow_full, "speedup": t_slow_full / t_fast,
               "max_abs_diff": max_diff, "metrics_seconds": t_metrics, "threads": args.threads,
               "untrained_model_metrics": {k: metrics[k] for k in M.METRIC_NAMES}}
    print(write_results("evaluate", payload))
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(["fast path", "per impression\n(extrapolated)"], [t_fast, t_slow_full], color=["#2a7", "#c44"])
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds for {len(dev):,} impressions / {n_candidates:,} candidates")
    ax.set_title(f"newsrec evaluate: {t_slow_full / t_fast:.0f}x faster than per-impression scoring")
    print(save_figure(fig, "evaluate"))


if __name__ == "__main__":
    main()
