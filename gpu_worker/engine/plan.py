"""The per-step plan rank 0 sends to every rank: one packed int64 tensor, never a pickle.

Layout: a 4-int header ``[command, seqs, tokens, max_blocks]`` and a payload
``[input_ids (tokens) | query_lens (seqs) | context_lens (seqs) | logit_counts (seqs) |
block_tables (seqs * max_blocks)]``. Sequences that compute one token (decodes) come first.
Positions and cache slots are derived from it on every rank, by the same code.
``logit_counts[i]`` is how many of sequence ``i``'s last positions in this step
get logits: 1 (the position a token is sampled from), or the whole chunk for
a sequence whose prompt logprobs are being computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from gpu_worker.engine.sequence import Sequence

HEADER_SIZE = 4


class Command(IntEnum):
    """What a plan tells the other ranks to do."""

    STEP = 1
    SHUTDOWN = 2
    KEEPALIVE = 3  # nothing: an idle rank 0 says it is there before the ranks' collective timeout runs out


@dataclass
class StepPlan:
    """One step as rank 0 packed it; on every rank both tensors are on the CPU (lengths are read from them)."""

    header: torch.Tensor   # [HEADER_SIZE] int64
    payload: torch.Tensor  # [...] int64

    @property
    def command(self) -> Command:
        return Command(int(self.header[0]))


def order_decodes_first(seqs: list[Sequence], num_new: list[int]) -> tuple[list[Sequence], list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: num_new[i] != 1)
    return [seqs[i] for i in order], [num_new[i] for i in order]


def logit_counts_for(seqs: list[Sequence], num_new: list[int]) -> list[int]:
    """How many trailing positions of each sequence's chunk need logits (see the module docstring)."""
    return [n if seq.needs_prompt_logits else 1 for seq, n in zip(seqs, num_new)]


def pack_step(seqs: list[Sequence], num_new: list[int], block_size: int,
              logit_counts: list[int] | None = None) -> StepPlan:
    """Pack one step (decodes first, see :func:`order_decodes_first`) into a plan.

    ``logit_counts`` defaults to one per sequence (the last position of each).
    """
    logit_counts = logit_counts or [1] * len(seqs)
    assert all(1 <= c <= n for c, n in zip(logit_counts, num_new))
    input_ids: list[int] = []
    context_lens: list[int] = []
    for seq, n in zip(seqs, num_new):
        start = seq.num_computed_tokens
        input_ids.extend(seq.token_ids[start:start + n])
        context_lens.append(start + n)
    max_blocks = -(-max(context_lens) // block_size)
    tables: list[int] = []
    for seq in seqs:
        row = seq.block_table[:max_blocks]
        tables.extend(row)
        tables.extend([0] * (max_blocks - len(row)))
    flat = torch.tensor([Command.STEP, len(seqs), len(input_ids), max_blocks,
                         *input_ids, *num_new, *context_lens, *logit_counts, *tables], dtype=torch.int64)
    return StepPlan(flat[:HEADER_SIZE], flat[HEADER_SIZE:])


def shutdown_plan() -> StepPlan:
    return command_plan(Command.SHUTDOWN)


def command_plan(command: Command) -> StepPlan:
    """A plan with no step in it: ``SHUTDOWN`` or ``KEEPALIVE``."""
    return StepPlan(torch.tensor([command, 0, 0, 0], dtype=torch.int64), torch.empty(0, dtype=torch.int64))


def payload_size(header: torch.Tensor) -> int:
    _, num_seqs, num_tokens, max_blocks = header.tolist()
    return num_tokens + 3 * num_seqs + num_seqs * max_blocks


class PlanChannel:
    """Broadcasts plans from rank 0 to the other ranks (two small collectives per step).

    On CUDA the plan travels as device tensors (NCCL moves no CPU tensors) and
    `recv` copies it back to the host once, so every rank builds its step
    inputs from the same CPU tensor rank 0 packed.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def send(self, plan: StepPlan) -> None:
        dist.broadcast(plan.header.to(self.device), src=0)
        if plan.payload.numel():
            dist.broadcast(plan.payload.to(self.device), src=0)

    def recv(self) -> StepPlan:
        header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        payload = torch.empty(payload_size(header), dtype=torch.int64, device=self.device)
        if payload.numel():
            dist.broadcast(payload, src=0)
        return StepPlan(header.cpu(), payload.cpu())
