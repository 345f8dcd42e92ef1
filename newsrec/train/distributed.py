"""torch.distributed set-up for ``torchrun`` (one process per device; gloo on CPU, nccl on GPU).

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is the single-process
identity: rank 0 of 1, no process group. Only rank 0 logs, evaluates and saves; the others train
their shard of every global batch and follow rank 0's early-stopping decision.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from newsrec.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False  # this module created the process group (so it tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """``train.device`` (``cpu`` | ``cuda`` | ``cuda:N`` | ``auto``) → a torch device: ``auto`` = cuda
    when available, else cpu; plain ``cuda`` = this process's GPU (``local_rank``) under torchrun.
    ConfigError when CUDA is asked for but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but no CUDA device is available; "
                              f"use -o train.device=cpu")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """True when this CPU has AMX tiles for bf16 (Sapphire Rapids and later): torch reports the
    AVX512 + AMX capability, or /proc/cpuinfo lists the amx_bf16 flag."""
    if cpuinfo is None:
        try:
            if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
                return True
        except AttributeError:
            pass
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    return "amx_bf16" in cpuinfo.split()


def bf16_pays(device: torch.device, *, amx: bool | None = None) -> tuple[bool, str]:
    """Whether bf16 autocast speeds training up on ``device``, and if not, why (one line). It pays
    on a GPU with bf16 support and on a CPU with AMX; elsewhere bf16 matrix products are emulated,
    about 10x slower than fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, ""
        return False, "train.bf16 off: this GPU has no bf16 support; training in fp32"
    if device.type == "cpu":
        if cpu_has_amx() if amx is None else amx:
            return True, ""
        return False, ("train.bf16 off: this CPU has no AMX (bf16 would run ~10x slower than fp32); "
                       "training in fp32")
    return False, f"train.bf16 off: bf16 is not used on device '{device.type}'; training in fp32"


def setup(device_name: str) -> DistContext:
    """Join the process group torchrun describes in the environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local_rank)
    if world_size <= 1:
        return DistContext(rank=0, world_size=1, local_rank=0, device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=_dt.timedelta(minutes=30))
        created = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device, initialized_here=created)


def teardown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when running under torchrun, else ``module``."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def broadcast(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object, e.g. the stop decision)."""
    if not ctx.distributed:
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_rows(ids: torch.Tensor, rows: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``ids [n_r]`` and ``rows [n_r, D]`` (n_r may differ between ranks), concatenated
    in rank order on every rank; the identity on one process."""
    if not ctx.distributed:
        return ids, rows
    count = torch.tensor([len(ids)], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    most = max(sizes)
    if most == 0:
        return ids[:0], rows[:0]
    padded_ids = torch.zeros(most, dtype=torch.int64, device=rows.device)
    padded_ids[:len(ids)] = ids.to(rows.device)
    padded_rows = rows.new_zeros(most, rows.shape[1])
    padded_rows[:len(rows)] = rows
    all_ids = [torch.empty_like(padded_ids) for _ in range(ctx.world_size)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(ctx.world_size)]
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_rows, padded_rows)
    return (torch.cat([a[:n] for a, n in zip(all_ids, sizes)]),
            torch.cat([r[:n] for r, n in zip(all_rows, sizes)]))
