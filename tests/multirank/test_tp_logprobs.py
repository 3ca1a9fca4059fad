"""Logprobs from a real tp=2 worker group (gloo) against transformers' log-softmax on tiny random checkpoints.

The vocab-parallel LM head computes each rank's slice of every requested
row, prompt rows included, and gathers them to rank 0, which computes the
logprobs; they must match transformers within 1e-4 (ids and values).
"""
import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.llm import Engine
from tests.parity import assert_logprobs_match_transformers

pytestmark = pytest.mark.slow

SAMPLINGS = [
    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3),
    SamplingParams(temperature=1.3, top_k=40, seed=3, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=0),
    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),  # asks nothing, shares the batch
]


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_tp2_prompt_and_sampled_logprobs_match_transformers(which, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[which]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (37, 21, 9)]
    with Engine(str(model_dir), tp=2, block_size=4, max_num_batched_tokens=16) as group:
        results = group.generate([{"prompt_token_ids": p} for p in prompts], SAMPLINGS)
    for prompt, result, sampling in zip(prompts, results, SAMPLINGS):
        assert_logprobs_match_transformers(model_dir, prompt, result, sampling)
    assert results[2].logprobs is None and results[2].prompt_logprobs is None
