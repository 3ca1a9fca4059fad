"""The fp8 (e4m3) KV cache: what a block stores and reads back, its size, and an engine that runs on it."""
from __future__ import annotations

import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.engine.model_runner import kv_bytes_per_block
from gpu_worker.layers.attention import FP8, gather_blocks, write_cache
from gpu_worker.llm import Engine
from gpu_worker.models.config import ModelConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_cache_reads_back_each_value_rounded_to_e4m3(dtype):
    cache = torch.zeros(6, 4, 2, 8, dtype=FP8)                             # [blocks, block_size, kv_heads, dim]
    x = (torch.randn(5, 2, 8) * 50).to(dtype)                              # some past e4m3's 448: saturated
    x[0, 0, 0] = 1000.0
    slots = torch.tensor([0, 5, 9, 13, 22])
    write_cache(cache, slots, x)
    rows = gather_blocks(cache, torch.tensor([[0, 1, 2, 3, 4, 5]]), dtype=dtype)[0]  # [24, kv_heads, dim]
    assert rows.dtype == dtype
    torch.testing.assert_close(rows[slots], x.to(FP8).to(dtype))
    assert float(rows[0, 0, 0]) == 448.0
    in_range = x.abs() <= 448
    relative = ((rows[slots] - x).abs() / x.abs().clamp(min=1.0))[in_range].max()
    assert float(relative) <= 2 ** -4  # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value


def test_the_same_kv_budget_holds_twice_bf16s_blocks_and_four_times_fp32s(tiny_llama_dir):
    config = ModelConfig.from_model_dir(tiny_llama_dir)
    fp8 = kv_bytes_per_block(config, 16, "bfloat16", 1, "fp8")
    assert kv_bytes_per_block(config, 16, "bfloat16", 1) == 2 * fp8
    assert kv_bytes_per_block(config, 16, "float32", 1) == 4 * fp8
    assert kv_bytes_per_block(config, 16, "float32", 1, "fp8") == fp8  # the storage, whatever the dtype


def test_an_engine_on_an_fp8_cache_decodes_from_it_close_to_the_model_dtype(tiny_llama_dir):
    prompt = {"prompt_token_ids": list(range(3, 40))}
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    results = {}
    for kv in ("auto", "fp8"):
        # chunks of 16 tokens: later chunks and every decode read earlier keys back from the cache
        with Engine(str(tiny_llama_dir), kv_cache_dtype=kv, num_kv_blocks=64, block_size=4,
                    max_num_batched_tokens=16) as engine:
            assert engine.llm.executor.runner.kv_cache.dtype == (FP8 if kv == "fp8" else torch.float32)
            [results[kv]] = engine.generate([prompt], sampling)
    auto, fp8 = results["auto"], results["fp8"]
    assert len(fp8.token_ids) == 12 and fp8.token_ids[:4] == auto.token_ids[:4]
    gaps = [abs(a.logprob - b.logprob) for a, b in zip(auto.logprobs[:4], fp8.logprobs[:4])]
    # close, and not bit-equal: the cache really holds e4m3 (3 mantissa bits: this random model's keys reach 10,
    # where its step is 1); SmolLM2's perplexity is the real check (tests/integration/test_weight_formats.py)
    assert max(gaps) < 0.5 and fp8.logprobs != auto.logprobs
