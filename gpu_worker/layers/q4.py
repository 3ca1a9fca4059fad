"""A linear layer's matmul on a GGUF file's own 4-bit weights (Q4_0/Q4_1).

Where the fused CPU kernels load (:mod:`gpu_worker.kernels.cpu_ops`), the
blocks stay as the file has them (each weight ``d * q + m`` with float32
``d`` and ``m``, exact from the file's float16): a step of up to
``CpuKernels.GEMV_MAX_TOKENS`` tokens runs ``q4_gemv`` on them, reading
each block once; a larger one (prefill)
dequantizes the weight in slabs into the activations' dtype and runs a
dense matmul. Otherwise they go through torch's CPU int4 kernel:

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)``
takes bf16 activations and, per group of 32 input features and output
feature, a bf16 ``scale`` and ``zero``; it dequantizes each 4-bit ``q`` in
0..15 as ``w = (q - 8) * scale + zero`` (in fp32, from the bf16 values) and
accumulates in fp32 (aten/src/ATen/native/cpu/int4mm_kernel.cpp: a lookup
table of ``q - 8`` fused with ``scale`` and ``zero``; pinned by
tests/unit/test_q4.py). A GGUF block of 32 features is one such group:

- Q4_0, ``w = d * (q - 8)``: ``scale = d``, ``zero = 0``;
- Q4_1, ``w = d * q + m = (q - 8) * d + (m + 8 d)``: ``scale = d``, ``zero = m + 8 d``.

The 4-bit values go into the kernel unchanged. Only the per-block ``d`` and
``m + 8 d`` are rounded, from float16 to bf16 (the kernel takes its scales
in the activations' dtype): a relative change of at most 2^-8 per block,
the size of bf16's own rounding of the activations.

Slicing for tensor parallelism happens on the blocks before packing
(`QuantizedTensor.narrow`): rows for column-parallel layers, whole 32-wide
blocks of columns for row-parallel ones. CPU only: CUDA's
``_weight_int4pack_mm`` wants another packing.

The kernel dequantizes the weight again for every 4 rows of ``x``: it suits
decode steps; for many tokens (prefill) a dense matmul may be faster, a
crossover for calibration to measure.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gpu_worker.kernels.cpu_ops import CpuKernels
from gpu_worker.layers.quant import DEQUANT_ROWS
from gpu_worker.weights.gguf_q4 import BLOCK_SIZE, Q4_TYPES, QuantizedTensor, q4_fields

GROUP_SIZE = BLOCK_SIZE  # the kernel's qGroupSize: one group per GGUF block
N_MULTIPLE = 16          # _convert_weight_to_int4pack_for_cpu wants out features in multiples of 16
ZERO_POINT = 8           # the kernel computes (q - 8) * scale + zero


def kernel_available() -> bool:
    """Whether this torch build has the CPU int4 ops."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def scale_and_zero(tensor: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q, scale, zero)`` of a Q4_0/Q4_1 tensor with ``w = (q - 8) * scale + zero`` exactly.

    ``q`` uint8 [out, in] in 0..15; ``scale`` and ``zero`` float32 [out, in / 32] (``m + 8 d``
    is exact in float32 unless ``|m|`` and ``8 |d|`` are more than 2^12 apart).
    """
    q, d, m = q4_fields(tensor)
    scale = d.astype(np.float32)                                         # [out, blocks]
    zero = np.zeros_like(scale) if m is None else m.astype(np.float32) + ZERO_POINT * scale
    return q, scale, zero


class Q4LinearKernel:
    """``x @ W.T + bias`` for x [tokens, in] with W [out, in] kept as GGUF Q4_0/Q4_1 blocks.

    ``parts`` is one tensor, or several with the same input features stacked
    along the output features in order (a fused q/k/v or gate/up projection).
    Slice each part for this rank with `QuantizedTensor.narrow` first. The
    call signature is `gemm.LinearKernel`'s: any float dtype in and out,
    computed in bf16 with fp32 accumulation.
    """

    needs_plain_weight = False

    def __init__(self, parts: QuantizedTensor | Sequence[QuantizedTensor], kernels: CpuKernels | None = None):
        parts = [parts] if isinstance(parts, QuantizedTensor) else list(parts)
        assert parts and all(p.qtype in Q4_TYPES for p in parts), \
            f"Q4LinearKernel takes Q4_0/Q4_1 tensors, got {[(p.name, p.qtype.name) for p in parts]}"
        assert len({p.shape[1] for p in parts}) == 1, f"parts differ in input features: {[p.shape for p in parts]}"
        self.qtypes = sorted({p.qtype.name for p in parts})
        self.kernels = kernels
        self.weight = None  # no plain weight: LinearBase drops its own
        if kernels is not None:
            self._keep_blocks(parts)
            return
        assert kernel_available(), f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        q, scale, zero = (np.concatenate(field, axis=0) for field in zip(*map(scale_and_zero, parts)))
        self.out_features, self.in_features = q.shape
        padded = -(-self.out_features // N_MULTIPLE) * N_MULTIPLE
        q = np.pad(q, ((0, padded - self.out_features), (0, 0)))            # [out_padded, in]; pad rows: scale 0
        scale = np.pad(scale, ((0, padded - self.out_features), (0, 0)))    # [out_padded, blocks]
        zero = np.pad(zero, ((0, padded - self.out_features), (0, 0)))      # [out_padded, blocks]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(q.astype(np.int32)), 1)                         # uint8 [out_padded, in / 2]
        scales_and_zeros = np.stack([scale.T, zero.T], axis=-1)              # [blocks, out_padded, 2]
        self.scales_and_zeros = torch.from_numpy(scales_and_zeros).to(torch.bfloat16).contiguous()

    def _keep_blocks(self, parts: list[QuantizedTensor]) -> None:
        """Hold the blocks for the fused kernels: nibbles as the file packs them, float32 ``d`` and ``m``."""
        fields = [q4_fields(p) for p in parts]
        q = np.concatenate([f[0] for f in fields], axis=0)                    # [out, in] uint8 0..15
        d = np.concatenate([f[1] for f in fields], axis=0).astype(np.float32)  # [out, blocks]
        m = np.concatenate([f[2].astype(np.float32) if f[2] is not None else -ZERO_POINT * f[1].astype(np.float32)
                            for f in fields], axis=0)                          # [out, blocks]; Q4_0: -8 d
        self.out_features, self.in_features = q.shape
        halves = q.reshape(self.out_features, -1, 2, BLOCK_SIZE // 2)          # [out, blocks, 2, 16]
        nibbles = halves[:, :, 0] | (halves[:, :, 1] << 4)                     # [out, blocks, 16]
        self.packed = torch.from_numpy(np.ascontiguousarray(nibbles.reshape(self.out_features, -1)))  # [out, in/2]
        self.d, self.m = torch.from_numpy(np.ascontiguousarray(d)), torch.from_numpy(np.ascontiguousarray(m))
        self.scales_and_zeros = None

    @property
    def nbytes(self) -> int:
        """Bytes the packed weight and its scales take."""
        if self.kernels is not None:
            return self.packed.nbytes + self.d.nbytes + self.m.nbytes
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]
        assert x.shape[-1] == self.in_features, (tuple(x.shape), self.in_features)
        if self.kernels is not None and CpuKernels.supports(x.dtype):
            y = self._fused(x.reshape(-1, self.in_features).contiguous())   # [tokens, out]
            if bias is not None:
                y = y + bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # [tokens, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, GROUP_SIZE, self.scales_and_zeros)              # [tokens, out_padded] bf16
        y = y[:, :self.out_features].to(x.dtype)                             # [tokens, out]
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]
        if x.shape[0] <= CpuKernels.GEMV_MAX_TOKENS:
            return self.kernels.q4_gemv(x, self.packed, self.d, self.m)
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)            # [tokens, out]
        slab = torch.empty(min(DEQUANT_ROWS, self.out_features), self.in_features, dtype=x.dtype)  # [rows, in]
        for start in range(0, self.out_features, DEQUANT_ROWS):
            rows = slab[:min(DEQUANT_ROWS, self.out_features - start)]
            self.kernels.q4_dequantize(self.packed, self.d, self.m, start, rows)
            torch.matmul(x, rows.T, out=y[:, start:start + rows.shape[0]])     # [tokens, slab rows]
        return y

    def __repr__(self) -> str:
        return (f"Q4LinearKernel(out={self.out_features}, in={self.in_features}, {'+'.join(self.qtypes)}, "
                f"{self.nbytes / 1e6:.2f} MB)")
