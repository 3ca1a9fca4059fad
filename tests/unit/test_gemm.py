"""LinearKernel: every path (packed fp32, half precision small/large batches) computes x @ W.T + b.

Where oneDNN is present, the packed path must also be the one that runs: the
kernel's operators are recorded with torch's profiler, so a kernel that
silently fell back to ``F.linear`` fails here even though its results match.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gpu_worker.layers.gemm import SMALL_BATCH, LinearKernel

PACKED_OP = "mkldnn::_linear_pointwise"  # the oneDNN linear on a prepacked weight
PLAIN_OP = "aten::linear"
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN (mkldnn) linear ops: "
                                                     "LinearKernel takes F.linear, there is no packed path to check")


def ops_run(kernel: LinearKernel, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, set[str]]:
    """``kernel(x, bias)`` and the names of the operators it ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = kernel(x, bias)
    return out, {event.key for event in prof.key_averages()}


def native_half_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 / AMX): then F.linear is the fast path."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("tokens", [1, SMALL_BATCH - 1, SMALL_BATCH, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_kernel_matches_f_linear(tokens, with_bias):
    gen = torch.Generator().manual_seed(tokens)
    weight, x = torch.randn(96, 64, generator=gen), torch.randn(tokens, 64, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    out = LinearKernel(weight)(x, bias)
    assert out.dtype == torch.float32 and out.shape == (tokens, 96)
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("tokens", [1, SMALL_BATCH, 37])
def test_float32_kernel_runs_the_packed_onednn_path(tokens):
    gen = torch.Generator().manual_seed(tokens)
    weight, x, bias = torch.randn(96, 64, generator=gen), torch.randn(tokens, 64, generator=gen), torch.randn(96)
    kernel = LinearKernel(weight)
    out, ops = ops_run(kernel, x, bias)
    assert PACKED_OP in ops and PLAIN_OP not in ops, f"the packed oneDNN linear did not run: {sorted(ops)}"
    assert not kernel.needs_plain_weight, "a float32 kernel on the packed path should drop its plain weight"
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


@needs_onednn
@pytest.mark.parametrize("tokens", [1, SMALL_BATCH - 1, SMALL_BATCH, 37])
def test_bfloat16_kernel_packs_large_steps_only_without_native_bf16(tokens):
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    x = torch.randn(tokens, 64, generator=gen).bfloat16()
    _out, ops = ops_run(LinearKernel(weight), x, None)
    packed = not native_half_matmul() and tokens >= SMALL_BATCH
    expected, other = (PACKED_OP, PLAIN_OP) if packed else (PLAIN_OP, PACKED_OP)
    assert expected in ops and other not in ops, (
        f"{tokens} bf16 tokens (native bf16: {native_half_matmul()}) should run {expected}: ran {sorted(ops)}")
