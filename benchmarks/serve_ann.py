"""ANN recall@100 against exact search over news vectors, with build time, memory and per-query
latency of each index kind beside the exact (Flat) index.

Vectors (exactly): n_topics = max(50, n / 2000) topic centres ~ N(0, I/dim); topic sizes Zipf-like
(weight 1/rank^0.8); news = (centre + N(0, 0.36 I/dim)) * s with s ~ lognormal(0, 0.25) per news, so
norms spread over about 0.6-2.1 (p1-p99) around a median of 1.16 and a max of about 3.7. User
queries are means of 3-14 clicked news from each of two topics. The within-topic spread is isotropic
in all 256 dimensions — a hard case for graph indexes (trained encoders' vectors usually have far
lower intrinsic dimension); random isotropic Gaussians without topics would be harder still.

Every approximate kind searches the L2 reduction of inner product (see newsrec.serve.index) and
re-scores its proposals exactly. The 1-minute load average is recorded beside each row: on a shared
2-core machine latencies move with it.

    python benchmarks/serve_ann.py                 # 1M x 256 (HNSW build takes minutes on 2 cores)
    python benchmarks/serve_ann.py --n 100000      # quicker
"""
from __future__ import annotations

import argparse
import os
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
    load_before = os.getloadavg()[0]
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
           "query_p99_ms": float(np.percentile(lat, 99)), "qps_1_thread": 1e3 / float(lat.mean()),
           "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    return row, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="news vectors in the pool")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--kinds", default="ivf,ivfsq,ivfpq,hnsw", help="ANN kinds measured beside flat")
    parser.add_argument("--threads", type=int, default=2, help="faiss/torch threads while building")
    parser.add_argument("--no-write", action="store_true", help="print only; write no JSON/PNG")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    vectors, topic = clustered_news_vectors(args.n, args.dim, n_topics=max(50, args.n // 2000), seed=0)
    queries = user_queries(vectors, topic, args.queries, seed=0)
    cfg = IndexConfig(build_threads=args.threads, search_threads=1)  # one faiss thread per query
    norms = np.linalg.norm(vectors, axis=1)
    norm_summary = {f"p{p}": round(float(np.percentile(norms, p)), 3) for p in (1, 50, 99)}
    norm_summary["max"] = round(float(norms.max()), 3)
    print(f"{args.n:,} clustered news vectors x {args.dim} (norms {norm_summary}), {args.queries} user "
          f"queries, k={args.k}, load average {os.getloadavg()[0]:.2f}")
    payload = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
               "vectors": __doc__.split("\n\n")[1].replace("\n", " "), "norms": norm_summary,
               "note": "latencies are single-query, 1 faiss thread, on a shared 2-core machine; "
                       "compare rows measured in the same run and read load_avg_1min beside them",
               "rows": [], "machine": machine_info()}
    rows = payload["rows"]
    flat_row, exact = measure("flat", vectors, queries, None, k=args.k, cfg=cfg)
    rows.append(flat_row)
    print(format_table(rows))
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        row, _ = measure(kind, vectors, queries, exact, k=args.k, cfg=cfg)
        row["speedup_vs_flat"] = flat_row["query_p50_ms"] / row["query_p50_ms"]
        rows.append(row)
        print(format_table(rows[-1:]))
        if not args.no_write:  # each finished row is kept even if a later build is cut short
            write_results("serve_ann", payload)
    flat_row["speedup_vs_flat"] = 1.0
    print()
    print(format_table(rows))
    if args.no_write:
        return
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
