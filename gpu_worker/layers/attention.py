"""Attention over the paged KV cache.

Each step first writes the new tokens' keys and values into their cache
slots. Decoding sequences (one query each) are then attended together. On the
CPU with the fused kernels (`gpu_worker.kernels.cpu_ops`), one C call reads
each sequence's blocks where they lie, in float32. Otherwise their blocks
are gathered into a padded [seqs, context, heads, dim] view and masked by
length, in the model dtype or upcast to float32, whichever the engine's
start-up calibration found faster on this CPU for a batch that size
(`gpu_worker.engine.calibration`), in memory reused across layers and steps
(`DecodeScratch`). Prefilling sequences are attended one by one, straight
from this step's keys when they have no cached prefix, else from the cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.kernels.cpu_ops import CpuKernels


@dataclass
class PrefillSpan:
    """One prefilling sequence: its tokens ``[token_start, token_start + num_tokens)`` of the step."""

    token_start: int
    num_tokens: int
    context_len: int                       # keys to attend to, cached prefix included
    block_table: torch.Tensor | None       # [blocks]; None when nothing was cached before this step
    mask: torch.Tensor | None              # [num_tokens, context_len] bool; None means plain causal


@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the cache and what each one attends to; shared by all layers."""

    slot_mapping: torch.Tensor             # [tokens] flat cache slot of each new token
    num_decodes: int                       # the first num_decodes tokens are one-token decodes
    decode_block_tables: torch.Tensor      # [num_decodes, max_blocks]
    decode_mask: torch.Tensor              # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillSpan]
    decode_upcast: bool = False            # decode attention in float32 (the calibrated choice for this batch)
    decode_scratch: DecodeScratch | None = None  # reused memory for the gathered keys and values; None: fresh
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int64 (the fused kernel's lengths)
    decode_fused: bool = False             # decode attention as the fused kernel (calibrated, or the default)


class DecodeScratch:
    """Memory reused, step after step and layer after layer, for decode attention's gathered keys and values.

    A fresh tensor that large comes from ``mmap`` on every call and page-faults
    in: at batch 32, context 256, that cost more than the float32 kernel saves
    over bf16's. Layers run one after another, so one scratch serves them all.
    Grown (doubled) when a step needs more, never shrunk.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def take(self, slot: int, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape`` view of the ``dtype`` buffer; slots 0 and 1 (keys, values) never overlap."""
        numel = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < 2 * numel:
            size = max(2 * numel, 2 * flat.numel()) if flat is not None else 2 * numel
            flat = self._flat[dtype] = torch.empty(size, dtype=dtype, device=self.device)
        return flat[slot * numel:(slot + 1) * numel].view(shape)


FP8 = torch.float8_e4m3fn
"""The compressed KV cache's storage (``kv_cache_dtype="fp8"``): e4m3, scale 1, saturating at +-448."""


def write_cache(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Store ``x`` [tokens, kv_heads, dim] at flat ``slots`` [tokens] of ``cache`` [blocks, block_size, kv_heads, dim].

    An fp8 cache stores ``x`` rounded to e4m3 (torch's cast saturates at +-448),
    written through a byte view: CPU ``index_copy_`` has no float8 kernel.
    """
    flat = cache.view(-1, *cache.shape[2:])                              # [slots, kv_heads, dim]
    if cache.dtype == FP8:
        flat.view(torch.uint8).index_copy_(0, slots, x.to(FP8).view(torch.uint8))
    else:
        flat.index_copy_(0, slots, x)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, scratch: DecodeScratch | None = None,
                  slot: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The cache rows of ``block_tables`` ([..., blocks]) as [..., blocks * block_size, kv_heads, dim].

    ``index_select`` on the flattened table: about 4x faster on CPU than advanced
    indexing. With ``scratch``, written into its ``slot`` instead of a fresh tensor.
    An fp8 cache's rows come out converted to ``dtype`` (the model's).
    """
    # cache: [num_blocks, block_size, kv_heads, dim]
    index = block_tables.reshape(-1)                                     # [tables * blocks]
    if scratch is None:
        rows = cache.index_select(0, index)                              # [tables * blocks, block_size, kv, dim]
    else:
        rows = torch.index_select(cache, 0, index, out=scratch.take(slot, (index.numel(), *cache.shape[1:]),
                                                                    cache.dtype))
    if cache.dtype == FP8 and dtype is not None:
        rows = rows.to(dtype)
    return rows.view(*block_tables.shape[:-1], -1, *cache.shape[2:])


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     upcast: bool, scratch: DecodeScratch | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its gathered keys, in float32 when ``upcast``; in q's dtype out.

    With ``scratch``, the float32 copies of keys and values go into its memory.
    """
    # q: [d, heads, 1, dim]; keys, values: [d, ctx, kv_heads, dim] as gathered; mask: [d, 1, 1, ctx] bool
    out_dtype = q.dtype
    if upcast and out_dtype != torch.float32:
        q = q.float()
        if scratch is None:
            keys, values = keys.float(), values.float()
        else:
            keys = scratch.take(0, keys.shape, torch.float32).copy_(keys)   # [d, ctx, kv_heads, dim]
            values = scratch.take(1, values.shape, torch.float32).copy_(values)
    attended = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                                              enable_gqa=True)                   # [d, heads, 1, dim]
    return attended.to(out_dtype)


class PagedAttention(nn.Module):
    """Scaled dot-product attention reading keys and values from this rank's cache blocks."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kernels: CpuKernels | None = None  # set by LlamaForCausalLM.prepare_for_inference

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]
        # kv_cache: [2, blocks, block_size, kv_heads, dim]
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        write_cache(k_cache, meta.slot_mapping, k)
        write_cache(v_cache, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if (d := meta.num_decodes) and self.kernels is not None and meta.decode_fused:
            self.kernels.paged_decode_attention(q[:d], k_cache, v_cache, meta.decode_block_tables,
                                                meta.decode_context_lens, out[:d])
        elif d:
            scratch = meta.decode_scratch
            keys = gather_blocks(k_cache, meta.decode_block_tables, scratch, 0, q.dtype)  # [d, ctx, kv_heads, dim]
            values = gather_blocks(v_cache, meta.decode_block_tables, scratch, 1, q.dtype)
            attended = decode_attention(q[:d].unsqueeze(2), keys, values, meta.decode_mask,
                                        meta.decode_upcast, scratch)                    # [d, heads, 1, dim]
            out[:d] = attended.squeeze(2)
        for span in meta.prefills:
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            if span.block_table is None:
                keys, values = k[rows], v[rows]                                       # [n, kv_heads, dim]
            else:
                keys = gather_blocks(k_cache, span.block_table, dtype=q.dtype)[:span.context_len]  # [ctx, kv, dim]
                values = gather_blocks(v_cache, span.block_table, dtype=q.dtype)[:span.context_len]
            attended = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0), attn_mask=span.mask,
                is_causal=span.mask is None, enable_gqa=True)                        # [1, heads, n, dim]
            out[rows] = attended[0].transpose(0, 1)
        return out
