"""Log-probabilities from one step's logits (rank 0 only): sampled tokens' and prompt tokens'.

Both are the model's raw distribution, the fp32 log-softmax of the same
logits the sampler reads, before temperature, top-k and top-p (vLLM's
default "raw logprobs"). Only the rows of sequences that asked are
computed, in one batched log-softmax per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.results import TokenLogprob
from gpu_worker.engine.sequence import Sequence


@dataclass
class LogprobRequests:
    """The logits rows of one step whose log-probabilities to compute: row, token at that row, top-k."""

    rows: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)

    def add(self, row: int, token_id: int, top_k: int) -> None:
        self.rows.append(row)
        self.token_ids.append(token_id)
        self.top_k.append(top_k)


def compute_logprobs(logits: torch.Tensor, wanted: LogprobRequests) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``wanted.token_ids[i]`` at ``logits[wanted.rows[i]]``, with its top ``wanted.top_k[i]``."""
    if not wanted.rows:
        return []
    rows = torch.tensor(wanted.rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)                           # [n, vocab]
    tokens = torch.tensor(wanted.token_ids, dtype=torch.int64, device=logits.device)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()                          # [n]
    k_max = min(max(wanted.top_k), logprobs.shape[-1])
    top_ids: list[list[int]] = [[] for _ in wanted.rows]
    top_values: list[list[float]] = [[] for _ in wanted.rows]
    if k_max > 0:
        top = torch.topk(logprobs, k_max, dim=-1)                                       # [n, k_max]
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return [TokenLogprob(token_id=token, logprob=lp, top_logprobs=list(zip(ids[:k], values[:k])))
            for token, lp, ids, values, k in zip(wanted.token_ids, chosen, top_ids, top_values, wanted.top_k)]


def prompt_rows(seq: Sequence, first_position: int, first_row: int, count: int, wanted: LogprobRequests) -> int:
    """Queue the prompt positions ``seq`` still lacks among the ``count`` rows from ``first_row``.

    Row ``first_row + j`` holds the logits at position ``first_position + j``,
    which predict prompt token ``first_position + j + 1``. Positions already
    done (a preempted sequence computes its prompt again) are skipped.
    Returns how many were queued: the caller appends that many results to
    ``seq.prompt_logprobs`` in order.
    """
    assert seq.prompt_logprobs is not None
    next_token = len(seq.prompt_logprobs)
    queued = 0
    for j in range(count):
        target = first_position + j + 1
        if target == next_token + queued and target < seq.num_prompt_tokens:
            wanted.add(first_row + j, seq.prompt_token_ids[target], seq.sampling.prompt_logprobs)
            queued += 1
    return queued
