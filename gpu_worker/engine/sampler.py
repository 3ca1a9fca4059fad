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
    """Greedy or temperature/top-k/top-p sampling from a random stream keyed by (request seed, token index).

    A request with a ``seed`` gets the same tokens whatever else runs beside
    it, and a request resumed at token ``k`` after a crash (its first ``k``
    tokens prefilled) draws token ``k`` with the same random number as the
    run that died: a seeded job that runs again completes with the tokens it
    would have had (up to float differences between a prefill and a decode
    step, which can flip a draw that falls right on a boundary).
    """

    def __init__(self) -> None:
        self._seeds: dict[int, int] = {}  # seq_id -> the request's seed, or one drawn for it
        self._generator = torch.Generator()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        # logits: [seqs, vocab] float32
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                tokens[i] = self._sample(logits[i], seq)
        return tokens

    def release(self, seq: Sequence) -> None:
        self._seeds.pop(seq.seq_id, None)

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        params: SamplingParams = seq.sampling
        logits = logits.cpu()  # the generator lives on the CPU
        logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
        probs = logits.softmax(-1)
        seed = self._seeds.get(seq.seq_id)
        if seed is None:
            seed = self._seeds[seq.seq_id] = params.seed if params.seed is not None else random.getrandbits(63)
        self._generator.manual_seed(token_seed(seed, seq.num_generated_tokens))
        return int(torch.multinomial(probs, 1, generator=self._generator))


def token_seed(seed: int, index: int) -> int:
    """The generator seed for token ``index`` of a request seeded ``seed``: splitmix64 of the pair, in [0, 2**63)."""
    mask = (1 << 64) - 1
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1
