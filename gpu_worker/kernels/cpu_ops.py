"""The fused CPU kernels (``cpu_ops.c``) as functions of torch tensors.

Each wrapper hands the C function its tensors' pointers and strides; the
caller gives CPU tensors of a supported dtype whose last dimension is
contiguous (`CpuKernels.supports` says which dtypes). `load_kernels` returns
None where the library cannot be had (see `gpu_worker.kernels.cpu_build`),
and callers then run the torch ops these replace.
"""
from __future__ import annotations

import ctypes

import torch

from gpu_worker.kernels import cpu_build

FP8 = torch.float8_e4m3fn
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, FP8: 2}


def _check(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu" or t.stride(-1) != 1:
        raise ValueError(f"{name}: a CPU tensor with a contiguous last dimension is needed, "
                         f"got {t.device} strides {t.stride()}")


class CpuKernels:
    """Residual add + RMSNorm, SiLU-and-multiply, RoPE, and paged decode attention, each one C call."""

    def __init__(self, library: ctypes.CDLL):
        self._lib = library

    @staticmethod
    def supports(dtype: torch.dtype) -> bool:
        """Whether activations of ``dtype`` can use the kernels (float32, bf16)."""
        return dtype in (torch.float32, torch.bfloat16)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * norm(x)``; with ``residual`` (contiguous, updated in place to ``x + residual``), of that sum."""
        # x: [rows, dim] (rows may be strided); weight: [dim]; residual: [rows, dim]
        _check("x", x)
        out = torch.empty(x.shape, dtype=x.dtype)                                    # [rows, dim]
        if residual is not None and not residual.is_contiguous():
            raise ValueError("residual must be contiguous (it is updated in place)")
        self._lib.tpq_rms_norm(DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0),
                               None if residual is None else residual.data_ptr(), weight.data_ptr(),
                               out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up`` [rows, 2 * width] (the gate, then up), as [rows, width]."""
        if not gate_up.is_contiguous():
            raise ValueError("gate_up must be contiguous")
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, width, dtype=gate_up.dtype)                          # [rows, width]
        self._lib.tpq_silu_mul(DTYPE_CODES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), rows, width,
                               torch.get_num_threads())
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [tokens, heads, dim] (a view whose heads are contiguous) in place by ``cos``, ``sin``."""
        # cos, sin: [tokens, 1, dim] or [tokens, dim], contiguous, in x's dtype
        _check("x", x)
        if x.stride(1) != x.shape[2] or not (cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("rope_ needs contiguous heads in x and contiguous cos/sin tables")
        tokens, heads, dim = x.shape
        self._lib.tpq_rope(DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(),
                           tokens, heads, dim, torch.get_num_threads())
        return x

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               out: torch.Tensor | None = None) -> torch.Tensor:
        """One query per sequence over its cache blocks where they lie; ``out`` [seqs, heads, dim] (made if None)."""
        # q: [seqs, heads, dim] (token stride free); k_cache, v_cache: [blocks, block_size, kv_heads, dim]
        # block_tables: [seqs, >= blocks] int64 (row stride free); context_lens: [seqs] int64
        _check("q", q)
        _check("block_tables", block_tables)
        seqs, heads, dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        if q.stride(1) != dim or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("paged_decode_attention needs contiguous heads in q and contiguous caches")
        if heads % kv_heads or context_lens.dtype != torch.int64 or block_tables.dtype != torch.int64:
            raise ValueError(f"heads {heads} / kv_heads {kv_heads}, int64 tables and lengths needed")
        if not context_lens.is_contiguous() or context_lens.shape != (seqs,):
            raise ValueError(f"context_lens must be contiguous [{seqs}], got {tuple(context_lens.shape)}")
        if out is None:
            out = torch.empty(seqs, heads, dim, dtype=q.dtype)                       # [seqs, heads, dim]
        elif not out.is_contiguous():
            raise ValueError("out must be contiguous")
        self._lib.tpq_paged_decode_attention(
            DTYPE_CODES[q.dtype], DTYPE_CODES[k_cache.dtype], q.data_ptr(), q.stride(0), out.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
            context_lens.data_ptr(), seqs, heads, kv_heads, dim, block_size, dim ** -0.5,
            torch.get_num_threads())
        return out


    GEMV_MAX_TOKENS = 64
    """Up to this many tokens the quantized formats run `int8_gemv` / `q4_gemv`, above it a dense matmul.

    The products read each weight once for any number of rows, but their
    arithmetic (float32 multiply-adds, 8 rows at a time) grows with the rows
    and loses to a dense GEMM for prefill. Where they cross depends on the
    CPU; 64 is not calibrated (at 32 rows they beat dequantize-then-GEMM here).
    """

    def int8_gemv(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``x @ (qweight * scales[:, None]).T`` for x [rows, k], qweight [n, k] int8, scales [n] float32."""
        rows, k = self._gemv_rows(x)
        n = qweight.shape[0]
        if qweight.dtype != torch.int8 or qweight.shape[1] != k or k % 16 or not qweight.is_contiguous():
            raise ValueError(f"int8_gemv: contiguous int8 [n, {k}] weights with k % 16 == 0 needed, "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        if scales.dtype != torch.float32 or scales.shape != (n,):
            raise ValueError(f"int8_gemv: float32 scales [{n}] needed, got {scales.dtype} {tuple(scales.shape)}")
        out = torch.empty(rows, n, dtype=x.dtype)                                   # [rows, n]
        self._lib.tpq_int8_gemv(DTYPE_CODES[x.dtype], x.data_ptr(), rows, k, qweight.data_ptr(),
                                scales.data_ptr(), out.data_ptr(), n, torch.get_num_threads())
        return out

    def q4_gemv(self, x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for x [rows, k] and W in GGUF 4-bit blocks (see `check_q4`)."""
        rows, k = self._gemv_rows(x)
        n = self.check_q4(packed, d, m, k)
        out = torch.empty(rows, n, dtype=x.dtype)                                   # [rows, n]
        self._lib.tpq_q4_gemv(DTYPE_CODES[x.dtype], x.data_ptr(), rows, k, packed.data_ptr(), d.data_ptr(),
                              m.data_ptr(), out.data_ptr(), n, torch.get_num_threads())
        return out

    def q4_dequantize(self, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, start: int,
                      out: torch.Tensor) -> torch.Tensor:
        """Rows ``[start, start + len(out))`` of the 4-bit weight as ``out``'s dtype, into ``out`` [rows, k]."""
        n = self.check_q4(packed, d, m, out.shape[1])
        if not (out.is_contiguous() and self.supports(out.dtype)) or not 0 <= start <= start + out.shape[0] <= n:
            raise ValueError(f"q4_dequantize: rows {start}..{start + out.shape[0]} of {n} into a contiguous "
                             f"float32/bf16 tensor, got {out.dtype} {tuple(out.shape)}")
        self._lib.tpq_q4_dequantize(DTYPE_CODES[out.dtype], packed.data_ptr(), d.data_ptr(), m.data_ptr(),
                                    out.shape[1], start, out.shape[0], out.data_ptr(), torch.get_num_threads())
        return out

    @staticmethod
    def check_q4(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, k: int) -> int:
        """Check a 4-bit weight of ``k`` input features; its output features.

        ``packed`` [n, k / 2] uint8: per 32-weight block 16 bytes, byte i
        holding q[i] in its low and q[i + 16] in its high nibble (GGUF's
        order); ``d``, ``m`` [n, k / 32] float32, each weight ``d * q + m``.
        """
        n = packed.shape[0]
        if packed.dtype != torch.uint8 or packed.shape != (n, k // 2) or k % 32 or not packed.is_contiguous():
            raise ValueError(f"4-bit weights: contiguous uint8 [n, {k // 2}] with k % 32 == 0 needed, "
                             f"got {packed.dtype} {tuple(packed.shape)} for k={k}")
        for name, t in (("d", d), ("m", m)):
            if t.dtype != torch.float32 or t.shape != (n, k // 32) or not t.is_contiguous():
                raise ValueError(f"4-bit weights: {name} must be contiguous float32 [{n}, {k // 32}], "
                                 f"got {t.dtype} {tuple(t.shape)}")
        return n

    def _gemv_rows(self, x: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 2 or not x.is_contiguous() or not self.supports(x.dtype):
            raise ValueError(f"activations: contiguous float32/bf16 [rows, k] needed, got {x.dtype} {tuple(x.shape)}")
        return x.shape[0], x.shape[1]


def load_kernels() -> CpuKernels | None:
    """The fused kernels, or None where they are off or cannot be built here (`cpu_build.load` logs why)."""
    library = cpu_build.load()
    return None if library is None else CpuKernels(library)
