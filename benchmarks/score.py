"""Batch top-K scoring throughput: `score --top-k 100` shape, 100k users over 50k news.

    .venv/bin/python benchmarks/score.py [--users 100000] [--news 50000] [--k 100] [--chunk-users 20000]

Runs the same library pieces as `newsrec score --top-k` (user encoder over the latest history,
then exact inner-product top-K with clicked news excluded, `ExactRetriever`) on the default model
config with random news vectors and random histories (lengths log-normal, median ~20, capped at
history_len). Prints users/s and peak memory; writes docs/benchmarks/score.{json,png}.
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
from newsrec.eval.scoring import ExactRetriever  # noqa: E402
from newsrec.inference.histories import Histories  # noqa: E402
from newsrec.inference.scoring import encode_users  # noqa: E402
from newsrec.models.recommender import NewsRecommender  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--news", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-users", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = Config()
    torch.manual_seed(0)
    model = NewsRecommender(config.model, vocab_size=1000, n_categories=10, n_subcategories=50,
                            max_history=config.data.history_len).eval()
    rng = np.random.default_rng(0)
    news_vectors = torch.from_numpy(rng.normal(size=(args.news + 1, model.news_dim)).astype(np.float32) * 0.1)
    news_vectors[0] = 0
    lengths = np.clip(np.rint(rng.lognormal(np.log(20), 1.0, args.users)), 0, 400).astype(np.int64)
    offsets = np.zeros(args.users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    history = rng.integers(1, args.news + 1, size=int(offsets[-1])).astype(np.int32)
    retriever = ExactRetriever(news_vectors, np.arange(1, args.news + 1), batch_size=config.train.eval_batch_size)
    t_encode = t_search = 0.0
    with peak_memory() as peak:
        start = time.perf_counter()
        for lo in range(0, args.users, args.chunk_users):
            hi = min(lo + args.chunk_users, args.users)
            t0 = time.perf_counter()
            users = encode_users(model, news_vectors, Histories(history, offsets).recent(None, np.arange(lo, hi)),
                                 history_len=config.data.history_len, batch_size=config.train.eval_batch_size)
            t1 = time.perf_counter()
            exclude = [set(history[offsets[u]:offsets[u + 1]].tolist()) for u in range(lo, hi)]
            found = retriever.search(users.numpy(), args.k, exclude=exclude)
            assert found.keys.shape == (hi - lo, args.k)
            t_search += time.perf_counter() - t1
            t_encode += t1 - t0
        total = time.perf_counter() - start
    rows = [{"users": args.users, "news": args.news, "k": args.k, "seconds": total, "users/s": args.users / total,
             "encode users s": t_encode, "top-k s": t_search, "peak MiB": peak.peak_mib}]
    print(format_table(rows))
    print(write_results("score", {**rows[0], "users_per_second": args.users / total, "threads": args.threads,
                                  "chunk_users": args.chunk_users}))
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(["encode users", "exact top-k"], [t_encode, t_search], color=["#27a", "#a72"])
    ax.set_xlabel("seconds")
    ax.set_title(f"score --top-k {args.k}: {args.users:,} users over {args.news:,} news, "
                 f"{args.users / total:,.0f} users/s, peak {peak.peak_mib or 0:,.0f} MiB")
    print(save_figure(fig, "score"))


if __name__ == "__main__":
    main()
