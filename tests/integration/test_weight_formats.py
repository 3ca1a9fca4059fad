"""Quantized weights on the real default model: perplexity near fp32's, greedy chats that stay on fp32's tokens.

SmolLM2's checkpoint is the GGUF file's Q4_1 weights dequantized, so fp32
runs the values q4 packs: q4 may differ only by bf16 activations. int8
quantizes those values again, per row. llama.cpp's perplexity on the same
file is the q4 reference when llama-cpp-python is installed (bench extra).
"""
from __future__ import annotations

import pytest

from bench.quality import perplexity, windows
from common.sampling import SamplingParams
from gpu_worker.llm import Engine
from gpu_worker.weights.model_store import resolve_model
from tests.integration.test_smollm2_engine import QUESTIONS

pytestmark = pytest.mark.slow

TEXT_WINDOW = 512
MATCHING_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("smollm2-135m-instruct")


def run(model_dir, **options) -> tuple[list[list[int]], float]:
    """Greedy tokens of the four chats and the perplexity of the shipped text, with these engine options."""
    from bench.quality import TEXT

    options.setdefault("kv_cache_gb", 0.1)
    with Engine(str(model_dir), **options) as engine:
        chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
        greedy = engine.generate(chats, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        prompts = [{"prompt_token_ids": w} for w in windows(engine.tokenizer.encode(TEXT.read_text()), TEXT_WINDOW)]
        scored = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    logprobs = [e.logprob for r in scored for e in r.prompt_logprobs[1:]]
    return [r.token_ids for r in greedy], perplexity(logprobs)


@pytest.fixture(scope="module")
def fp32(model_dir):
    return run(model_dir)


@pytest.mark.parametrize("options, tolerance", [({"quantization": "int8"}, 0.01),
                                                 ({"quantization": "q4", "dtype": "bfloat16"}, 0.03)],
                         ids=["int8", "q4"])
def test_perplexity_stays_near_fp32_and_chats_keep_fp32s_first_tokens(model_dir, fp32, options, tolerance):
    fp32_tokens, fp32_ppl = fp32
    tokens, ppl = run(model_dir, **options)
    assert abs(ppl / fp32_ppl - 1) < tolerance, (ppl, fp32_ppl)
    assert ppl != fp32_ppl  # the weights or activations really are different ones
    for ours, reference in zip(tokens, fp32_tokens):
        assert ours[:MATCHING_TOKENS] == reference[:MATCHING_TOKENS]


@pytest.mark.parametrize("quantization", ["q4", "int8"])
def test_tp3_slices_the_quantized_weights_as_tp1_runs_them(model_dir, quantization):
    """In fp32 activations: with bf16 logits the first chat's first token is a near-tie (-1.83 vs -1.96 at
    tp=1, equal at tp=3) that the ranks' different summation order flips."""
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sampling = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for tp in (1, 3):
        with Engine(str(model_dir), tp=tp, quantization=quantization, kv_cache_gb=0.1) as engine:
            results[tp] = [r.token_ids for r in engine.generate(chats, sampling)]
    for one, three in zip(results[1], results[3]):
        assert three[:MATCHING_TOKENS] == one[:MATCHING_TOKENS]



def test_q4_perplexity_is_within_one_percent_of_llama_cpps_on_the_same_file(model_dir):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
    from bench.quality import llama_cpp_logprobs

    _, ours = run(model_dir, quantization="q4", dtype="bfloat16")
    theirs = perplexity(llama_cpp_logprobs(TEXT_WINDOW))
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)


def test_an_fp8_kv_cache_keeps_perplexity_within_two_percent_and_holds_twice_the_tokens(model_dir):
    # prefill in chunks of 64 tokens, so that most scored positions attend to keys read back from the cache
    chunked = {"dtype": "bfloat16", "max_num_batched_tokens": 64, "kv_cache_gb": 0.05}
    _, bf16_ppl = run(model_dir, **chunked)
    _, fp8_ppl = run(model_dir, kv_cache_dtype="fp8", **chunked)
    assert abs(fp8_ppl / bf16_ppl - 1) < 0.02, (fp8_ppl, bf16_ppl)
    assert fp8_ppl != bf16_ppl
    blocks = {}
    for kv in ("auto", "fp8"):
        with Engine(str(model_dir), dtype="bfloat16", kv_cache_gb=0.05, kv_cache_dtype=kv) as engine:
            blocks[kv] = engine.llm.block_manager.num_blocks
    assert blocks["fp8"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1)  # the budget, in whole blocks
