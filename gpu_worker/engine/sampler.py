"""Picking each sequence's next token from its logits (rank 0 only), for the whole batch in a few tensor ops."""
from __future__ import annotations

import random

import torch

from gpu_worker.engine.sequence import Sequence

UNIFORM_SCALE = 1.0 / (1 << 63)  # token_seed() is in [0, 2**63): times this, a uniform draw in [0, 1)
CANDIDATES = 1024  # tokens a top-p row looks among before it sorts its whole vocabulary


class Sampler:
    """Greedy or temperature/top-k/top-p sampling, each draw a uniform number keyed by (request seed, token index).

    A request with a ``seed`` gets the same tokens whatever else runs beside
    it, and a request resumed at token ``k`` after a crash (its first ``k``
    tokens prefilled) draws token ``k`` with the same random number as the
    run that died: a seeded job that runs again completes with the tokens it
    would have had (up to float differences between a prefill and a decode
    step, which can flip a draw that falls right on a boundary).

    The sampled rows are drawn together (:func:`sample_rows`): a top-k
    selection in the rows that filter by top-k or top-p (to find where each
    cuts), one
    softmax, one cumulative sum and one search of each row's uniform number
    in it (inverse-CDF sampling).
    """

    def __init__(self) -> None:
        self._seeds: dict[int, int] = {}  # seq_id -> the request's seed, or one drawn for it

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        # logits: [seqs, vocab] float32
        tokens = logits.argmax(dim=-1)  # [seqs]
        rows = [i for i, seq in enumerate(seqs) if not seq.sampling.greedy]
        if rows:
            picked = [seqs[i] for i in rows]
            uniforms = [token_seed(self._seed_of(seq), seq.num_generated_tokens) * UNIFORM_SCALE for seq in picked]
            drawn = sample_rows(logits if len(rows) == len(seqs) else logits[rows],
                                temperatures=[seq.sampling.temperature for seq in picked],
                                top_ks=[seq.sampling.top_k for seq in picked],
                                top_ps=[seq.sampling.top_p for seq in picked], uniforms=uniforms)
            tokens = tokens.index_copy(0, torch.tensor(rows, device=tokens.device), drawn)
        return tokens.tolist()

    def release(self, seq: Sequence) -> None:
        self._seeds.pop(seq.seq_id, None)

    def _seed_of(self, seq: Sequence) -> int:
        seed = self._seeds.get(seq.seq_id)
        if seed is None:
            given = seq.sampling.seed
            seed = self._seeds[seq.seq_id] = given if given is not None else random.getrandbits(63)
        return seed


def sample_rows(logits: torch.Tensor, *, temperatures: list[float], top_ks: list[int], top_ps: list[float],
                uniforms: list[float]) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], drawn with the row's uniform number in [0, 1): [rows] int64.

    Row ``i`` is divided by ``temperatures[i]``, keeps its ``top_ks[i]``
    most likely tokens (0: all), then the smallest set of those whose
    probability reaches ``top_ps[i]`` (the most likely always stays; ties at
    the cut stay too), and draws the token where ``uniforms[i]`` falls in
    the cumulative distribution of what is left, in vocabulary order. Each
    row's draw depends on that row alone, whatever else is in the batch.
    """
    device, vocab = logits.device, logits.shape[-1]
    scaled = logits.float() / torch.tensor(temperatures, device=device).unsqueeze(1)  # [rows, vocab]
    filtered = [i for i, (k, p) in enumerate(zip(top_ks, top_ps)) if 0 < k < vocab or p < 1.0]
    if filtered:
        rows = torch.tensor(filtered, device=device)
        sub = scaled.index_select(0, rows)  # [filtered, vocab]
        scaled = scaled.index_copy(0, rows, sub.masked_fill(sub < _cut(sub, [top_ks[i] for i in filtered],
                                                                       [top_ps[i] for i in filtered]), float("-inf")))
    u = torch.tensor(uniforms, dtype=torch.float32, device=device).unsqueeze(1)  # [rows, 1]
    cdf = scaled.softmax(-1).cumsum(-1)  # [rows, vocab]
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1).squeeze(1)


def _cut(logits: torch.Tensor, top_ks: list[int], top_ps: list[float], width: int | None = None) -> torch.Tensor:
    """Each row's smallest logit that top-k and then top-p keep. logits: [rows, vocab]; returns [rows, 1].

    Looks among each row's ``width`` most likely tokens first (a top-k
    selection, far cheaper than sorting the vocabulary); a row whose nucleus
    may reach past them is done again over its whole vocabulary.
    """
    vocab = logits.shape[-1]
    if width is None:  # a row with a top-k has its nucleus among its top-k
        width = max(k if 0 < k < vocab else CANDIDATES for k in top_ks)
    width = min(vocab, width)
    ordered = logits.topk(width, dim=-1).values  # [rows, width], descending
    rank = torch.arange(width, device=logits.device).unsqueeze(0)  # [1, width]
    k = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device).unsqueeze(1)  # [rows, 1]
    in_k = rank < k  # [rows, width]
    # the probabilities are over the row's top-k when it has one (all among the candidates), else over its vocabulary
    normalizer = torch.where(k <= width, ordered.masked_fill(~in_k, float("-inf")).logsumexp(-1, keepdim=True),
                             logits.logsumexp(-1, keepdim=True))  # [rows, 1]
    probs = (ordered - normalizer).exp().masked_fill(~in_k, 0.0)  # [rows, width]
    before = probs.cumsum(-1) - probs  # the mass of the more likely tokens
    kept = (in_k & (before <= torch.tensor(top_ps, device=logits.device).unsqueeze(1))).sum(-1, keepdim=True)
    cut = ordered.gather(1, kept - 1)  # [rows, 1]; at least the most likely token is kept
    spill = ((kept == width) & (k > width)).squeeze(1).nonzero().squeeze(1).tolist()
    if spill:  # every candidate kept: the nucleus may go on past them
        rows = torch.tensor(spill, device=logits.device)
        again = _cut(logits.index_select(0, rows), [top_ks[i] for i in spill], [top_ps[i] for i in spill], vocab)
        cut = cut.index_copy(0, rows, again)
    return cut


def token_seed(seed: int, index: int) -> int:
    """The draw for token ``index`` of a request seeded ``seed``: splitmix64 of the pair, in [0, 2**63)."""
    mask = (1 << 64) - 1
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1
