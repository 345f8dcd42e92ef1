"""Fastformer vs multi-head self-attention as the sequence grows.

1. One layer, batch 32, width d = 256 and 400, forward + backward, over N = 50 … 2,000 positions:
   time, peak memory and the MHSA/Fastformer ratio; the Fastformer layer's achieved GFLOP/s as a
   fraction of this machine's measured fp32 matrix-multiply ceiling.
2. The user encoder (default model config) forward + backward over histories of 50 … 2,000 clicks:
   time per position stays roughly constant for Fastformer (linear growth).

Prints tables, writes docs/benchmarks/scaling.json and scaling.png.

    python benchmarks/scaling.py            # full run, a few minutes on 2 cores
    python benchmarks/scaling.py --quick    # ~20 s smoke run (d=256, N ≤ 500)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR, format_table, machine_info, matmul_ceiling, peak_memory, save_figure, time_fn,
    use_agg_backend, write_results,
)
from newsrec.config import ModelConfig  # noqa: E402
from newsrec.models.attention import MultiHeadSelfAttention  # noqa: E402
from newsrec.models.encoders import UserEncoder  # noqa: E402
from newsrec.models.fastformer import FastformerAttention  # noqa: E402

BATCH = 32
HEADS = {256: 16, 400: 20}  # 400 = NRMS's 20 heads x 20


def fastformer_flops(batch: int, n: int, d: int, heads: int) -> float:
    """Matrix-product FLOPs of one Fastformer layer (value = query), forward + backward (≈ 3× forward)."""
    rows = batch * n
    forward = 2 * rows * (3 * d * d + 2 * d * heads)  # W_q, W_k, W_o; W_alpha, W_beta
    forward += 2 * 2 * rows * d  # the two weighted poolings
    return 3.0 * forward


def _fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x, mask).sum().backward()


def _inputs(batch: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, n, d, requires_grad=True)
    lengths = torch.randint(n // 2, n + 1, (batch,))
    lengths[0] = n
    mask = torch.arange(n)[None, :] < lengths[:, None]  # right-padded like real batches
    return x, mask


def measure(fn: Any, *, repeat: int) -> tuple[float, float | None]:
    """(median seconds, peak MiB) of ``fn``."""
    timing = time_fn(fn, warmup=1, repeat=repeat)
    with peak_memory() as mem:
        fn()
    return timing.median, mem.peak_mib


def layer_scaling(dims: list[int], lengths: list[int], *, repeat: int, fp32_ceiling: float) -> list[dict[str, Any]]:
    rows = []
    for d in dims:
        heads = HEADS.get(d, 16)
        torch.manual_seed(0)
        fast = FastformerAttention(d, d, heads)
        mhsa = MultiHeadSelfAttention(d, d, heads)
        for n in lengths:
            x, mask = _inputs(BATCH, n, d)
            t_fast, m_fast = measure(lambda: _fwd_bwd(fast, x, mask), repeat=repeat)
            t_mhsa, m_mhsa = measure(lambda: _fwd_bwd(mhsa, x, mask), repeat=repeat)
            gflops = fastformer_flops(BATCH, n, d, heads) / t_fast / 1e9
            rows.append({
                "d": d, "N": n,
                "fastformer_ms": t_fast * 1e3, "mhsa_ms": t_mhsa * 1e3, "speedup": t_mhsa / t_fast,
                "fastformer_mib": m_fast, "mhsa_mib": m_mhsa,
                "fastformer_gflops": gflops, "of_fp32_ceiling": gflops / fp32_ceiling,
            })
            print(format_table([rows[-1]]).splitlines()[-1], flush=True)
    return rows


def user_encoder_scaling(lengths: list[int], *, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for kind in ("fastformer", "mhsa"):
        cfg = ModelConfig(encoder=kind)
        torch.manual_seed(0)
        encoder = UserEncoder(cfg, max_history=max(lengths))
        encoder.train()
        for n in lengths:
            x, mask = _inputs(BATCH, n, cfg.hidden_size)
            seconds, mib = measure(lambda: _fwd_bwd(encoder, x, mask), repeat=repeat)
            rows.append({"encoder": kind, "history": n, "ms": seconds * 1e3,
                         "us_per_position": seconds * 1e6 / (BATCH * n), "peak_mib": mib})
            print(format_table([rows[-1]]).splitlines()[-1], flush=True)
    return rows


def plot(layer_rows: list[dict[str, Any]], user_rows: list[dict[str, Any]], fig_name: str, out_dir: Path) -> Path:
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for d in sorted({r["d"] for r in layer_rows}):
        rows = [r for r in layer_rows if r["d"] == d]
        ns = [r["N"] for r in rows]
        axes[0].plot(ns, [r["fastformer_ms"] for r in rows], "o-", label=f"Fastformer d={d}")
        axes[0].plot(ns, [r["mhsa_ms"] for r in rows], "s--", label=f"MHSA d={d}")
        if all(r["fastformer_mib"] is not None for r in rows):
            axes[1].plot(ns, [r["fastformer_mib"] for r in rows], "o-", label=f"Fastformer d={d}")
            axes[1].plot(ns, [r["mhsa_mib"] for r in rows], "s--", label=f"MHSA d={d}")
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms (fwd+bwd, B=32)",
                title="One layer: time")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="peak MiB",
                title="One layer: peak memory")
    for kind in ("fastformer", "mhsa"):
        rows = [r for r in user_rows if r["encoder"] == kind]
        axes[2].plot([r["history"] for r in rows], [r["us_per_position"] for r in rows],
                     "o-" if kind == "fastformer" else "s--", label=kind)
    axes[2].set(xscale="log", xlabel="history length (clicks)", ylabel="µs per position (fwd+bwd)",
                title="User encoder: time per position")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, fig_name, out_dir=out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~20 s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    parser.add_argument("--name", default=None, help="output name (default scaling, scaling_quick with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.name or ("scaling_quick" if args.quick else "scaling")

    if args.quick:
        dims, lengths, user_lengths, repeat, mm_size = [256], [50, 200, 500], [50, 200, 500], 2, 1024
    else:
        dims, lengths, repeat, mm_size = [256, 400], [50, 100, 200, 500, 1000, 2000], 3, 2048
        user_lengths = [50, 100, 200, 500, 1000, 2000]

    machine = machine_info()
    fp32 = matmul_ceiling(torch.float32, size=mm_size)
    bf16 = matmul_ceiling(torch.bfloat16, size=mm_size)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"matmul ceiling: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s\n", flush=True)

    print(f"one layer, B={BATCH}, forward+backward")
    layer_rows = layer_scaling(dims, lengths, repeat=repeat, fp32_ceiling=fp32)
    print("\n" + format_table(layer_rows))

    print(f"\nuser encoder (default model config), B={BATCH}, forward+backward")
    user_rows = user_encoder_scaling(user_lengths, repeat=repeat)
    print("\n" + format_table(user_rows))

    fast = [r for r in user_rows if r["encoder"] == "fastformer"]
    growth = fast[-1]["us_per_position"] / fast[0]["us_per_position"]
    print(f"\nFastformer user encoder: time per position at history {fast[-1]['history']} is "
          f"{growth:.2f}x that at {fast[0]['history']} (1.0 = perfectly linear growth)")

    json_path = write_results(name, {
        "machine": machine, "threads": args.threads, "quick": args.quick, "batch": BATCH,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "matmul_gflops": {"fp32": fp32, "bf16": bf16},
        "layer": layer_rows, "user_encoder": user_rows,
        "user_encoder_per_position_growth": growth,
    }, out_dir=args.out_dir)
    png_path = plot(layer_rows, user_rows, name, args.out_dir)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
