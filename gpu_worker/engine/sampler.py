"""Picking each sequence's next token from its logits (rank 0 only)."""
from __future__ import annotations

import random

import torch

from common.sampling import SamplingParams
from gpu_worker.engine.sequence import Sequence


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the top-k and outside the top-p nucleus. logits: [vocab]."""
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = (probs.cumsum(-1) - probs) > top_p  # the most likely token always stays
        logits = logits.scatter(0, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits


class Sampler:
    """Greedy or temperature/top-k/top-p sampling; each request draws from its own generator.

    A request with a ``seed`` gets the same tokens whatever else runs beside it.
    """

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        # logits: [seqs, vocab] float32
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                tokens[i] = self._sample(logits[i], seq)
        return tokens

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        params: SamplingParams = seq.sampling
        logits = logits.cpu()  # the per-request generators live on the CPU
        logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(seq)))

    def _generator(self, seq: Sequence) -> torch.Generator:
        generator = self._generators.get(seq.seq_id)
        if generator is None:
            seed = seq.sampling.seed if seq.sampling.seed is not None else random.getrandbits(63)
            generator = self._generators[seq.seq_id] = torch.Generator().manual_seed(seed)
        return generator
