"""Driving a model runner (or a whole executor) through prefill chunks and decode steps by hand."""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.sampling import SamplingParams
from gpu_worker.engine.plan import StepPlan, pack_step
from gpu_worker.engine.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 64


def paged_logits(execute: Callable[[StepPlan], torch.Tensor], token_ids: list[int],
                 prefill_chunks: list[int], first_block: int = 5) -> tuple[torch.Tensor, list[int]]:
    """Feed ``token_ids`` as prefill chunks, then one decode step per remaining token.

    Blocks are taken from ``first_block`` on, so block ids differ from
    positions. Returns the logits of each step's last token and those
    tokens' positions, to compare with a reference's logits at the same rows.
    """
    prompt_len = sum(prefill_chunks)
    seq = Sequence("parity", token_ids[:prompt_len], SamplingParams(temperature=0))
    seq.block_table = list(range(first_block, first_block + -(-len(token_ids) // BLOCK_SIZE)))
    logits, positions = [], []
    for n in prefill_chunks:
        logits.append(execute(pack_step([seq], [n], BLOCK_SIZE)))
        seq.num_computed_tokens += n
        positions.append(seq.num_computed_tokens - 1)
    for token in token_ids[prompt_len:]:
        seq.append_token(token)
        logits.append(execute(pack_step([seq], [1], BLOCK_SIZE)))
        seq.num_computed_tokens += 1
        positions.append(seq.num_computed_tokens - 1)
    return torch.cat(logits), positions
