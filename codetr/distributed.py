"""Minimal torch.distributed helpers: launched by ``torchrun`` (WORLD_SIZE > 1) or single process;
log lines printed by the main process only."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm


def init_distributed(device: torch.device) -> bool:
    """Initialise the default process group when launched by torchrun; True if distributed.

    Uses NCCL on CUDA (binding this process to ``LOCAL_RANK``) and Gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is True on any of them (one all-reduce when distributed)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_to_main(items: list[Any]) -> list[Any]:
    """Concatenate the lists of every process on rank 0 (other ranks get an empty list)."""
    if not is_distributed():
        return items
    gathered: list[list[Any] | None] = [None] * world_size() if is_main_process() else []
    dist.gather_object(items, gathered if is_main_process() else None, dst=0)
    return [item for part in gathered for item in (part or [])] if is_main_process() else []


def mean_over_processes(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the processes (every process passes the same keys, in the same order)."""
    if not is_distributed() or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist()))


def log(message: str) -> None:
    """Print a log line on the main process (through tqdm, so progress bars stay intact)."""
    if is_main_process():
        tqdm.write(message)
