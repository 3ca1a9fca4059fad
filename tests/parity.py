"""Driving a model runner (or a whole executor) through prefill chunks and decode steps by hand; logprob checks."""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.results import GenerationResult, TokenLogprob
from common.sampling import SamplingParams
from gpu_worker.engine.plan import StepPlan, pack_step
from gpu_worker.engine.sequence import Sequence
from tests.checkpoints import hf_reference_logprobs

BLOCK_SIZE = 4
NUM_BLOCKS = 64
LOGPROB_TOLERANCE = 1e-4


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


def assert_token_logprob_matches(entry: TokenLogprob, reference_row: torch.Tensor, token_id: int, k: int) -> None:
    """``entry`` is ``token_id``'s logprob in ``reference_row`` and its top ``k``, ids and values."""
    assert entry.token_id == token_id
    assert abs(entry.logprob - reference_row[token_id].item()) <= LOGPROB_TOLERANCE
    top = torch.topk(reference_row, k) if k else None
    assert [t for t, _ in entry.top_logprobs] == ([] if top is None else top.indices.tolist())
    if top is not None:
        assert max(abs(v - r) for (_, v), r in zip(entry.top_logprobs, top.values.tolist())) <= LOGPROB_TOLERANCE


def assert_logprobs_match_transformers(model_dir, prompt: list[int], result: GenerationResult,
                                       sampling: SamplingParams) -> None:
    """``result``'s prompt and sampled-token logprobs (as ``sampling`` asked) are transformers' log-softmax."""
    ids = prompt + result.token_ids
    reference = hf_reference_logprobs(model_dir, ids)  # row i: the distribution of token i + 1
    if sampling.prompt_logprobs is not None:
        assert len(result.prompt_logprobs) == len(prompt)
        assert result.prompt_logprobs[0] == TokenLogprob(token_id=prompt[0])  # nothing precedes it
        for j in range(1, len(prompt)):
            assert_token_logprob_matches(result.prompt_logprobs[j], reference[j - 1], prompt[j], sampling.prompt_logprobs)
    if sampling.logprobs is not None:
        assert len(result.logprobs) == len(result.token_ids)
        for i, entry in enumerate(result.logprobs):
            position = len(prompt) - 1 + i
            assert_token_logprob_matches(entry, reference[position], ids[position + 1], sampling.logprobs)
