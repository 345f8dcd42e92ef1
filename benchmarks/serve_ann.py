"""ANN recall@100 against exact search over news vectors, with build time, memory and per-query
latency of each index kind beside the exact (Flat) index.

Vectors: *clustered* (topic-like Gaussian clusters with a heavy-tailed cluster size and per-news
norm spread, resembling trained news embeddings); user queries are means of a few news of one or
two topics. Random isotropic Gaussians are the worst case for any ANN index and unlike news.

    python benchmarks/serve_ann.py                 # 1M x 256 (HNSW build takes minutes on 2 cores)
    python benchmarks/serve_ann.py --n 100000      # quicker
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (format_table, machine_info, peak_memory, save_figure,  # noqa: E402
                               use_agg_backend, write_results)
from newsrec.config import IndexConfig  # noqa: E402
from newsrec.serve.index import build_index, index_memory_bytes  # noqa: E402


def clustered_news_vectors(n: int, dim: int, *, n_topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, dim] news vectors and their topic [n]: Zipf-sized topics, within-topic spread,
    per-news norm spread (popular/generic titles have larger norms)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_topics, dim)).astype(np.float32) / np.sqrt(dim)
    weights = 1.0 / np.arange(1, n_topics + 1) ** 0.8
    topic = rng.choice(n_topics, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), dtype=np.float32)
    chunk = 100_000
    for s in range(0, n, chunk):
        t = topic[s:s + chunk]
        noise = rng.standard_normal((len(t), dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
        scale = rng.lognormal(0.0, 0.25, size=(len(t), 1)).astype(np.float32)
        out[s:s + chunk] = (centres[t] + noise) * scale
    return out, topic


def user_queries(vectors: np.ndarray, topic: np.ndarray, n_queries: int, *, seed: int) -> np.ndarray:
    """float32 [n_queries, dim]: each the mean of 5-30 clicked news from one or two topics."""
    rng = np.random.default_rng(seed + 1)
    by_topic = {}
    queries = np.empty((n_queries, vectors.shape[1]), dtype=np.float32)
    for q in range(n_queries):
        topics = rng.choice(np.unique(topic[rng.integers(0, len(topic), size=4)]), size=2)
        clicks = []
        for t in topics:
            members = by_topic.setdefault(t, np.flatnonzero(topic == t))
            clicks.append(members[rng.integers(0, len(members), size=rng.integers(3, 15))])
        queries[q] = vectors[np.concatenate(clicks)].mean(axis=0)
    return queries


def measure(kind: str, vectors: np.ndarray, queries: np.ndarray, exact_keys: np.ndarray | None, *,
            k: int, cfg: IndexConfig) -> tuple[dict, np.ndarray]:
    keys = np.arange(1, len(vectors) + 1, dtype=np.int64)
    with peak_memory() as mem:
        t0 = time.perf_counter()
        index = build_index(vectors, keys, cfg=IndexConfig(**{**vars(cfg), "kind": kind, "device": "cpu"}),
                            base_news=len(vectors))
        build_s = time.perf_counter() - t0
    index.search(queries[:5], k)  # warm-up
    latencies = []
    found = np.empty((len(queries), k), dtype=np.int64)
    for i in range(len(queries)):
        t0 = time.perf_counter()
        found[i] = index.search(queries[i:i + 1], k).keys[0]
        latencies.append(time.perf_counter() - t0)
    lat = np.asarray(latencies) * 1e3
    recall = 1.0 if exact_keys is None else float(np.mean(
        [len(set(found[i]) & set(exact_keys[i])) / k for i in range(len(queries))]))
    row = {"index": kind, "params": ", ".join(f"{a}={b}" for a, b in index.params.items()) or "exact",
           f"recall@{k}": recall, "build_s": build_s, "memory_mb": index_memory_bytes(index) / 2 ** 20,
           "build_peak_mb": mem.peak_mib, "query_p50_ms": float(np.percentile(lat, 50)),
           "query_p99_ms": float(np.percentile(lat, 99)), "qps_1_thread": 1e3 / float(lat.mean())}
    return row, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="news vectors in the pool")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--kinds", default="hnsw,ivf,ivfpq", help="ANN kinds measured beside flat")
    parser.add_argument("--threads", type=int, default=2, help="faiss/torch threads")
    parser.add_argument("--no-write", action="store_true", help="print only; write no JSON/PNG")
    args = parser.parse_args()

    import faiss  # noqa: F401  (thread count only; the index module owns every other use)
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    vectors, topic = clustered_news_vectors(args.n, args.dim, n_topics=max(50, args.n // 2000), seed=0)
    queries = user_queries(vectors, topic, args.queries, seed=0)
    cfg = IndexConfig()
    print(f"{args.n:,} clustered news vectors x {args.dim}, {args.queries} user queries, k={args.k}")
    rows = []
    flat_row, exact = measure("flat", vectors, queries, None, k=args.k, cfg=cfg)
    rows.append(flat_row)
    print(format_table(rows))
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        row, _ = measure(kind, vectors, queries, exact, k=args.k, cfg=cfg)
        rows.append(row)
        print(format_table(rows[-1:]))
    for row in rows:
        row["speedup_vs_flat"] = flat_row["query_p50_ms"] / row["query_p50_ms"]
    print()
    print(format_table(rows))
    if args.no_write:
        return
    payload = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
               "vectors": "clustered (Zipf-sized topics, lognormal norms); queries = means of clicked news",
               "rows": rows, "machine": machine_info()}
    print("wrote", write_results("serve_ann", payload))
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["index"] for r in rows]
    ax1.bar(names, [r["query_p50_ms"] for r in rows], color="#4c72b0")
    ax1.set_ylabel("ms per query (p50)")
    ax1.set_yscale("log")
    ax1.set_title(f"latency, {args.n:,} x {args.dim}")
    ax2.bar(names, [r[f"recall@{args.k}"] for r in rows], color="#55a868")
    ax2.axhline(0.95, color="k", ls="--", lw=1)
    ax2.set_ylim(0.5, 1.0)
    ax2.set_title(f"recall@{args.k} vs exact")
    print("wrote", save_figure(fig, "serve_ann"))


if __name__ == "__main__":
    main()
