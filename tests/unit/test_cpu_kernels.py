"""The fused CPU kernels against the torch ops they replace, their bad inputs, their build and their fallback."""
from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from common.sampling import SamplingParams
from gpu_worker.kernels import cpu_build
from gpu_worker.kernels.cpu_ops import CpuKernels, load_kernels
from gpu_worker.layers.attention import FP8, decode_attention, gather_blocks
from gpu_worker.layers.norm import RMSNorm
from gpu_worker.layers.rotary import RotaryEmbedding
from gpu_worker.llm import Engine

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", params=cpu_build.ARCHES)
def kernels(request) -> CpuKernels:
    """The kernels built for this CPU, for AVX2 and for plain x86-64 (each has its own vector code)."""
    assert load_kernels() is not None, "the fused CPU kernels did not build here (is gcc installed?)"
    if request.param != "native" and "x86_64" not in cpu_build.platform_machine():
        pytest.skip(f"-march={request.param} is an x86-64 target")
    return CpuKernels(cpu_build.load_arch(cpu_build.compiler(), request.param))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16: bit for bit (the kernels round where torch rounds); float32: up to fused multiply-adds."""
    if expected.dtype == torch.bfloat16:
        assert torch.equal(actual, expected), (actual.float() - expected.float()).abs().max()
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_the_residual_add_matches_torch(kernels, dtype):
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x, residual = torch.randn(4, 96).to(dtype), torch.randn(4, 96).to(dtype)
    expected, expected_sum = norm(x, residual.clone())
    fused_residual = residual.clone()
    assert_matches(kernels.rms_norm(x, norm.weight, 1e-5, fused_residual), expected)
    assert torch.equal(fused_residual, expected_sum)  # the sum lands in the residual, rounded as torch rounds
    assert_matches(kernels.rms_norm(x, norm.weight, 1e-5), norm(x))
    wide = torch.randn(4, 200).to(dtype)[:, 50:146]  # rows strided in memory, as a view
    assert_matches(kernels.rms_norm(wide, norm.weight, 1e-5), norm(wide.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])  # 40 x 1024 runs on the thread pool
def test_silu_mul_matches_torch(kernels, dtype, rows):
    gate_up = (torch.randn(rows, 2048) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_matches(kernels.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_the_qk_heads_of_a_fused_qkv_matches_torch(kernels, dtype):
    rotary = RotaryEmbedding(64, 4096, 10000.0, dtype)
    cos, sin = rotary.cos_sin(torch.tensor([0, 7, 300, 4095]))              # each [4, 1, 64]
    qkv = torch.randn(4, 15 * 64).to(dtype)                                 # 9 q + 3 k + 3 v heads
    qk = qkv.view(4, 15, 64)[:, :12]                                        # [4, 12, 64], token stride 960
    expected, v_before = RotaryEmbedding.apply(qk.clone(), cos, sin), qkv.view(4, 15, 64)[:, 12:].clone()
    kernels.rope_(qk, cos, sin)
    assert_matches(qk, expected)
    assert torch.equal(qkv.view(4, 15, 64)[:, 12:], v_before)              # v's heads are left alone


def paged_case(seqs: int, cache_dtype: torch.dtype, q_dtype: torch.dtype, heads=9, kv_heads=3, dim=64,
               block_size=16, blocks=120, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(blocks, block_size, kv_heads, dim, generator=gen).to(cache_dtype)
                        for _ in range(2))
    lengths = torch.randint(1, 12 * block_size, (seqs,), generator=gen)
    lengths[0] = 1
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:16] for _ in range(seqs)])[:, :12]  # rows strided
    q = torch.randn(seqs, heads + 2 * kv_heads, dim, generator=gen).to(q_dtype)[:, :heads]  # token stride free
    return q, k_cache, v_cache, tables, lengths


@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, FP8), (torch.float32, FP8)])
@pytest.mark.parametrize("seqs", [1, 3, 33])
def test_paged_decode_attention_reads_the_blocks_in_place_as_gather_and_sdpa_do(kernels, q_dtype, cache_dtype, seqs):
    q, k_cache, v_cache, tables, lengths = paged_case(seqs, cache_dtype, q_dtype)
    keys, values = (gather_blocks(c, tables, dtype=q_dtype) for c in (k_cache, v_cache))
    mask = (torch.arange(keys.shape[1]) < lengths[:, None]).view(seqs, 1, 1, -1)
    expected = decode_attention(q.unsqueeze(2), keys, values, mask, upcast=True).squeeze(2)  # [seqs, heads, dim]
    actual = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lengths)
    tolerance = 1e-5 if q_dtype == torch.float32 else 8e-3  # bf16: the output's own rounding
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_paged_decode_attention_writes_into_the_given_output(kernels):
    q, k_cache, v_cache, tables, lengths = paged_case(2, torch.float32, torch.float32)
    out = torch.full((5, 9, 64), 7.0)
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, lengths, out[:2])
    assert torch.equal(out[:2], kernels.paged_decode_attention(q, k_cache, v_cache, tables, lengths))
    assert bool((out[2:] == 7.0).all())


def test_bad_inputs_are_refused_with_what_was_wrong(kernels):
    q, k_cache, v_cache, tables, lengths = paged_case(2, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="int64"):
        kernels.paged_decode_attention(q, k_cache, v_cache, tables.int(), lengths)
    with pytest.raises(ValueError, match="context_lens"):
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, lengths[:1])
    with pytest.raises(ValueError, match="heads"):
        kernels.paged_decode_attention(q[:, :8], k_cache, v_cache, tables, lengths)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.paged_decode_attention(q, k_cache.transpose(0, 1), v_cache, tables, lengths)
    with pytest.raises(ValueError, match="last dimension"):
        kernels.rms_norm(torch.randn(64, 4).t(), torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        kernels.rms_norm(torch.randn(4, 64), torch.ones(64), 1e-5, torch.randn(64, 4).t())
    with pytest.raises(ValueError, match="gate_up"):
        kernels.silu_mul(torch.randn(64, 8).t())
    assert not CpuKernels.supports(torch.float16)


def test_the_library_is_cached_per_source_and_a_failed_build_says_why(tmp_path, monkeypatch):
    cc = cpu_build.compiler()
    path = cpu_build.library_path(cc, tmp_path)
    assert path.parent == tmp_path / "kernels" and path.name.startswith("cpu_ops-")
    assert cpu_build.build(cc, path, "x86-64") > 0 and path.exists()
    assert ctypes.CDLL(str(path)).tpq_rms_norm is not None
    monkeypatch.setattr(cpu_build, "SOURCES", (tmp_path / "broken.c",))
    (tmp_path / "broken.c").write_text("this is not C\n")
    assert cpu_build.library_path(cc, tmp_path) != path                      # another source, another file
    with pytest.raises(cpu_build.BuildError, match="failed"):
        cpu_build.build(cc, tmp_path / "kernels" / "broken.so")


def test_off_by_setting_and_without_a_compiler_the_kernels_are_none(monkeypatch):
    cpu_build.load.cache_clear()
    try:
        monkeypatch.setenv(cpu_build.ENV, "0")
        assert load_kernels() is None
        cpu_build.load.cache_clear()
        monkeypatch.setenv(cpu_build.ENV, "1")
        monkeypatch.setattr(cpu_build, "compiler", lambda: None)
        assert load_kernels() is None
    finally:
        cpu_build.load.cache_clear()


def generate_with(model_dir, monkeypatch, kernels_on: bool, **options):
    """Greedy results of one engine, with the fused kernels on or off."""
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 37, 70)]
    monkeypatch.setenv(cpu_build.ENV, "1" if kernels_on else "0")
    cpu_build.load.cache_clear()
    try:
        with Engine(str(model_dir), **options) as engine:
            assert (engine.llm.executor.runner.kernels is not None) == kernels_on
            return engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                           logprobs=1))
    finally:
        cpu_build.load.cache_clear()


def logprob_gaps(results, reference) -> list[float]:
    return [abs(a.logprob - b.logprob) for r, ref in zip(results, reference) for a, b in zip(r.logprobs, ref.logprobs)]


def test_an_fp32_engine_with_the_kernels_generates_what_one_on_torch_ops_does(tiny_llama_dir, monkeypatch):
    fused = generate_with(tiny_llama_dir, monkeypatch, True, dtype="float32")
    plain = generate_with(tiny_llama_dir, monkeypatch, False, dtype="float32")
    assert [r.token_ids for r in fused] == [r.token_ids for r in plain]
    assert max(logprob_gaps(fused, plain)) < 1e-4


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_a_bf16_engine_with_the_kernels_is_as_close_to_fp32_as_one_on_torch_ops(tiny_llama_dir, monkeypatch,
                                                                                 kv_cache_dtype):
    """bf16 differs from torch's bf16 path only where the kernel keeps float32 (attention): it may only get closer."""
    reference = generate_with(tiny_llama_dir, monkeypatch, False, dtype="float32")
    fused, plain = (generate_with(tiny_llama_dir, monkeypatch, on, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype)
                    for on in (True, False))
    assert [r.token_ids for r in fused] == [r.token_ids for r in plain]
    fused_gaps, plain_gaps = logprob_gaps(fused, reference), logprob_gaps(plain, reference)
    assert sum(fused_gaps) <= 1.1 * sum(plain_gaps), (sum(fused_gaps), sum(plain_gaps))


