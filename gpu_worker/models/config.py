"""A model's architecture, read from its config.json, and the checks on a tensor-parallel size."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidConfigError, ModelNotFoundError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,    # value: bias on the q/k/v projections
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{model_dir} has no config.json; a model directory needs config.json, "
                                     "*.safetensors and tokenizer.json")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise InvalidConfigError(f"architecture {arch!r} is not supported; tpqueue runs "
                                     f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        rope_scaling = cfg.get("rope_scaling") or {}
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise InvalidConfigError(f"rope scaling {rope_type!r} is not supported yet (only plain RoPE)")
        rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_heads = cfg["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_ARCHITECTURES[arch] or bool(cfg.get("attention_bias", False)),
            eos_token_ids=eos_ids,
        )

    def valid_tp_sizes(self) -> list[int]:
        """Tensor-parallel sizes that split the attention heads evenly (KV heads split or replicate)."""
        return [tp for tp in range(1, self.num_heads + 1)
                if self.num_heads % tp == 0
                and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)]

    def check_tp(self, tp: int) -> None:
        valid = self.valid_tp_sizes()
        if tp not in valid:
            raise InvalidConfigError(
                f"tp={tp} does not split this model's {self.num_heads} query heads and "
                f"{self.num_kv_heads} KV heads evenly; valid tp values: {', '.join(map(str, valid))}")
