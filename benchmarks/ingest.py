"""Ingest speed and memory on a MIND-large-sized train split, beside a plain pandas read.

    python benchmarks/ingest.py [--size large] [--data data/raw/bench] [--repeat 1]

Generates ``MINDsynth_{train,dev,test}.zip`` with ``newsrec.data.synth`` at the given size when the
train zip is not there yet (cached under ``data/raw/bench/<size>/``), then runs, each in a fresh
process so peak memory is its own:

* ``newsrec ingest`` of the train split (validation, vocabulary, id mapping, artifact written);
* ``pandas.read_csv`` of the same behaviors.tsv (tab-separated, no quoting): parsing only, no
  validation, no tokenising, no output — the floor a plain reader gives.

Prints a table (wall seconds, peak RSS, impressions/s, ratio to pandas) and writes
``docs/benchmarks/ingest.json`` and ``docs/benchmarks/ingest.png``. Targets: ingest ≤ 60 s wall and
≤ 6 GB peak RSS on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60.0
TARGET_RSS_GB = 6.0

INGEST_CODE = """
import json, resource, sys, time
from newsrec.config import Config
from newsrec.data.ingest import ingest
start = time.perf_counter()
result = ingest(Config(), train=sys.argv[1], out_dir=sys.argv[2])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "impressions": result.manifest["splits"]["train"]["impressions"],
                  "candidates": result.manifest["splits"]["train"]["candidates"],
                  "news": result.manifest["news"]["count"], "vocab": result.manifest["vocab_size"]}))
"""

PANDAS_CODE = """
import csv, json, resource, sys, time, zipfile
import pandas as pd
start = time.perf_counter()
with zipfile.ZipFile(sys.argv[1]) as zf:
    member = next(n for n in zf.namelist() if n.endswith("behaviors.tsv"))
    with zf.open(member) as fh:
        frame = pd.read_csv(fh, sep="\\t", header=None, quoting=csv.QUOTE_NONE, dtype=str,
                            names=["impression_id", "user_id", "time", "history", "impressions"])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "impressions": len(frame)}))
"""


def ensure_data(size: str, data_dir: Path, seed: int) -> Path:
    train_zip = data_dir / "MINDsynth_train.zip"
    if train_zip.is_file():
        return train_zip
    from newsrec.data.synth import generate

    print(f"generating synth --size {size} into {data_dir} (once; cached)", flush=True)
    start = time.perf_counter()
    generate(data_dir, size=size, seed=seed)
    print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    return train_zip


def run_child(code: str, *args: str) -> dict:
    env = dict(os.environ, NEWSREC_PROGRESS="0")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(code: str, repeat: int, *args: str) -> dict:
    runs = [run_child(code, *args) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    best["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    return best


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["newsrec ingest", "pandas read_csv"]
    rows = [results["ingest"], results["pandas"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(names, [r["seconds"] for r in rows], color=["#3a6ea5", "#aaaaaa"])
    axes[0].axhline(TARGET_SECONDS, color="#c0392b", linestyle="--", label=f"target {TARGET_SECONDS:.0f} s")
    axes[0].set_ylabel("wall seconds")
    axes[0].legend()
    axes[1].bar(names, [r["peak_rss_gb"] for r in rows], color=["#3a6ea5", "#aaaaaa"])
    axes[1].axhline(TARGET_RSS_GB, color="#c0392b", linestyle="--", label=f"target {TARGET_RSS_GB:.0f} GB")
    axes[1].set_ylabel("peak RSS (GB)")
    axes[1].legend()
    fig.suptitle(f"Ingest of a {results['impressions']:,}-impression train split "
                 f"({results['machine']['cpus']} CPUs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", help="synth size of the generated data (default large)")
    parser.add_argument("--data", default=None, help="folder of MINDsynth_*.zip (default data/raw/bench/<size>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each reader; the best is reported")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = parser.parse_args()

    data_dir = Path(args.data) if args.data else ROOT / "data" / "raw" / "bench" / args.size
    train_zip = ensure_data(args.size, data_dir, args.seed)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        ingest_result = best_of(INGEST_CODE, args.repeat, str(train_zip), str(Path(tmp) / "artifact"))
    pandas_result = best_of(PANDAS_CODE, args.repeat, str(train_zip))

    results = {
        "benchmark": "ingest",
        "data": {"size": args.size, "train_zip": train_zip.name, "zip_bytes": train_zip.stat().st_size},
        "impressions": ingest_result["impressions"],
        "ingest": ingest_result,
        "pandas": pandas_result,
        "ratio_ingest_over_pandas": ingest_result["seconds"] / pandas_result["seconds"],
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_gb": TARGET_RSS_GB},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    "load_average_1m": os.getloadavg()[0]},
    }
    n = results["impressions"]
    print()
    print(f"ingest benchmark: train split of {n:,} impressions, {ingest_result['candidates']:,} candidates, "
          f"{ingest_result['news']:,} news")
    print(f"{'reader':<34}{'wall s':>9}{'peak RSS GB':>13}{'impr/s':>12}{'vs pandas':>11}")
    for name, row in (("newsrec ingest (validate+artifact)", ingest_result),
                      ("pandas read_csv (parse only)", pandas_result)):
        print(f"{name:<34}{row['seconds']:>9.1f}{row['peak_rss_gb']:>13.2f}{n / row['seconds']:>12,.0f}"
              f"{row['seconds'] / pandas_result['seconds']:>10.2f}x")
    ok_time = ingest_result["seconds"] <= TARGET_SECONDS
    ok_mem = ingest_result["peak_rss_gb"] <= TARGET_RSS_GB
    print(f"targets: wall ≤ {TARGET_SECONDS:.0f} s {'met' if ok_time else 'MISSED'}, "
          f"peak RSS ≤ {TARGET_RSS_GB:.0f} GB {'met' if ok_mem else 'MISSED'} "
          f"(1-min load average during the run: {results['machine']['load_average_1m']:.1f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out / "ingest.png")
    print(f"wrote {out / 'ingest.json'} and {out / 'ingest.png'}")


if __name__ == "__main__":
    main()
