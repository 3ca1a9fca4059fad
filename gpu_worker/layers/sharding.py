"""Reading one rank's slice of a checkpoint tensor."""
from __future__ import annotations

from typing import Protocol

import torch


class CheckpointSlice(Protocol):
    """A lazily read checkpoint tensor (a safetensors slice): index it to read part of it."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index) -> torch.Tensor: ...


def copy_shard(dst: torch.Tensor, loaded: CheckpointSlice, dim: int, start: int) -> None:
    """Copy ``loaded[start:start + dst.shape[dim]]`` along ``dim`` into ``dst``.

    Reads only that slice. Where the checkpoint ends before ``dst`` does (a
    padded, uneven split), the rest of ``dst`` is zero.
    """
    full = loaded.get_shape()[dim]
    length = max(0, min(dst.shape[dim], full - start))
    dst.zero_()
    if length == 0:
        return
    index = (slice(None),) * dim + (slice(start, start + length),)
    dst.narrow(dim, 0, length).copy_(loaded[index])
