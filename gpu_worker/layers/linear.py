"""Megatron-style tensor-parallel linear layers.

Column-parallel layers split their output features across ranks and need no
communication; row-parallel layers split their input features and hold the
only all-reduce, inside ``forward``. Each parameter loads its own slice
straight out of the checkpoint (``weight_loader``), so no rank ever holds a
full copy. A split that is not even (e.g. an intermediate size of 1536 over
9 ranks) is padded with zero rows/columns, which changes no result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.kernels.cpu_ops import CpuKernels
from gpu_worker.layers.distributed import all_reduce, divide, get_parallel_context
from gpu_worker.layers import gemm, quant
from gpu_worker.layers.q4 import Q4LinearKernel
from gpu_worker.layers.sharding import CheckpointSlice, copy_shard
from gpu_worker.weights.gguf_q4 import BLOCK_SIZE as QUANT_BLOCK
from gpu_worker.weights.gguf_q4 import QuantizedTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSlice:
    """A checkpoint tensor's place in a layer's weight on this rank.

    Rows ``[offset, offset + rows)`` of the weight [out_local, in_local] hold
    the tensor's slice along ``dim`` from ``start`` (zero past its end).
    """

    offset: int
    rows: int
    dim: int
    start: int


def padded_shard_size(size: int, world_size: int) -> int:
    """Per-rank size of a dimension split over ``world_size`` ranks, rounded up."""
    return -(-size // world_size)


class LinearBase(nn.Module):
    """A linear layer whose weight [out_local, in_local] is this rank's slice."""

    def __init__(self, in_local: int, out_local: int, bias: bool):
        super().__init__()
        ctx = get_parallel_context()
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.weight = nn.Parameter(torch.zeros(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.kernel: gemm.LinearKernel | quant.Int8LinearKernel | Q4LinearKernel | None = None
        self.quantized_parts: dict[int, QuantizedTensor] = {}  # row offset -> this rank's slice of a GGUF tensor

    def shard_slice(self, shard_id) -> ShardSlice:
        """Where checkpoint tensor ``shard_id`` of this layer goes in the weight, and which slice of it this rank takes."""
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointSlice, shard_id=None) -> None:
        where = self.shard_slice(shard_id)
        copy_shard(param.data.narrow(0, where.offset, where.rows), loaded, dim=where.dim, start=where.start)

    def load_quantized(self, tensor: QuantizedTensor, shard_id=None) -> bool:
        """Keep this rank's slice of a GGUF-quantized checkpoint tensor (``quantization="q4"``).

        False, keeping nothing, when the slice does not fall on the format's
        32-wide blocks (a row-parallel split of an input size that 32 x ranks
        does not divide): the layer then runs its loaded weight.
        """
        where = self.shard_slice(shard_id)
        length = where.rows if where.dim == 0 else self.weight.shape[1]
        if where.dim == 1 and (where.start % QUANT_BLOCK or length % QUANT_BLOCK):
            return False
        self.quantized_parts[where.offset] = tensor.narrow(where.dim, where.start, length)
        return True

    def prepare_for_inference(self, quantization: str | None = None, kernels: CpuKernels | None = None) -> None:
        """Pick the matmul path once the weights are loaded; drop the plain weight if it is unused.

        ``quantization``: ``"int8"`` quantizes this rank's slice
        (:mod:`gpu_worker.layers.quant`); ``"q4"`` packs the GGUF blocks
        :meth:`load_quantized` kept (:mod:`gpu_worker.layers.q4`), or, when
        they do not cover the whole weight, runs the loaded weight as is.
        With ``kernels``, the quantized formats run decode steps on them.
        """
        if quantization == "q4" and self._quantized_rows() == self.weight.shape[0]:
            self.kernel = Q4LinearKernel([self.quantized_parts[o] for o in sorted(self.quantized_parts)], kernels)
        elif quantization == "int8":
            self.kernel = quant.make_quantized_kernel(self.weight.data, quantization, kernels)
        else:
            if quantization == "q4":
                log.info("%s: no 4-bit blocks for this rank's slice; it runs the loaded %s weight",
                         type(self).__name__, self.weight.dtype)
            self.kernel = gemm.LinearKernel(self.weight.data)
        self.quantized_parts = {}
        if not self.kernel.needs_plain_weight:
            self.kernel.weight = None
            self.weight = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel(x, bias)  # set by prepare_for_inference() after loading

    def _quantized_rows(self) -> int:
        return sum(part.shape[0] for part in self.quantized_parts.values())


class ColumnParallelLinear(LinearBase):
    """y_local = x @ W_local.T: output features split across ranks, no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        world_size = get_parallel_context().world_size
        self.output_size_local = padded_shard_size(output_size, world_size)
        super().__init__(input_size, self.output_size_local, bias)

    def shard_slice(self, shard_id=None) -> ShardSlice:
        return ShardSlice(0, self.output_size_local, dim=0, start=self.rank * self.output_size_local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)  # [tokens, out_local]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        world_size = get_parallel_context().world_size
        self.part_sizes_local = [padded_shard_size(s, world_size) for s in output_sizes]
        super().__init__(input_size, sum(self.part_sizes_local) * world_size, bias)

    def shard_slice(self, shard_id: int) -> ShardSlice:
        size = self.part_sizes_local[shard_id]
        return ShardSlice(sum(self.part_sizes_local[:shard_id]), size, dim=0, start=self.rank * size)


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q, k and v projections, split by attention heads.

    With fewer KV heads than ranks, each KV head is replicated on
    ``world_size / num_kv_heads`` ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        ctx = get_parallel_context()
        self.head_dim = head_dim
        self.num_heads_local = divide(num_heads, ctx.world_size)
        if num_kv_heads >= ctx.world_size:
            self.num_kv_heads_local = divide(num_kv_heads, ctx.world_size)
            self.kv_head_start = ctx.rank * self.num_kv_heads_local
        else:
            self.num_kv_heads_local = 1
            self.kv_head_start = ctx.rank // divide(ctx.world_size, num_kv_heads)
        output_size = (self.num_heads_local + 2 * self.num_kv_heads_local) * head_dim * ctx.world_size
        super().__init__(hidden_size, output_size, bias)

    @property
    def q_size_local(self) -> int:
        return self.num_heads_local * self.head_dim

    @property
    def kv_size_local(self) -> int:
        return self.num_kv_heads_local * self.head_dim

    def shard_slice(self, shard_id: str) -> ShardSlice:
        if shard_id == "q":
            return ShardSlice(0, self.q_size_local, dim=0, start=self.rank * self.q_size_local)
        offset = self.q_size_local + (self.kv_size_local if shard_id == "v" else 0)
        return ShardSlice(offset, self.kv_size_local, dim=0, start=self.kv_head_start * self.head_dim)


class RowParallelLinear(LinearBase):
    """y = all_reduce(x_local @ W_local.T) + b: input features split, the layer's one all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        world_size = get_parallel_context().world_size
        self.input_size_local = padded_shard_size(input_size, world_size)
        super().__init__(self.input_size_local, output_size, bias)

    def shard_slice(self, shard_id=None) -> ShardSlice:
        return ShardSlice(0, self.weight.shape[0], dim=1, start=self.rank * self.input_size_local)

    def weight_loader(self, param, loaded, shard_id=None):
        if param is self.bias:  # the bias is added once, after the reduction
            copy_shard(param.data, loaded, dim=0, start=0)
        else:
            super().weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in_local] -> y: [tokens, out]
        y = self.matmul(x, self.bias if self.rank == 0 else None)
        return all_reduce(y)
