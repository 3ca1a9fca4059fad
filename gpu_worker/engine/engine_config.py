"""Settings of one engine (one worker group), validated when the engine is built."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "smollm2-135m-instruct"


class EngineConfig(BaseModel):
    """How to build and run an engine. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="registered model name, model directory, or .gguf file")
    tp: int = Field(1, ge=1, le=64, description="tensor-parallel ranks")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["int8", "q4"] | None = Field(
        None, description="weight format of the linear layers and the LM head: None (the dtype's), 'int8' "
        "(per-output-channel int8 weights) or 'q4' (a GGUF file's own Q4_0/Q4_1 blocks, LM head int8); "
        "activations in the dtype")
    device: Literal["cpu", "cuda"] | None = Field(None, description="default: cuda when available")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    max_num_seqs: int = Field(64, ge=1, description="running sequences at most")
    max_num_batched_tokens: int = Field(1024, ge=16, description="tokens computed per step at most")
    max_model_len: int | None = Field(None, ge=2, description="context length; default: the model's")
    kv_cache_gb: float = Field(1.0, gt=0, description="KV-cache memory per rank")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="KV-cache storage: 'auto' (the dtype) or 'fp8' (e4m3, scale 1; computed in the dtype): "
        "the same kv_cache_gb holds 2x bf16's tokens, 4x fp32's")
    num_kv_blocks: int | None = Field(None, ge=1, description="exact KV-cache size; overrides kv_cache_gb")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(True, description="run every step eagerly; False: decode steps of up to 64 "
                                "sequences (tp=1, unquantized) run torch.compile'd, compiled at start for padded "
                                "batch sizes (gpu_worker/engine/compiled_decode.py)")
    start_timeout_s: float = Field(120.0, gt=0)
    collective_timeout_s: float = Field(60.0, gt=0, description="ranks 1.. give up on a plan or collective that "
                                        "waits this long (rank 0 died or hung); an idle rank 0 sends keepalives")
