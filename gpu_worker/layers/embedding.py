"""Vocab-parallel token embedding and the LM head gathered to rank 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.kernels.cpu_ops import CpuKernels
from gpu_worker.layers.distributed import all_reduce, gather_to_driver, get_parallel_context
from gpu_worker.layers import gemm, quant
from gpu_worker.layers.linear import padded_shard_size
from gpu_worker.layers.sharding import copy_shard


class VocabParallelEmbedding(nn.Module):
    """Each rank holds the rows of a contiguous vocabulary range; lookups are summed across ranks."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        ctx = get_parallel_context()
        self.vocab_size = vocab_size
        self.world_size = ctx.world_size
        self.vocab_size_local = padded_shard_size(vocab_size, ctx.world_size)
        self.vocab_start = ctx.rank * self.vocab_size_local
        self.weight = nn.Parameter(torch.zeros(self.vocab_size_local, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        copy_shard(param.data, loaded, dim=0, start=self.vocab_start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [tokens] -> [tokens, hidden]
        if self.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        in_range = (local_ids >= 0) & (local_ids < self.vocab_size_local)
        embedded = F.embedding(local_ids.clamp(0, self.vocab_size_local - 1), self.weight)
        return all_reduce(embedded * in_range.unsqueeze(-1))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary range, gathered to rank 0 (the only rank that samples)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.kernel: gemm.LinearKernel | quant.Int8LinearKernel | None = None
        self.tied = False

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def prepare_for_inference(self, quantization: str | None = None, kernels: CpuKernels | None = None) -> None:
        """Pick the logits' matmul path; quantized formats give the LM head an int8 copy (see below).

        ``"q4"`` runs the LM head as per-row int8 too: a GGUF file's tied
        embedding is Q8_0 (a scale per 32 values), which aten's int8 kernel
        cannot take, so its dequantized values are quantized again per row.
        A tied embedding keeps the weight for its lookups.
        """
        if quantization is None:
            self.kernel = gemm.LinearKernel(self.weight.data)
            return
        self.kernel = quant.make_quantized_kernel(self.weight.data, "int8", kernels)
        if not self.tied:
            self.weight = None  # only the int8 copy is read

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [seqs, hidden] -> logits [seqs, vocab] on rank 0, None elsewhere
        logits_local = self.kernel(hidden, None)                             # [seqs, vocab_local]
        logits = gather_to_driver(logits_local)
        return None if logits is None else logits[:, :self.vocab_size]
