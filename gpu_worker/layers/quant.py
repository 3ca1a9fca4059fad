"""Weight-only int8 linear layers: per-output-channel int8 weights, activations in the model's dtype.

``quantization="int8"`` replaces every linear layer's kernel (and the LM
head's) with an :class:`Int8LinearKernel` once the weights are loaded, so
each rank quantizes the slice it holds: a column-parallel slice keeps its
rows' scales, a row-parallel slice gets scales of its own columns (finer
than one scale over the whole row, never coarser).

Each output channel ``n`` gets one scale ``s[n] = max |w[n, :]| / 127`` and
int8 values ``q = round(w / s)``, so ``w ~ q * s`` to within half a step.
A step of few tokens (decode) runs ``torch.ops.aten._weight_int8pack_mm``,
which reads the int8 weight once per 4 rows of activations: at batch 1 it
moves a quarter of fp32's bytes. For many tokens (prefill, large batches)
that re-reading loses to a dense GEMM, so past ``max_tokens_int8`` tokens
the kernel dequantizes the weight in slabs of :data:`DEQUANT_ROWS` rows and
runs a dense matmul per slab: the same values, bounded extra memory. The
crossover depends on the CPU; :mod:`gpu_worker.engine.calibration` may
measure it, and :data:`DEFAULT_MAX_TOKENS_INT8` is the value without.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127
DEFAULT_MAX_TOKENS_INT8 = 8
"""Steps of up to this many tokens use the int8 kernel; larger ones dequantize in slabs."""
DEQUANT_ROWS = 4096
"""Output rows dequantized at once on the dense path (a slab of the LM head is 4096 x hidden)."""
QUANTIZATIONS = ("int8",)
"""The weight formats :func:`make_quantized_kernel` builds."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(q, scales)`` with ``weight ~ q * scales[:, None]``.

    ``weight`` [out, in] in any float dtype; ``q`` [out, in] int8 in [-127, 127];
    ``scales`` [out] float32 (an all-zero row gets the smallest positive scale, and zeros).
    """
    w = weight.float()                                                          # [out, in]
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX  # [out]
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)     # [out, in]
    return q, scales


class Int8LinearKernel:
    """``x @ W.T + bias`` for x [tokens, in] with W [out, in] held as per-channel int8 (see the module docstring)."""

    needs_plain_weight = False

    def __init__(self, weight: torch.Tensor, max_tokens_int8: int = DEFAULT_MAX_TOKENS_INT8) -> None:
        self.qweight, self._scales_fp32 = quantize_int8(weight)                # [out, in] int8, [out] fp32
        self.max_tokens_int8 = max_tokens_int8
        self._scales: dict[torch.dtype, torch.Tensor] = {}
        self._packed_kernel = weight.device.type == "cpu"  # aten's int8 kernel: CPU (and MPS) only
        self.weight = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def scales(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales [out] in ``dtype`` (the int8 kernel wants them in the activations' dtype)."""
        if dtype not in self._scales:
            self._scales[dtype] = self._scales_fp32.to(dtype)
        return self._scales[dtype]

    def dequantized(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """``q * s`` of ``rows`` in ``dtype``: [rows, in]."""
        return self.qweight[rows].to(dtype) * self.scales(dtype)[rows, None]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]
        if self._packed_kernel and x.shape[0] <= self.max_tokens_int8:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales(x.dtype))
            return y if bias is None else y + bias
        return self._dense(x, bias)

    def _dense(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = self.out_features
        if out <= DEQUANT_ROWS:
            return F.linear(x, self.dequantized(x.dtype), bias)
        y = torch.empty(x.shape[0], out, dtype=x.dtype, device=x.device)       # [tokens, out]
        for start in range(0, out, DEQUANT_ROWS):
            rows = slice(start, min(out, start + DEQUANT_ROWS))
            torch.matmul(x, self.dequantized(x.dtype, rows).T, out=y[:, rows])  # [tokens, slab]
        return y if bias is None else y + bias

    @property
    def nbytes(self) -> int:
        """Bytes the kernel holds for its weight (int8 values and fp32 scales)."""
        return self.qweight.numel() + 4 * self._scales_fp32.numel()


def make_quantized_kernel(weight: torch.Tensor, quantization: str) -> Int8LinearKernel:
    """The kernel of format ``quantization`` (one of :data:`QUANTIZATIONS`) for a loaded weight [out, in]."""
    if quantization == "int8":
        return Int8LinearKernel(weight)
    raise ValueError(f"unknown weight quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
