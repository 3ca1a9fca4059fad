"""Attention over the paged KV cache.

Each step first writes the new tokens' keys and values into their cache
slots. Decoding sequences (one query each) are then attended together: their
blocks are gathered into a padded [seqs, context, heads, dim] view and
masked by length. Prefilling sequences are attended one by one, straight from
this step's keys when they have no cached prefix, else from the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The cache rows of ``block_tables`` ([..., blocks]) as [..., blocks * block_size, kv_heads, dim].

    ``index_select`` on the flattened table: about 4x faster on CPU than advanced indexing.
    """
    # cache: [num_blocks, block_size, kv_heads, dim]
    rows = cache.index_select(0, block_tables.reshape(-1))
    return rows.view(*block_tables.shape[:-1], -1, *cache.shape[2:])


class PagedAttention(nn.Module):
    """Scaled dot-product attention reading keys and values from this rank's cache blocks."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]
        # kv_cache: [2, blocks, block_size, kv_heads, dim]
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if d := meta.num_decodes:
            keys = gather_blocks(k_cache, meta.decode_block_tables).transpose(1, 2)   # [d, kv_heads, ctx, dim]
            values = gather_blocks(v_cache, meta.decode_block_tables).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                q[:d].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True)  # [d, heads, 1, dim]
            out[:d] = attended.squeeze(2)
        for span in meta.prefills:
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            if span.block_table is None:
                keys, values = k[rows], v[rows]                                       # [n, kv_heads, dim]
            else:
                keys = gather_blocks(k_cache, span.block_table)[:span.context_len]    # [ctx, kv_heads, dim]
                values = gather_blocks(v_cache, span.block_table)[:span.context_len]
            attended = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0), attn_mask=span.mask,
                is_causal=span.mask is None, enable_gqa=True)                        # [1, heads, n, dim]
            out[rows] = attended[0].transpose(0, 1)
        return out
