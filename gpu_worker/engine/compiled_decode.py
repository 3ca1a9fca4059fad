"""Decode steps through one torch.compile'd forward per padded batch size (tp=1, CPU or CUDA).

The whole decode forward is traced once per batch size; inductor fuses the
small ops around each layer's GEMMs (residual add + RMSNorm, RoPE, splits,
SiLU * up) into C++ loops. Two things stay opaque calls in the graph:
oneDNN's packed linear (`packed_linear`; inductor lowers the mkldnn op only
for frozen weights) and each layer's paged attention (`paged_attention`),
which reads the step's KV cache and metadata from `_Step` rather than from
graph inputs, so one graph serves every context length (as vLLM's attention
op reads its forward context).

A step of ``n`` decodes is padded up to the next of ``sizes``: the padded
rows are one-token sequences in a scratch block of the KV cache (the block
past the block manager's last), and their logits are dropped. Each size is
compiled and warmed once at start (:meth:`CompiledDecode.warm`); a larger
step, a prefill or a mixed step runs eagerly. Tensor parallel (tp > 1) and
quantized weights run eagerly too: the row-parallel all-reduce is not traced,
and the int8/int4 kernels are untested here. Inductor's C++ kernels run on one
thread (``cpp.threads``): they are small, and an OpenMP barrier per kernel on
a busy two-core host can cost more than it saves.

Off by default (``EngineConfig.enforce_eager=True``): on the 2-core AVX-512
VM it was 1.03-1.05x eager's step time at batch 1-8 in fp32 (1.14x at bf16
batch 1; ``bench/compile_decode.py``, a busy machine) for about 23 s of
compiling per batch size, because most of what remains per step is the
small ops inside paged attention, which stays eager. The layers' own
``before_attention`` / ``after_attention`` are traced, with ``_project`` in
place of their linear calls, so eager and compiled run the same layer code.
"""
from __future__ import annotations

import bisect
import time

import numpy as np
import torch

from gpu_worker.layers import gemm

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@torch.library.custom_op("tpqueue::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's packed float32 linear as one opaque op (inductor lowers the mkldnn op only for frozen weights)."""
    bias = None if bias is None else bias.float()
    return torch.ops.mkldnn._linear_pointwise(x.float(), packed, bias, "none", [], "").to(x.dtype)


@packed_linear.register_fake
def _(x, packed, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _project(linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` at tp=1, its packed oneDNN GEMM (if it runs one for ``x``) as `packed_linear`."""
    kernel = linear.kernel
    if isinstance(kernel, gemm.LinearKernel) and kernel.packed is not None and x.shape[0] >= kernel.min_tokens_packed:
        return packed_linear(x, kernel.packed, linear.bias)
    return linear(x)


class _Step:
    """What the opaque attention op reads: the step running now (set around each compiled call)."""

    kv_cache: torch.Tensor | None = None   # [layers, 2, blocks, block_size, kv_heads, head_dim]
    meta = None                            # the step's AttentionMetadata
    attention: list = []                   # each layer's PagedAttention


@torch.library.custom_op("tpqueue::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s `PagedAttention` on the current step, opaque to the compiler.

    It writes k and v into the KV cache, which the compiled graph never sees:
    the step's cache and metadata (whose shapes change with the context
    length) stay out of the graph, so one graph serves every context length.
    """
    return _Step.attention[layer](q, k, v, _Step.kv_cache[layer], _Step.meta)


@paged_attention.register_fake
def _(q, k, v, layer):
    return torch.empty_like(q)


def _decode_forward(model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``model``'s forward for a decode-only step, attention through `paged_attention`; [tokens, hidden]."""
    inner = model.model
    cos, sin = inner.rotary.cos_sin(positions)                       # each [tokens, 1, head_dim]
    hidden, residual = inner.embed_tokens(input_ids), None          # [tokens, hidden]
    for i, layer in enumerate(inner.layers):
        q, k, v, residual = layer.before_attention(hidden, residual, cos, sin, _project)
        attended = paged_attention(q.contiguous(), k.contiguous(), v.contiguous(), i)  # [tokens, heads, dim]
        hidden, residual = layer.after_attention(attended, residual, _project)
    hidden, _ = inner.norm(hidden, residual)
    return hidden


class CompiledDecode:
    """The decode forward of ``model`` (a `LlamaForCausalLM`) for batches padded to ``sizes``."""

    def __init__(self, model, sizes: tuple[int, ...]):
        self.model = model
        self.sizes = tuple(sorted(sizes))
        self.compile_s: float | None = None    # time warm() took, compilation included
        self._forward = torch.compile(_decode_forward, dynamic=False, options={"cpp.threads": 1})
        self._attention = [layer.self_attn.attn for layer in model.model.layers]

    @torch.inference_mode()
    def warm(self, decode_step) -> float:
        """Compile each size, running ``decode_step(None, 0, size, 1)`` (a step of padding only); the seconds taken."""
        start = time.perf_counter()
        for size in self.sizes:
            decode_step(None, 0, size, 1)
        self.compile_s = time.perf_counter() - start
        return self.compile_s

    def padded_size(self, num_decodes: int) -> int | None:
        """The compiled batch size a step of ``num_decodes`` decodes runs at; None: above the largest (eager)."""
        at = bisect.bisect_left(self.sizes, num_decodes)
        return self.sizes[at] if at < len(self.sizes) else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta) -> torch.Tensor:
        """Same result as ``model(input_ids, positions, kv_caches, meta)`` for a decode-only step."""
        _Step.kv_cache, _Step.meta, _Step.attention = kv_caches, meta, self._attention
        try:
            return self._forward(self.model, input_ids, positions)
        finally:
            _Step.kv_cache = _Step.meta = None


def pad_decode_payload(host: np.ndarray, num_seqs: int, max_blocks: int, padded: int,
                       scratch_block: int) -> np.ndarray:
    """A decode plan's payload with ``padded - num_seqs`` one-token sequences in ``scratch_block`` appended.

    The payload is ``[input ids | query lens | context lens | logit counts |
    block tables]`` (see `gpu_worker.engine.plan`), each per sequence.
    """
    s, extra = num_seqs, padded - num_seqs
    parts = host[:4 * s].reshape(4, s)                               # ids, q lens, ctx lens, logit counts
    pad = np.array([[0], [1], [1], [1]], dtype=host.dtype).repeat(extra, axis=1)
    tables = np.concatenate([host[4 * s:].reshape(s, max_blocks),
                             np.full((extra, max_blocks), scratch_block, dtype=host.dtype)])
    return np.concatenate([np.concatenate([parts, pad], axis=1).reshape(-1), tables.reshape(-1)])
