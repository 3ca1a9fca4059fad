"""Vocab-parallel token embedding and the LM head gathered to rank 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.layers.distributed import all_reduce, gather_to_driver, get_parallel_context
from gpu_worker.layers import gemm
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
        self.kernel: gemm.LinearKernel | None = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def prepare_for_inference(self) -> None:
        self.kernel = gemm.LinearKernel(self.weight.data)  # keeps the weight: a tied embedding reads it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [seqs, hidden] -> logits [seqs, vocab] on rank 0, None elsewhere
        logits_local = self.kernel(hidden, None)                             # [seqs, vocab_local]
        logits = gather_to_driver(logits_local)
        return None if logits is None else logits[:, :self.vocab_size]
