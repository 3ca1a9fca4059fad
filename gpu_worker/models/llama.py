"""A Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) built from tensor-parallel layers.

Per layer, the only communication is the all-reduce inside the two
row-parallel projections (o_proj, down_proj).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.kernels.cpu_ops import CpuKernels
from gpu_worker.models.config import ModelConfig
from gpu_worker.layers.attention import AttentionMetadata, PagedAttention
from gpu_worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from gpu_worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from gpu_worker.layers.norm import RMSNorm
from gpu_worker.layers.rotary import RotaryEmbedding

Project = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""How a layer calls one of its linear layers: ``project(linear, x)``; the compiled decode path swaps it."""


def _call(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(x)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads,
                                          config.num_kv_heads, bias=config.qkv_bias)
        self.num_heads = self.qkv_proj.num_heads_local
        self.num_kv_heads = self.qkv_proj.num_kv_heads_local
        self.head_dim = config.head_dim
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.kernels: CpuKernels | None = None  # set by LlamaForCausalLM.prepare_for_inference

    def project_qkv(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    project: Project = _call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [tokens, heads, dim], k and v [tokens, kv_heads, dim], RoPE applied to q and k."""
        tokens = hidden.shape[0]
        qkv = project(self.qkv_proj, hidden)                           # [tokens, (heads + 2 kv_heads) * dim]
        qk, v = qkv.split([(self.num_heads + self.num_kv_heads) * self.head_dim,
                           self.num_kv_heads * self.head_dim], dim=-1)
        qk = qk.view(tokens, -1, self.head_dim)                         # [tokens, heads + kv_heads, dim]
        if self.kernels is not None:
            self.kernels.rope_(qk, cos, sin)  # in place: qkv is this step's own
        else:
            qk = RotaryEmbedding.apply(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v.reshape(tokens, self.num_kv_heads, self.head_dim)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project_qkv(hidden, cos, sin)
        out = self.attn(q, k, v, kv_cache, meta)                       # [tokens, heads, dim]
        return self.o_proj(out.view(out.shape[0], -1))                # [tokens, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.kernels: CpuKernels | None = None  # set by LlamaForCausalLM.prepare_for_inference

    def forward(self, x: torch.Tensor, project: Project = _call) -> torch.Tensor:
        gate_up = project(self.gate_up_proj, x)                        # [tokens, 2 * intermediate_local]
        if self.kernels is not None:
            return project(self.down_proj, self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)                            # each [tokens, intermediate_local]
        return project(self.down_proj, F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def before_attention(self, hidden, residual, cos, sin, project: Project = _call):
        """The layer up to its attention: residual add + norm, QKV, RoPE; ``(q, k, v, residual)``."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return (*self.self_attn.project_qkv(hidden, cos, sin, project), residual)

    def after_attention(self, attended, residual, project: Project = _call):
        """The rest of the layer: o_proj, residual add + norm, the MLP; ``(hidden, residual)``."""
        hidden = project(self.self_attn.o_proj, attended.view(attended.shape[0], -1))  # [tokens, hidden]
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, project), residual

    def forward(self, hidden, residual, cos, sin, kv_cache, meta):
        q, k, v, residual = self.before_attention(hidden, residual, cos, sin)
        attended = self.self_attn.attn(q, k, v, kv_cache, meta)        # [tokens, heads, dim]
        return self.after_attention(attended, residual)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta, dtype)

    def forward(self, input_ids, positions, kv_caches, meta):
        cos, sin = self.rotary.cos_sin(positions)
        hidden, residual = self.embed_tokens(input_ids), None         # [tokens, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The decoder plus its LM head; maps checkpoint names onto the fused parallel layers."""

    # checkpoint name fragment -> (our fused parameter's fragment, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)       # [tokens, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)                                    # [seqs, vocab] on rank 0

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """Our parameter name and shard id for a checkpoint tensor, or None to skip it."""
        if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        for fragment, (fused, shard_id) in self.packed_modules.items():
            if f".{fragment}." in name:
                return name.replace(f".{fragment}.", f".{fused}."), shard_id
        return name, None

    def prepare_for_inference(self, quantization: str | None = None, kernels: CpuKernels | None = None) -> None:
        """Give every linear layer and the LM head its kernel; ``quantization`` (``"int8"``, ``"q4"``) quantizes them.

        With ``kernels`` (the fused CPU kernels), norms, RoPE, SiLU-and-multiply,
        decode attention and the quantized formats' decode matmuls run as their
        C calls; without, as torch ops.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "prepare_for_inference"):
                module.prepare_for_inference(quantization, kernels)
            elif hasattr(module, "kernels"):
                module.kernels = kernels
