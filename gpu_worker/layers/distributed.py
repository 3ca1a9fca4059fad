"""The tensor-parallel process group: who this rank is, and the few collectives the model uses."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in its worker group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


_context = ParallelContext()


def get_parallel_context() -> ParallelContext:
    return _context


def set_parallel_context(context: ParallelContext) -> None:
    global _context
    _context = context


def divide(numerator: int, denominator: int) -> int:
    """``numerator / denominator``, asserting the split is even."""
    assert numerator % denominator == 0, f"{numerator} is not divisible by {denominator}"
    return numerator // denominator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device_type: str, rank: int) -> torch.device:
    """The device rank ``rank`` runs on: ``cuda:<rank>`` (one GPU per rank) or the CPU."""
    return torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device(device_type)


def init_group(rank: int, world_size: int, init_method: str, device: torch.device,
               timeout_s: float = 60.0) -> None:
    """Join the group's process group (gloo on CPU, NCCL on CUDA) and record this rank."""
    set_parallel_context(ParallelContext(rank, world_size))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_context(ParallelContext())


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group in place (no-op on a single rank)."""
    if _context.world_size > 1:
        dist.all_reduce(x)
    return x


def gather_to_driver(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's ``x`` along the last dim on rank 0; other ranks get None."""
    if _context.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_context.world_size)] if _context.is_driver else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if _context.is_driver else None


def threads_per_rank(world_size: int) -> int:
    """Split this machine's cores evenly between the ranks it hosts."""
    return max(1, (os.cpu_count() or 1) // world_size)
