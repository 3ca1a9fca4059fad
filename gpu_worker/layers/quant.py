"""Weight-only int8 linear layers: per-output-channel int8 weights, activations in the model's dtype.

``quantization="int8"`` replaces every linear layer's kernel (and the LM
head's) with an :class:`Int8LinearKernel` once the weights are loaded, so
each rank quantizes the slice it holds: a column-parallel slice keeps its
rows' scales, a row-parallel slice gets scales of its own columns (finer
than one scale over the whole row, never coarser).

Each output channel ``n`` gets one scale ``s[n]`` (``max |w[n, :]| / 127``,
or a little less where clipping the row's outliers lowers its squared
error: :func:`quantize_int8`) and int8 values ``q = round(w / s)``.
A step of few tokens (decode) runs the fused CPU kernel's
``int8_gemv`` (:mod:`gpu_worker.kernels.cpu_ops`: each weight read once for
up to ``GEMV_MAX_TOKENS`` rows, float32 scales) where the kernels load, else
``torch.ops.aten._weight_int8pack_mm`` (up to ``max_tokens_int8`` rows),
which reads the int8 weight once per 4 rows of activations: at batch 1
either moves a quarter of fp32's bytes. For many tokens (prefill, large batches)
that re-reading loses to a dense GEMM, so past ``max_tokens_int8`` tokens
the kernel dequantizes the weight in slabs of :data:`DEQUANT_ROWS` rows and
runs a dense matmul per slab: the same values, bounded extra memory. The
crossover depends on the CPU; the start-up calibration
(:mod:`gpu_worker.engine.calibration`) does not measure it yet, so it is
:data:`DEFAULT_MAX_TOKENS_INT8` everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_worker.kernels.cpu_ops import CpuKernels

INT8_MAX = 127
DEFAULT_MAX_TOKENS_INT8 = 8
"""Steps of up to this many tokens use the int8 kernel; larger ones dequantize in slabs."""
DEQUANT_ROWS = 4096
"""Output rows dequantized at once on the dense path (a slab of the LM head is 4096 x hidden)."""
CLIP_RATIOS = tuple(1.0 - i / 50 for i in range(26))
"""Fractions of a row's largest weight its scale may clip to (1.0 first: an exact tie keeps absmax)."""
QUANTIZATIONS = ("int8",)
"""The weight formats :func:`make_quantized_kernel` builds."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(q, scales)`` with ``weight ~ q * scales[:, None]``.

    Each row's scale is the one of :data:`CLIP_RATIOS` x ``max |w| / 127``
    with the least squared error over the row: clipping a few outliers buys
    a finer step for the rest (on SmolLM2, whose weights are Q4_1 values,
    the shipped text's perplexity moves +0.9 % from fp32 with it, +1.3 % with
    plain absmax scales). Rows are done :data:`DEQUANT_ROWS` at a time.
    ``weight`` [out, in] in any float dtype; ``q`` [out, in] int8 in
    [-127, 127]; ``scales`` [out] float32 (an all-zero row: zeros, with the
    smallest positive scale).
    """
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)           # [out, in]
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)  # [out]
    for start in range(0, weight.shape[0], DEQUANT_ROWS):
        rows = slice(start, start + DEQUANT_ROWS)
        q[rows], scales[rows] = _quantize_rows(weight[rows].float())
    return q, scales


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [rows, in] float32 -> q [rows, in] int8, scales [rows]
    amax = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)          # [rows]
    best_scale, best_error = amax / INT8_MAX, None
    for ratio in CLIP_RATIOS:
        scale = amax * ratio / INT8_MAX                                             # [rows]
        error = (torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX) * scale[:, None] - w).square_().sum(1)
        if best_error is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error                                             # [rows]
            best_scale, best_error = torch.where(better, scale, best_scale), torch.minimum(error, best_error)
    q = torch.round(w / best_scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, best_scale


class Int8LinearKernel:
    """``x @ W.T + bias`` for x [tokens, in] with W [out, in] held as per-channel int8 (see the module docstring)."""

    needs_plain_weight = False

    def __init__(self, weight: torch.Tensor, max_tokens_int8: int = DEFAULT_MAX_TOKENS_INT8,
                 kernels: CpuKernels | None = None) -> None:
        self.qweight, self._scales_fp32 = quantize_int8(weight)                # [out, in] int8, [out] fp32
        self.max_tokens_int8 = max_tokens_int8
        self.kernels = kernels if kernels is not None and self.qweight.shape[1] % 16 == 0 else None
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
        if self.kernels is not None and x.shape[0] <= CpuKernels.GEMV_MAX_TOKENS and CpuKernels.supports(x.dtype):
            y = self.kernels.int8_gemv(x.contiguous(), self.qweight, self._scales_fp32)
            return y if bias is None else y + bias
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


def make_quantized_kernel(weight: torch.Tensor, quantization: str,
                          kernels: CpuKernels | None = None) -> Int8LinearKernel:
    """The kernel of format ``quantization`` (one of :data:`QUANTIZATIONS`) for a loaded weight [out, in]."""
    if quantization == "int8":
        return Int8LinearKernel(weight, kernels=kernels)
    raise ValueError(f"unknown weight quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
