"""Logits parity with Hugging Face transformers on tiny random checkpoints, tp=1, through the paged cache."""
import pytest
import torch

from gpu_worker.layers.distributed import ParallelContext, set_parallel_context
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec
from gpu_worker.engine.plan import pack_step
from gpu_worker.engine.sequence import Sequence
from common.sampling import SamplingParams
from tests.checkpoints import hf_reference_logits
from tests.parity import BLOCK_SIZE, NUM_BLOCKS, paged_logits

TOLERANCE = 1e-4


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[request.param]


@pytest.fixture
def runner(model_dir):
    set_parallel_context(ParallelContext(0, 1))
    return ModelRunner(RunnerSpec(str(model_dir), "float32", "cpu", BLOCK_SIZE, NUM_BLOCKS))


def test_prefill_chunks_and_decode_match_transformers(model_dir, runner):
    token_ids = torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = hf_reference_logits(model_dir, token_ids)          # [40, vocab]
    logits, positions = paged_logits(runner.execute, token_ids, prefill_chunks=[13, 9])
    assert logits.shape == (len(positions), reference.shape[1])
    assert (logits - reference[positions]).abs().max().item() <= TOLERANCE


def test_batched_decodes_and_prefill_with_cached_prefix_match(model_dir, runner):
    """Two sequences in one step: one decoding, one prefilling on top of blocks computed earlier."""
    gen = torch.Generator().manual_seed(1)
    a_ids = torch.randint(0, 500, (11,), generator=gen).tolist()
    b_ids = torch.randint(0, 500, (19,), generator=gen).tolist()
    a = Sequence("a", a_ids[:10], SamplingParams(temperature=0))
    b = Sequence("b", b_ids, SamplingParams(temperature=0))
    a.block_table, b.block_table = [3, 9, 1], [7, 2, 11, 4, 8]
    runner.execute(pack_step([a, b], [10, 8], BLOCK_SIZE))       # a prefills all, b its first 8 tokens
    a.num_computed_tokens, b.num_computed_tokens = 10, 8
    a.append_token(a_ids[10])
    logits = runner.execute(pack_step([a, b], [1, 11], BLOCK_SIZE))  # a decodes, b prefills from cache
    assert (logits[0] - hf_reference_logits(model_dir, a_ids)[-1]).abs().max() <= TOLERANCE
    assert (logits[1] - hf_reference_logits(model_dir, b_ids)[-1]).abs().max() <= TOLERANCE
