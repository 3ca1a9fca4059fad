"""A decode step's decoder layers as one C call (``cpu_decode.c``): the CPU's answer to a captured graph.

At batch 1 on a 2-core CPU most of an eager decode step was not arithmetic
but the ~15 torch ops and Python lines per layer, each run cache-cold after
the weights streamed through (10-80 us apiece). `DecodeProgram` hands the C
side, once at start, a table of every layer's weights and cache; a step then
costs the embedding lookup, the RoPE tables, this one call and the LM head.

It covers what the C side implements: one rank (tp=1), a CPU runner in
float32 or bf16 whose linear layers are dense in the model dtype (bf16 on a
CPU where torch keeps the plain weight), int8 or 4-bit, a KV cache in the
model's dtype or fp8, and decode steps of at most `MAX_SEQS` sequences. Anything
else runs the eager path; `DecodeProgram.unsupported` says why.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from gpu_worker.kernels.cpu_ops import DTYPE_CODES, FP8, CpuKernels
from gpu_worker.layers.attention import AttentionMetadata
from gpu_worker.layers.gemm import LinearKernel
from gpu_worker.layers.q4 import Q4LinearKernel
from gpu_worker.layers.quant import Int8LinearKernel

MAX_SEQS = 8
"""The most sequences a program's step takes: at more, the dense bf16 layers lose to torch's GEMM."""
DENSE, INT8, Q4 = 0, 1, 2


class Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("m", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", Linear), ("o", Linear),
                ("gate_up", Linear), ("down", Linear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class Shape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("eps", ctypes.c_float)]


def linear_entry(module: nn.Module, dtype: torch.dtype) -> Linear | str:
    """The C description of one linear layer's kernel, or why it has none."""
    kernel, bias = module.kernel, module.bias
    if bias is not None and bias.dtype != dtype:
        return f"a bias in {bias.dtype}"
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(kernel, Int8LinearKernel) and kernel.kernels is not None:
        n, k = kernel.qweight.shape
        return Linear(INT8, n, k, kernel.qweight.data_ptr(), kernel._scales_fp32.data_ptr(), None, bias_ptr)
    if isinstance(kernel, Q4LinearKernel) and kernel.kernels is not None:
        return Linear(Q4, kernel.out_features, kernel.in_features, kernel.packed.data_ptr(), kernel.d.data_ptr(),
                      kernel.m.data_ptr(), bias_ptr)
    if isinstance(kernel, LinearKernel) and kernel.weight is not None and kernel.weight.dtype == dtype:
        n, k = kernel.weight.shape
        if k % 16 == 0 and kernel.weight.is_contiguous():
            return Linear(DENSE, n, k, kernel.weight.data_ptr(), None, None, bias_ptr)
    return f"{type(kernel).__name__} without weights the C side can read"


class DecodeProgram:
    """Every decoder layer of one decode step in one C call; see the module docstring for what it covers."""

    def __init__(self, model: nn.Module, kv_cache: torch.Tensor, kernels: CpuKernels, block_size: int):
        self._lib, self.model = kernels._lib, model
        self.dtype = model.model.embed_tokens.weight.dtype
        decoder, config = model.model, model.config
        entries = []
        for layer, cache in zip(decoder.layers, kv_cache):                       # cache: [2, blocks, bs, kv, dim]
            a, mlp = layer.self_attn, layer.mlp
            linears = [linear_entry(m, self.dtype) for m in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            entries.append(Layer(layer.input_layernorm.weight.data_ptr(),
                                 layer.post_attention_layernorm.weight.data_ptr(), *linears,
                                 cache[0].data_ptr(), cache[1].data_ptr()))
        self.layers = (Layer * len(entries))(*entries)
        attn = decoder.layers[0].self_attn
        self.shape = Shape(config.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                           entries[0].down.k, block_size, decoder.norm.eps)
        self.kv_cache = kv_cache  # the pointers above stay valid while these are held

    @staticmethod
    def unsupported(model: nn.Module, kv_cache: torch.Tensor, world_size: int) -> str | None:
        """Why this model and cache cannot run as a program, or None when they can."""
        dtype = model.model.embed_tokens.weight.dtype
        if world_size != 1:
            return f"tensor parallelism ({world_size} ranks)"
        if dtype not in (torch.float32, torch.bfloat16) or kv_cache.dtype not in (dtype, FP8):
            return f"a {kv_cache.dtype} KV cache under {dtype} activations"
        layer = model.model.layers[0]
        for name, module in [("qkv_proj", layer.self_attn.qkv_proj), ("o_proj", layer.self_attn.o_proj),
                             ("gate_up_proj", layer.mlp.gate_up_proj), ("down_proj", layer.mlp.down_proj)]:
            entry = linear_entry(module, dtype)
            if isinstance(entry, str):
                return f"{name}: {entry}"
        return None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 matrix_work_only: bool = False) -> torch.Tensor:
        """The final-normed hidden states [seqs, hidden] of a decode step of at most `MAX_SEQS` sequences.

        ``matrix_work_only`` (benchmarks): only the matrix products and
        attention run (the result is not the model's), to time them alone.
        """
        seqs = input_ids.shape[0]
        if seqs > MAX_SEQS or meta.num_decodes != seqs or meta.decode_context_lens is None:
            raise ValueError(f"a decode program runs decode steps of 1..{MAX_SEQS} sequences, got {seqs} tokens "
                             f"with {meta.num_decodes} decodes")
        decoder = self.model.model
        hidden = decoder.embed_tokens(input_ids).contiguous()                     # [seqs, hidden]
        cos, sin = (t.contiguous() for t in decoder.rotary.cos_sin(positions))  # each [seqs, 1, head_dim]
        tables = meta.decode_block_tables                                         # [seqs, blocks], rows strided
        self._lib.tpq_decode_layers(
            DTYPE_CODES[self.dtype], DTYPE_CODES[self.kv_cache.dtype], ctypes.byref(self.shape), self.layers,
            len(self.layers), decoder.norm.weight.data_ptr(), hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            meta.slot_mapping.data_ptr(), tables.data_ptr(), tables.stride(0), meta.decode_context_lens.data_ptr(),
            seqs, torch.get_num_threads(), matrix_work_only)
        return hidden
