"""Weight-only int8 kernels: the quantization's error bound, and every path computing the same product."""
from __future__ import annotations

import pytest
import torch

from gpu_worker.engine.engine_config import EngineConfig
from gpu_worker.layers import quant
from gpu_worker.layers.quant import Int8LinearKernel, make_quantized_kernel, quantize_int8


def test_quantize_int8_is_within_half_a_step_of_every_weight_it_does_not_clip():
    weight = torch.randn(48, 96) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows of very different ranges
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert int(q.abs().max()) == 127  # every row's largest weight maps to the end of the range
    inside = weight.abs() <= 127 * scales[:, None]
    error = (q.float() * scales[:, None] - weight).abs()
    assert bool((error[inside] <= (scales[:, None] / 2 + 1e-7).expand_as(error)[inside]).all())


def test_each_rows_scale_has_no_more_squared_error_than_the_absmax_scale():
    weight = torch.randn(64, 512)
    # every fourth row: values on a grid of step 0.01 (as a 4-bit checkpoint's are on theirs) and one just past
    # 127 steps: the absmax scale misses the grid, clipping to 0.98 x max lands on it
    grid_rows = torch.randint(-127, 128, (16, 512)) * 0.01
    grid_rows[:, 0] = 1.27 / 0.98
    weight[::4] = grid_rows
    q, scales = quantize_int8(weight)
    absmax = weight.abs().amax(1) / 127
    plain = (torch.round(weight / absmax[:, None]).clamp(-127, 127) * absmax[:, None] - weight).square().sum(1)
    chosen = (q.float() * scales[:, None] - weight).square().sum(1)
    assert bool((chosen <= plain * (1 + 1e-6)).all())
    torch.testing.assert_close(scales[::4], torch.full((16,), 0.01))  # the grid's own step
    assert float(chosen[::4].sum()) < 0.5 * float(plain[::4].sum())


def test_an_all_zero_row_quantizes_to_zeros():
    weight = torch.randn(4, 16)
    weight[2] = 0
    q, scales = quantize_int8(weight)
    assert bool((q[2] == 0).all()) and float(scales[2]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_and_dense_paths_compute_the_dequantized_product(dtype):
    weight, bias = torch.randn(40, 64), torch.randn(40)
    kernel = Int8LinearKernel(weight)
    reference_weight = kernel.dequantized(torch.float32)                      # [40, 64]
    for tokens in (1, kernel.max_tokens_int8, kernel.max_tokens_int8 + 1, 33):  # both sides of the switch
        x = torch.randn(tokens, 64)
        expected = x @ reference_weight.T + bias                              # [tokens, 40]
        got = kernel(x.to(dtype), bias.to(dtype))
        assert got.dtype == dtype and got.shape == (tokens, 40)
        tolerance = 1e-4 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance * 0.1)


def test_the_dense_path_in_slabs_equals_one_slab(monkeypatch):
    weight, x = torch.randn(50, 32), torch.randn(20, 32)
    kernel = Int8LinearKernel(weight, max_tokens_int8=0)  # always the dense path
    whole = kernel(x, None)
    monkeypatch.setattr(quant, "DEQUANT_ROWS", 16)  # 50 rows: slabs of 16, 16, 16, 2
    torch.testing.assert_close(kernel(x, None), whole)


def test_int8_output_stays_close_to_the_float_product():
    weight, x = torch.randn(256, 512), torch.randn(4, 512)
    exact = x @ weight.T
    got = Int8LinearKernel(weight)(x, None)
    relative = (got - exact).norm() / exact.norm()
    assert float(relative) < 0.01  # per-channel int8 of Gaussian weights: about 0.4 % here


def test_an_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown weight quantization 'int3'.*int8"):
        make_quantized_kernel(torch.randn(4, 4), "int3")


def test_the_engine_config_refuses_an_unknown_quantization():
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
