"""Small helpers shared by the benchmarks: machine facts, the matrix-multiply ceiling, robust timing,
peak memory, tables, and JSON + PNG output into ``docs/benchmarks/``.

Shared 2-core machines are noisy (single timings ±2×): compare variants measured in the same run,
report medians after a warm-up, and state the machine beside every number.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from newsrec.utils.io import atomic_path, write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "docs" / "benchmarks"


# ---------------------------------------------------------------------------------------------
# machine


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.M)
    return match.group(1).strip() if match else platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model and usable cores, memory, Python/torch versions, threads and the date."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    mem_gb = None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
        mem_gb = round(kb / 1024 ** 2, 1)
    except (OSError, AttributeError):
        pass
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Seconds per call: median and best over ``times`` (warm-up calls excluded)."""

    median: float
    best: float
    times: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5, min_seconds: float = 0.0,
            max_seconds: float | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times, then ``repeat`` times (more until ``min_seconds`` have passed;
    fewer, but at least once, when ``max_seconds`` have passed); report median and best wall time
    per call."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        if max_seconds is not None and elapsed >= max_seconds:
            break
        if len(times) >= repeat and elapsed >= min_seconds:
            break
    return Timing(median=statistics.median(times), best=min(times), times=times)


def matmul_ceiling(dtype: torch.dtype = torch.float32, *, size: int = 2048, repeat: int = 5,
                   max_seconds: float = 5.0) -> float:
    """Measured GFLOP/s of a square ``size``³ matrix product in ``dtype`` on this machine (best of
    up to ``repeat`` calls within ``max_seconds``): the ceiling achieved rates are compared to.

    A CPU without bf16 matrix units (no AMX / AVX512-BF16) runs bf16 products far *slower* than
    fp32; a probe at 256³ shrinks ``size`` so that such a machine still answers in seconds."""
    probe_a, probe_b = torch.randn(256, 256).to(dtype), torch.randn(256, 256).to(dtype)
    probe = time_fn(lambda: torch.mm(probe_a, probe_b), warmup=1, repeat=3)
    probe_rate = 2 * 256 ** 3 / probe.best  # FLOP/s
    while size > 256 and 2 * size ** 3 / probe_rate > max_seconds / 4:
        size //= 2
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    timing = time_fn(lambda: torch.mm(a, b), warmup=1, repeat=repeat, max_seconds=max_seconds)
    return 2 * size ** 3 / timing.best / 1e9


# ---------------------------------------------------------------------------------------------
# memory


def _status_kb(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakMemory:
    """Peak resident memory above the starting point while the block ran (MiB; None where the OS
    gives no resettable peak, i.e. outside Linux)."""

    peak_mib: float | None = None


@contextlib.contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Measure the peak RSS growth of a block: frees cached heap memory, resets the kernel's
    high-water mark (``/proc/self/clear_refs``), runs the block, reads ``VmHWM``."""
    result = PeakMemory()
    _release_free_memory()
    base = _status_kb("VmRSS")
    can_reset = False
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        can_reset = True
    yield result
    peak = _status_kb("VmHWM")
    if can_reset and base is not None and peak is not None:
        result.peak_mib = max(peak - base, 0) / 1024


# ---------------------------------------------------------------------------------------------
# output


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of ``rows`` (floats shown with 3 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], *, out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` (plus ``machine`` if absent) to ``out_dir/<name>.json`` atomically."""
    payload = {"benchmark": name, **payload}
    payload.setdefault("machine", machine_info())
    path = out_dir / f"{name}.json"
    write_json(path, payload)
    return path


def save_figure(fig: Any, name: str, *, out_dir: Path = RESULTS_DIR) -> Path:
    """Save a matplotlib figure to ``out_dir/<name>.png`` atomically and close it."""
    import matplotlib.pyplot as plt

    path = out_dir / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def use_agg_backend() -> None:
    """Select matplotlib's file-only backend (no display on servers/CI)."""
    import matplotlib

    matplotlib.use("Agg")
