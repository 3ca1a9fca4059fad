"""The CUDA path (NCCL between ranks). Skipped without a GPU; CI has none.

Written without a GPU at hand (see the issue-2 closing note): run it on a
lent device with `pytest -m gpu tests/multirank/test_cuda.py`.
"""
import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec
from gpu_worker.llm import Engine
from tests.checkpoints import hf_reference_logits
from tests.parity import BLOCK_SIZE, NUM_BLOCKS, paged_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_logits_match_transformers(tiny_qwen2_dir):
    set_parallel_context(ParallelContext(0, 1))
    runner = ModelRunner(RunnerSpec(str(tiny_qwen2_dir), "float32", "cuda", BLOCK_SIZE, NUM_BLOCKS))
    token_ids = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    logits, positions = paged_logits(lambda plan: runner.execute(plan).cpu(), token_ids, prefill_chunks=[12, 6])
    reference = hf_reference_logits(tiny_qwen2_dir, token_ids)
    assert (logits - reference[positions]).abs().max().item() <= 1e-3  # TF32 matmuls may be on


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_tp2_generates_what_cpu_generates(tiny_llama_dir):
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with Engine(str(tiny_llama_dir), device="cpu") as cpu:
        expected = [r.token_ids for r in cpu.generate(["hello there", "one two three"], sampling)]
    with Engine(str(tiny_llama_dir), tp=2, device="cuda") as gpu:
        assert [r.token_ids for r in gpu.generate(["hello there", "one two three"], sampling)] == expected
