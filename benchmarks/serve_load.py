"""End-to-end load on 127.0.0.1: uvicorn serving ``/recommend`` (retrieve 200 from the pool, re-rank,
return 10), a bounded client loop at a fixed concurrency; QPS, p50/p95/p99 and 5xx count for
retrieval only and for retrieval + re-rank.

The service is real (tiny generated data set → ingest → model → index); the pool is padded to
``--n`` news with clustered vectors around the real news vectors, registered as fresh news, so
retrieval runs over a pool of production size. Model weights are untrained unless ``--model`` is
given: latency does not depend on them.

    python benchmarks/serve_load.py --n 1000000 --seconds 60 --concurrency 4
    python benchmarks/serve_load.py --n 100000 --seconds 10 --no-rerank      # quick
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import format_table, machine_info, save_figure, use_agg_backend, write_results  # noqa: E402


def build_service_dirs(root: Path) -> tuple[Path, Path, Path]:
    """(data_dir, model_dir, reranker_dir or None-able path) from a tiny generated data set."""
    import torch

    from newsrec.config import config_from_dict
    from newsrec.data.artifact import open_dataset
    from newsrec.data.ingest import ingest
    from newsrec.data.synth import generate
    from newsrec.inference.model_io import build_model, save_model

    generate(root / "raw", size="tiny", seed=0)
    cfg = config_from_dict({"tracking": {"enabled": False}, "rerank": {"epochs": 1}})
    ingest(cfg, train=root / "raw" / "MINDsynth_train.zip", dev=root / "raw" / "MINDsynth_dev.zip",
           out_dir=root / "data")
    dataset = open_dataset(root / "data")
    torch.manual_seed(0)
    save_model(root / "model", build_model(cfg, dataset), cfg, dataset=dataset)
    return root / "data", root / "model", root / "reranker"


def padded_service(model_dir: Path, data_dir: Path, reranker_dir: Path | None, *, n: int, seed: int):
    """A Recommender whose index holds the artifact's news plus synthetic fresh news up to ``n``."""
    from newsrec.config import IndexConfig
    from newsrec.data.artifact import open_dataset
    from newsrec.inference.scoring import encode_all_news
    from newsrec.inference.model_io import load_model
    from newsrec.inference.rerank import load_reranker
    from newsrec.serve.index import build_index
    from newsrec.serve.service import Recommender

    loaded = load_model(model_dir)
    dataset = open_dataset(data_dir)
    real = encode_all_news(loaded.model, dataset, show_progress=False)[1:].numpy()
    rng = np.random.default_rng(seed)
    extra = max(n - len(real), 0)
    spread = real.std(axis=0, keepdims=True)
    parents = rng.integers(0, len(real), size=extra)
    synthetic = np.empty((extra, real.shape[1]), dtype=np.float32)
    for s in range(0, extra, 200_000):  # clustered around real news: topics of the pool
        p = parents[s:s + 200_000]
        synthetic[s:s + len(p)] = real[p] + 0.3 * spread * rng.standard_normal((len(p), real.shape[1]),
                                                                               dtype=np.float32)
    vectors = np.concatenate([real, synthetic])
    keys = np.arange(1, len(vectors) + 1, dtype=np.int64)
    t0 = time.perf_counter()
    index = build_index(vectors, keys, cfg=IndexConfig(device="cpu"), base_news=dataset.n_news)
    build_s = time.perf_counter() - t0
    index.fresh = [{"news_id": f"S{k}", "title": f"synthetic {k}", "category": "", "key": int(k)}
                   for k in keys[dataset.n_news:]]
    reranker = load_reranker(reranker_dir, retriever_dir=model_dir) if reranker_dir else None
    service = Recommender(model=loaded.model, config=loaded.config, dataset=dataset, index=index,
                          reranker=reranker)
    return service, build_s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_process(port: int, users: list[str], seconds: float, concurrency: int, k: int,
                    max_requests: int) -> dict:
    """Runs in its own process (so the client never holds the server's GIL): ``concurrency`` client
    threads post /recommend for ``seconds``; returns latencies (s), statuses and the time the server
    says each answer took (``took_ms``)."""
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    stages: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(worker: int) -> None:
        rng = np.random.default_rng(worker)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(5):  # warm-up
                http.post("/recommend", json={"user_id": users[int(rng.integers(len(users)))], "k": k})
            while time.perf_counter() < stop_at:
                with lock:
                    if len(statuses) >= max_requests:
                        return
                t0 = time.perf_counter()
                r = http.post("/recommend", json={"user_id": users[int(rng.integers(len(users)))], "k": k})
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        stages.append(float(r.json()["took_ms"]))

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return {"latencies": latencies, "statuses": statuses, "stages": stages,
            "wall": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


def run_load(service, *, seconds: float, concurrency: int, k: int, max_requests: int) -> dict:
    """Start uvicorn on 127.0.0.1, fire requests from ``concurrency`` client threads of a separate
    process for ``seconds`` (at most ``max_requests``), stop it; latency seen by the client, and the
    time spent inside the endpoint (``took_ms``: the rest is HTTP, JSON and waiting for a core)."""
    import multiprocessing

    import uvicorn

    from newsrec.serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, save_on_shutdown=False), host="127.0.0.1",
                                           port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    users = list(service._user_rows())[:500]
    load_before = os.getloadavg()[0]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        server_cpu = time.process_time()  # this process: the server (its threads) from here on
        out = pool.apply(_client_process, (port, users, seconds, concurrency, k, max_requests))
        server_cpu = time.process_time() - server_cpu
    server.should_exit = True
    thread.join(timeout=10)
    lat = np.asarray(out["latencies"]) * 1e3
    st = np.asarray(out["statuses"])
    took = np.asarray(out["stages"]) if out["stages"] else np.zeros(1)
    stage_ms = {"endpoint_p50_ms": round(float(np.percentile(took, 50)), 2),
                "endpoint_p99_ms": round(float(np.percentile(took, 99)), 2)}
    return {"requests": len(st), "qps": len(st) / out["wall"], "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "errors_5xx": int((st >= 500).sum()), "non_200": int((st != 200).sum()), **stage_ms,
            "server_cpu_ms": round(1e3 * server_cpu / max(len(st), 1), 2),
            "client_cpu_ms": round(1e3 * out["cpu_s"] / max(len(st), 1), 2),
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="news in the pool")
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration per variant")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-requests", type=int, default=200_000, help="upper bound per variant")
    parser.add_argument("--model", default=None, help="MODEL_DIR (default: built from generated data)")
    parser.add_argument("--data", default=None, help="dataset artifact of --model")
    parser.add_argument("--reranker", default=None, help="RERANKER_DIR (default: trained briefly here)")
    parser.add_argument("--no-rerank", action="store_true", help="measure retrieval only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the service (default serve.torch_threads)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from newsrec.config import ServeConfig

    torch.set_num_threads(args.threads or ServeConfig().torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="newsrec-serve-load-"))
    if args.model:
        model_dir, data_dir = Path(args.model), Path(args.data) if args.data else None
        reranker_dir = Path(args.reranker) if args.reranker else None
        if data_dir is None:
            from newsrec.inference.model_io import load_model
            data_dir = Path(load_model(model_dir).manifest["dataset"]["path"])
    else:
        data_dir, model_dir, reranker_dir = build_service_dirs(tmp)
        if args.no_rerank:
            reranker_dir = None
        elif args.reranker:
            reranker_dir = Path(args.reranker)
        else:
            from newsrec.config import config_from_dict
            from newsrec.train.rerank import fit_reranker

            fit_reranker(config_from_dict({"tracking": {"enabled": False}, "rerank": {"epochs": 1}}),
                         retriever_dir=model_dir, data_dir=data_dir, out_dir=reranker_dir)
    rows = []
    service, build_s = padded_service(model_dir, data_dir, reranker_dir, n=args.n, seed=0)
    print(f"pool {service.index.count:,} news ({service.index.kind}, built in {build_s:.0f} s); "
          f"retrieve {service.serve_cfg.retrieve_k}, return {args.k}, concurrency {args.concurrency}, "
          f"{args.seconds:.0f} s per variant")
    reranker = service.reranker
    variants = [("retrieval only", None)] + ([("retrieval + re-rank", reranker)] if reranker else [])
    for name, rr in variants:
        service.reranker = rr
        row = {"variant": name, **run_load(service, seconds=args.seconds, concurrency=args.concurrency,
                                           k=args.k, max_requests=args.max_requests)}
        rows.append(row)
        print(format_table([row]))
    print()
    print(format_table(rows))
    print("target: p99 <= 50 ms at concurrency 4, zero 5xx")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busiest = max(max(r["load_avg_1min"]) for r in rows)
    note = (f"1-minute load average at most {busiest:.1f} on {cores} cores; the server, its request "
            f"threads and the load client (a separate process) all run on these cores")
    print(note)
    if args.no_write:
        return
    payload = {"n": service.index.count, "index_kind": service.index.kind,
               "index_params": service.index.params, "index_build_s": build_s, "note": note,
               "retrieve_k": service.serve_cfg.retrieve_k, "k": args.k, "concurrency": args.concurrency,
               "seconds": args.seconds, "rows": rows, "machine": machine_info()}
    print("wrote", write_results("serve_load", payload))
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rows))
    for i, p in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        ax.bar(x + (i - 1) * 0.25, [r[p] for r in rows], width=0.25, label=p.removesuffix("_ms"))
    ax.axhline(50, color="k", ls="--", lw=1, label="target p99")
    ax.set_xticks(x, [r["variant"] for r in rows])
    ax.set_ylabel("ms per /recommend")
    ax.set_title(f"{service.index.count:,} news, concurrency {args.concurrency}")
    ax.legend()
    print("wrote", save_figure(fig, "serve_load"))


if __name__ == "__main__":
    main()
