"""Ingest speed and memory on a MIND-large-sized train split, beside a plain pandas read.

    python benchmarks/ingest.py                                        # synth --size large (cached)
    python benchmarks/ingest.py --train data/raw/MINDlarge_train.zip   # an existing split
    python benchmarks/ingest.py --train PATH --repeat 3

``--train`` takes any train split ``newsrec ingest`` takes (a zip, or a folder holding news.tsv and
behaviors.tsv), e.g. the real MINDlarge_train.zip. Without it, ``MINDsynth_{train,dev,test}.zip``
are generated with ``newsrec.data.synth`` at ``--size`` when the train zip is not there yet (cached
under ``data/raw/bench/<size>/``). Then each reader runs in a fresh process, so peak memory is its
own:

* ``newsrec ingest`` of the train split (validation, vocabulary, id mapping, artifact written);
* ``pandas.read_csv`` of the same behaviors.tsv (tab-separated, no quoting): parsing only, no
  validation, no tokenising, no output — the floor a plain reader gives.

Prints both side by side (wall seconds, peak RSS, impressions/s, ratio ingest / pandas) with the
load on the machine while each ran: the 1-minute load average before and after, and the cores other
processes kept busy (from /proc/stat, minus the reader's own CPU time). Writes
``docs/benchmarks/ingest.json`` and ``docs/benchmarks/ingest.png``. Targets: ingest ≤ 60 s wall and
≤ 6 GB peak RSS on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (RESULTS_DIR, format_table, machine_info, save_figure,  # noqa: E402
                               use_agg_backend, write_results)

TARGET_SECONDS = 60.0
TARGET_RSS_GB = 6.0
BUSY_OTHER_NOTE = 0.5  # cores used by other processes above which the JSON carries a warning

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
path, member = sys.argv[1], sys.argv[2]
options = dict(sep="\\t", header=None, quoting=csv.QUOTE_NONE, dtype=str,
               names=["impression_id", "user_id", "time", "history", "impressions"])
start = time.perf_counter()
if member:
    with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
        frame = pd.read_csv(fh, **options)
else:
    frame = pd.read_csv(path, **options)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "impressions": len(frame)}))
"""


def ensure_data(size: str, data_dir: Path, seed: int) -> Path:
    """The generated train zip under ``data_dir`` (generated there first if missing)."""
    train_zip = data_dir / "MINDsynth_train.zip"
    if train_zip.is_file():
        return train_zip
    from newsrec.data.synth import generate

    print(f"generating synth --size {size} into {data_dir} (once; cached)", flush=True)
    start = time.perf_counter()
    generate(data_dir, size=size, seed=seed)
    print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    return train_zip


