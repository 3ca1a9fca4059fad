"""LinearKernel: every path (packed fp32, half precision small/large batches) computes x @ W.T + b."""
import pytest
import torch
import torch.nn.functional as F

from gpu_worker.layers.gemm import SMALL_BATCH, LinearKernel


@pytest.mark.parametrize("tokens", [1, SMALL_BATCH - 1, SMALL_BATCH, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_kernel_matches_f_linear(tokens, with_bias):
    gen = torch.Generator().manual_seed(tokens)
    weight, x = torch.randn(96, 64, generator=gen), torch.randn(tokens, 64, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    out = LinearKernel(weight)(x, bias)
    assert out.dtype == torch.float32 and out.shape == (tokens, 96)
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, SMALL_BATCH - 1, SMALL_BATCH, 37])
def test_bfloat16_kernel_matches_a_float32_accumulated_product(tokens):
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    x, bias = torch.randn(tokens, 64, generator=gen).bfloat16(), torch.randn(96, generator=gen).bfloat16()
    out = LinearKernel(weight)(x, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, 96)
    reference = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=1e-2)  # bf16 output rounding
