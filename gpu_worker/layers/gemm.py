"""The matrix multiply behind every linear layer, chosen once per layer after loading.

CPU, float32: oneDNN's prepacked weight layout, about 1.3-2x faster than
torch's default (MKL) path at every batch size on AVX2 machines.

CPU, bf16/fp16 without native support (no AVX-512 BF16/AMX): torch's
half-precision matrix-vector product is fast (half the bytes of fp32), but
its matrix-matrix product is emulated and several times slower than fp32.
So such a layer keeps its half-precision weight for steps of fewer than
``SMALL_BATCH`` tokens, and a float32 prepacked copy of the same values for
larger steps (prefill, batched decode). The copy costs memory (fp32 next to
half precision); the output is what a half-precision GEMM (which accumulates
in fp32) gives, up to summation order.

Everywhere else (CUDA, CPUs with native bf16): plain ``F.linear``. This
module is the only user of the private ``torch.ops.mkldnn`` ops.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PREPACK_BATCH_HINT = 32  # the batch size oneDNN tunes the packed layout for; any batch size works
SMALL_BATCH = 8          # below this many tokens, half-precision weights are used as they are


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def _native_half_matmul() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class LinearKernel:
    """``x @ weight.T + bias`` for x [tokens, in] and weight [out, in], on the fastest path for this host."""

    def __init__(self, weight: torch.Tensor):
        self.weight: torch.Tensor | None = weight
        self.packed: torch.Tensor | None = None
        self.min_tokens_packed = 0
        if weight.device.type != "cpu" or not _onednn_available():
            return
        if weight.dtype == torch.float32:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_BATCH_HINT)
        elif not _native_half_matmul():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.float(), PREPACK_BATCH_HINT)
            self.min_tokens_packed = SMALL_BATCH

    @property
    def needs_plain_weight(self) -> bool:
        return self.packed is None or self.min_tokens_packed > 0

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is None or x.shape[0] < self.min_tokens_packed:
            return F.linear(x, self.weight, bias)
        if x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        bias = None if bias is None else bias.float()
        return torch.ops.mkldnn._linear_pointwise(x.float(), self.packed, bias, "none", [], "").to(x.dtype)