def _busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat; None where there is none)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its JSON line, plus the load while it ran:
    ``load_avg_1min`` [before, after] and ``other_busy_cores`` (cores busy with other processes)."""
    env = dict(os.environ, NEWSREC_PROGRESS="0")
    load_before = os.getloadavg()[0]
    busy_before, own_before, started = _busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    busy_after, own_after = _busy_seconds(), _children_cpu_seconds()
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    other = None
    if busy_before is not None and busy_after is not None:
        other = round(max(busy_after - busy_before - (own_after - own_before), 0.0) / wall, 2)
    result["other_busy_cores"] = other
    return result


def best_of(code: str, repeat: int, *args: str) -> dict[str, Any]:
    """The fastest of ``repeat`` runs, with every run's seconds."""
    runs = [run_child(code, *args) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    best["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    return best


def side_by_side(results: dict[str, Any]) -> str:
    """The table printed: one row per measure, ingest and pandas beside each other, and their ratio."""
    ingest, pandas, n = results["ingest"], results["pandas"], results["impressions"]
    rows = []
    for measure, key in (("wall s", "seconds"), ("peak RSS GB", "peak_rss_gb")):
        rows.append({"": measure, "newsrec ingest": ingest[key], "pandas read_csv": pandas[key],
                     "ratio": ingest[key] / pandas[key]})
    rows.append({"": "impressions/s", "newsrec ingest": n / ingest["seconds"],
                 "pandas read_csv": n / pandas["seconds"], "ratio": pandas["seconds"] / ingest["seconds"]})
    for measure, key in (("load avg 1 min", "load_avg_1min"), ("other busy cores", "other_busy_cores")):
        rows.append({"": measure, "newsrec ingest": _show(ingest[key]), "pandas read_csv": _show(pandas[key]),
                     "ratio": None})
    return format_table(rows)


def _show(value: Any) -> str:
    """A table cell: ``[before, after]`` as ``a → b``, a number with two decimals, None as ``-``."""
    if isinstance(value, list):
        return " → ".join(f"{v:.2f}" for v in value)
    return "-" if value is None else f"{value:.2f}"


def plot(results: dict[str, Any], out_dir: Path) -> Path:
    """Bar charts of wall time and peak RSS against the targets; written to ``out_dir/ingest.png``."""
    use_agg_backend()
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
    load = max(max(r["load_avg_1min"]) for r in rows)
    fig.suptitle(f"Ingest of a {results['impressions']:,}-impression train split "
                 f"({results['machine']['cores']} cores, 1-min load average up to {load:.1f})")
    fig.tight_layout()
    return save_figure(fig, "ingest", out_dir=out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default=None,
                        help="an existing train split (zip or folder); default: generate synth data")
    parser.add_argument("--size", default="large", help="synth size of the generated data (default large)")
    parser.add_argument("--data", default=None, help="folder of MINDsynth_*.zip (default data/raw/bench/<size>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each reader; the best is reported")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for ingest.json and ingest.png")
    args = parser.parse_args()

    from newsrec.data.mind import locate_split

    if args.train is not None:
        train = Path(args.train)
        data: dict[str, Any] = {"train": train.name, "generated": False}
    else:
        data_dir = Path(args.data) if args.data else ROOT / "data" / "raw" / "bench" / args.size
        train = ensure_data(args.size, data_dir, args.seed)
        data = {"train": train.name, "generated": True, "size": args.size, "seed": args.seed}
    behaviors = locate_split(train).behaviors
    behaviors_path = str(behaviors.container if behaviors.member else behaviors.container / behaviors.name)
    data["behaviors"] = behaviors.member or behaviors.name

    with tempfile.TemporaryDirectory(dir=train.resolve().parent, prefix=".ingest-bench-") as tmp:
        ingest_result = best_of(INGEST_CODE, args.repeat, str(train), str(Path(tmp) / "artifact"))
    pandas_result = best_of(PANDAS_CODE, args.repeat, behaviors_path, behaviors.member or "")

    results: dict[str, Any] = {
        "data": data,
        "impressions": ingest_result["impressions"],
        "ingest": ingest_result,
        "pandas": pandas_result,
        "ratio_ingest_over_pandas": {"seconds": ingest_result["seconds"] / pandas_result["seconds"],
                                     "peak_rss": ingest_result["peak_rss_gb"] / pandas_result["peak_rss_gb"]},
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_gb": TARGET_RSS_GB},
        "machine": machine_info(),
    }
    busy = [r["other_busy_cores"] for r in (ingest_result, pandas_result) if r["other_busy_cores"] is not None]
    if busy and max(busy) > BUSY_OTHER_NOTE:
        results["note"] = (f"other processes kept up to {max(busy):.1f} cores busy while measuring: the "
                           f"machine was shared, so both readers' times are pessimistic")

    n = results["impressions"]
    print()
    print(f"ingest benchmark: train split {data['train']} of {n:,} impressions, "
          f"{ingest_result['candidates']:,} candidates, {ingest_result['news']:,} news "
          f"({results['machine']['cores']} cores)")
    print(side_by_side(results))
    ok_time = ingest_result["seconds"] <= TARGET_SECONDS
    ok_mem = ingest_result["peak_rss_gb"] <= TARGET_RSS_GB
    print(f"targets: wall ≤ {TARGET_SECONDS:.0f} s {'met' if ok_time else 'MISSED'}, "
          f"peak RSS ≤ {TARGET_RSS_GB:.0f} GB {'met' if ok_mem else 'MISSED'}")
    if "note" in results:
        print(f"note: {results['note']}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_results("ingest", results, out_dir=out_dir)
    png_path = plot(results, out_dir)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
