"""A linear layer's matmul on a GGUF file's own 4-bit weights (Q4_0/Q4_1), on torch's CPU int4 kernel.

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

    def __init__(self, parts: QuantizedTensor | Sequence[QuantizedTensor]):
        parts = [parts] if isinstance(parts, QuantizedTensor) else list(parts)
        assert parts and all(p.qtype in Q4_TYPES for p in parts), \
            f"Q4LinearKernel takes Q4_0/Q4_1 tensors, got {[(p.name, p.qtype.name) for p in parts]}"
        assert len({p.shape[1] for p in parts}) == 1, f"parts differ in input features: {[p.shape for p in parts]}"
        assert kernel_available(), f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        q, scale, zero = (np.concatenate(field, axis=0) for field in zip(*map(scale_and_zero, parts)))
        self.out_features, self.in_features = q.shape
        self.qtypes = sorted({p.qtype.name for p in parts})
        padded = -(-self.out_features // N_MULTIPLE) * N_MULTIPLE
        q = np.pad(q, ((0, padded - self.out_features), (0, 0)))            # [out_padded, in]; pad rows: scale 0
        scale = np.pad(scale, ((0, padded - self.out_features), (0, 0)))    # [out_padded, blocks]
        zero = np.pad(zero, ((0, padded - self.out_features), (0, 0)))      # [out_padded, blocks]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(q.astype(np.int32)), 1)                         # uint8 [out_padded, in / 2]
        scales_and_zeros = np.stack([scale.T, zero.T], axis=-1)              # [blocks, out_padded, 2]
        self.scales_and_zeros = torch.from_numpy(scales_and_zeros).to(torch.bfloat16).contiguous()
        self.weight = None  # no plain weight: LinearBase drops its own

    @property
    def nbytes(self) -> int:
        """Bytes the packed weight and its scales take."""
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]
        assert x.shape[-1] == self.in_features, (tuple(x.shape), self.in_features)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # [tokens, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, GROUP_SIZE, self.scales_and_zeros)              # [tokens, out_padded] bf16
        y = y[:, :self.out_features].to(x.dtype)                             # [tokens, out]
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        return (f"Q4LinearKernel(out={self.out_features}, in={self.in_features}, {'+'.join(self.qtypes)}, "
                f"{self.nbytes / 1e6:.2f} MB)")