def q4_weight(n: int, k: int, seed: int = 0):
    """A random 4-bit weight as the kernels take it, and its values [n, k] in float32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d, m = torch.rand(n, k // 32, generator=gen) * 0.02, -torch.rand(n, k // 32, generator=gen) * 0.15
    halves = q.view(n, k // 32, 2, 16)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()  # GGUF's nibble order
    return packed, d, m, (q.view(n, k // 32, 32).float() * d[..., None] + m[..., None]).view(n, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 21])  # 21: chunks of 8, 8 and 5 rows
@pytest.mark.parametrize("n", [64, 70])  # 70: a last group of fewer than 4 output features
def test_int8_and_q4_products_match_their_dequantized_weights(kernels, dtype, rows, n):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    qweight = torch.randint(-127, 128, (n, 96), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen) * 0.01
    expected = x.double() @ (qweight.double() * scales.double()[:, None]).T                # [rows, n]
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8                                # bf16: the output's rounding
    scale = expected.abs().max()
    assert (kernels.int8_gemv(x, qweight, scales).double() - expected).abs().max() <= tolerance * scale
    packed, d, m, weight = q4_weight(n, 96)
    expected = x.double() @ weight.double().T
    scale = expected.abs().max()
    assert (kernels.q4_gemv(x, packed, d, m).double() - expected).abs().max() <= tolerance * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_q4_dequantize_writes_the_asked_rows(kernels, dtype):
    packed, d, m, weight = q4_weight(40, 64)
    out = torch.empty(15, 64, dtype=dtype)
    kernels.q4_dequantize(packed, d, m, 20, out)
    torch.testing.assert_close(out, weight[20:35].to(dtype))  # d * q + m: one fused multiply-add, one rounding
    with pytest.raises(ValueError, match="rows 30..45 of 40"):
        kernels.q4_dequantize(packed, d, m, 30, out)


def test_bad_quantized_inputs_are_refused_with_what_was_wrong(kernels):
    packed, d, m, _ = q4_weight(8, 64)
    with pytest.raises(ValueError, match="rows, k"):
        kernels.q4_gemv(torch.randn(64), packed, d, m)
    with pytest.raises(ValueError, match="uint8"):
        kernels.q4_gemv(torch.randn(1, 64), packed.int(), d, m)
    with pytest.raises(ValueError, match="m must be"):
        kernels.q4_gemv(torch.randn(1, 64), packed, d, m[:, :1])
    with pytest.raises(ValueError, match="int8"):
        kernels.int8_gemv(torch.randn(1, 64), torch.zeros(8, 64), torch.ones(8))
    with pytest.raises(ValueError, match="scales"):
        kernels.int8_gemv(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(7))
    with pytest.raises(ValueError, match="float32/bf16"):
        kernels.int8_gemv(torch.randn(1, 64).half(), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8))


def test_fp8_bytes_read_and_write_as_torchs_casts(kernels):
    """Every e4m3fn byte but NaN decodes as torch decodes it; the program's writes round as torch's cast does."""
    every = torch.arange(256, dtype=torch.uint8)
    every = every[(every & 0x7F) != 0x7F]                                     # NaN: never written (saturating)
    cache = every.view(FP8).view(1, 1, 1, -1)                                 # [1 block, 1 slot, 1 head, 254]
    q = torch.zeros(1, 1, every.numel())                                      # zero scores: attention = the mean
    out = kernels.paged_decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.int64),
                                         torch.ones(1, dtype=torch.int64))
    torch.testing.assert_close(out.view(-1), every.view(FP8).float(), rtol=0, atol=0)
