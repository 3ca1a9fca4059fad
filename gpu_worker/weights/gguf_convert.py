"""Convert a llama.cpp GGUF checkpoint into a Hugging Face model directory.

The output is what `model_store` hands the engine: config.json,
generation_config.json, float32 safetensors weights and the tokenizer files
(tokenizer.json, tokenizer_config.json, chat_template.jinja). Quantized
tensors are dequantized with `gguf.quants.dequantize`, so a Q4 file becomes
an fp32 checkpoint holding exactly the values llama.cpp would compute with.

Llama and Qwen2 architectures are supported. For `llama`, llama.cpp's
converter permutes the rows of the q and k projections into its rotary
layout; `_reverse_permute` undoes that exactly as transformers' GGUF loader
does (`LlamaTensorProcessor._reverse_permute_weights`). Qwen2 is stored
unpermuted.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors.numpy import save_file

from common.errors import ModelNotFoundError

logger = logging.getLogger("tpqueue.gguf_convert")

# GGUF `general.architecture` -> (HF architectures[0], HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias)")

MAX_SHARD_BYTES = 4 * 1024**3
SINGLE_FILE = "model.safetensors"


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a Hugging Face float32 checkpoint for `gguf_path` into `out_dir`.

    `out_dir` is created if needed; files already there are overwritten. The
    caller makes this atomic (see `model_store`): convert into a temporary
    directory, then rename it into place.

    Raises `ModelNotFoundError` when the file is not a readable GGUF file or
    holds an architecture or tensor this converter does not know.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_reader(gguf_path)
    config = gguf_config(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s (%s, %d layers) to float32 safetensors in %s",
                gguf_path.name, config["model_type"], config["num_hidden_layers"], out_dir)
    _write_weights(_hf_tensors(reader, config), _shard_files(reader), out_dir)
    logger.info("converting the tokenizer of %s (transformers, takes a few seconds)", gguf_path.name)
    tokenizer = _write_tokenizer(gguf_path, out_dir, config["max_position_embeddings"])
    _fill_special_ids(config, tokenizer)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(config, _stop_ids(reader)))
    logger.info("converted %s into %s", gguf_path.name, out_dir)


def gguf_config(reader: GGUFReader) -> dict[str, Any]:
    """Build a Hugging Face config.json dict from a GGUF file's metadata and tensor list."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelNotFoundError(
            f"GGUF architecture {arch!r} is not supported; tpqueue converts {', '.join(sorted(ARCHITECTURES))}")
    hf_arch, model_type = ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    hidden = _arch_field(reader, arch, "embedding_length", required=True)
    heads = _arch_field(reader, arch, "attention.head_count", required=True)
    kv_heads = _arch_field(reader, arch, "attention.head_count_kv") or heads
    if isinstance(kv_heads, list):
        raise ModelNotFoundError("GGUF files with a per-layer KV head count are not supported")
    rope_dim = _arch_field(reader, arch, "rope.dimension_count") if arch == "llama" else None
    head_dim = _arch_field(reader, arch, "attention.key_length") or rope_dim or hidden // heads
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": _arch_field(reader, arch, "feed_forward_length", required=True),
        "num_hidden_layers": _arch_field(reader, arch, "block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _arch_field(reader, arch, "attention.layer_norm_rms_epsilon") or 1e-6,
        "rope_theta": _arch_field(reader, arch, "rope.freq_base") or 10000.0,
        "max_position_embeddings": _arch_field(reader, arch, "context_length") or 2048,
        "vocab_size": _arch_field(reader, arch, "vocab_size") or _embedding_rows(reader),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    rope_scaling = _rope_scaling(reader, arch)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (`blk.3.attn_q.weight`) to its Hugging Face name.

    Raises `ModelNotFoundError` for a tensor with no Llama/Qwen2 counterpart.
    """
    if match := _LAYER_NAME.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"
    elif match := _GLOBAL_NAME.fullmatch(gguf_name):
        part, kind = match.groups()
        if part in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[part]}.{kind}"
    raise ModelNotFoundError(
        f"GGUF tensor {gguf_name!r} has no Llama/Qwen2 counterpart (e.g. Llama 3 rope_freqs or an MoE "
        "expert); tpqueue converts plain Llama and Qwen2 decoders only")


def _open_reader(gguf_path: Path) -> GGUFReader:
    """Open a GGUF file, turning a malformed file into a `ModelNotFoundError`."""
    try:
        return GGUFReader(gguf_path)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelNotFoundError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value as a Python scalar, string or list; `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        value = _f32(value)
    return value


def _arch_field(reader: GGUFReader, arch: str, key: str, required: bool = False) -> Any:
    """An `<arch>.<key>` metadata value; `required` ones raise `ModelNotFoundError` when absent."""
    value = _field(reader, f"{arch}.{key}")
    if value is None and required:
        raise ModelNotFoundError(f"GGUF file lacks the metadata key {arch}.{key}; it cannot be converted")
    return value


def _f32(value: float) -> float:
    """The shortest decimal that round-trips a float32 (1e-05 instead of 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _embedding_rows(reader: GGUFReader) -> int:
    """Vocabulary size from the token embedding's shape (GGUF lists dims innermost first)."""
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])
    raise ModelNotFoundError("GGUF file has no token_embd.weight tensor")


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    """A Hugging Face `rope_scaling` dict from `<arch>.rope.scaling.*`, or None for plain RoPE."""
    kind = _arch_field(reader, arch, "rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _arch_field(reader, arch, "rope.scaling.factor")}
    original = _arch_field(reader, arch, "rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _hf_tensors(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, float32 array in PyTorch layout) for every tensor of the file."""
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # dequantize returns numpy order: GGUF's shape [in, out] becomes [out, in]
        weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        expected = tuple(int(d) for d in reversed(tensor.shape))
        assert weights.shape == expected, f"{tensor.name}: {weights.shape} != {expected}"
        if config["model_type"] == "llama":
            if ".attn_q." in tensor.name:
                weights = _reverse_permute(weights, config["num_attention_heads"])
            elif ".attn_k." in tensor.name:
                weights = _reverse_permute(weights, config["num_key_value_heads"])
        yield name, np.ascontiguousarray(weights)


def _reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k projection (weight or bias).

    llama.cpp stores each head's rows as [pairs, 2] interleaved; Hugging Face
    stores them as [2, pairs] (rotate_half layout).
    """
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])  # [heads, pairs, 2, ...]
    return w.swapaxes(2, 1).reshape(weights.shape)


def _shard_files(reader: GGUFReader) -> list[str]:
    """The file each tensor goes to, in file order: one file unless it would pass `MAX_SHARD_BYTES`."""
    shard, used, shards = 0, 0, []
    for tensor in reader.tensors:
        size = int(tensor.n_elements) * 4
        if used and used + size > MAX_SHARD_BYTES:
            shard, used = shard + 1, 0
        used += size
        shards.append(shard)
    count = shards[-1] + 1 if shards else 1
    if count == 1:
        return [SINGLE_FILE] * len(shards)
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in shards]


def _write_weights(tensors: Iterator[tuple[str, np.ndarray]], files: list[str], out_dir: Path) -> None:
    """Write the tensors file by file (one shard in memory at a time), plus an index when sharded."""
    weight_map: dict[str, str] = {}
    pending: dict[str, np.ndarray] = {}
    current, total = "", 0
    for (name, array), file_name in zip(tensors, files, strict=True):
        if pending and file_name != current:
            save_file(pending, str(out_dir / current), metadata={"format": "pt"})
            pending = {}
        current = file_name
        pending[name] = array
        weight_map[name] = file_name
        total += array.nbytes
    if pending:
        save_file(pending, str(out_dir / current), metadata={"format": "pt"})
    if len(set(files)) > 1:
        _write_json(out_dir / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    logger.info("wrote %d tensors (%.1f MB float32) in %d file(s)", len(weight_map), total / 1e6, len(set(files)))


def _write_tokenizer(gguf_path: Path, out_dir: Path, max_length: int):
    """Rebuild the GGUF's tokenizer with transformers and save it (tokenizer.json, config, chat template)."""
    from transformers import AutoTokenizer  # heavy import, needed only while converting

    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _fill_special_ids(config: dict[str, Any], tokenizer) -> None:
    """Take bos/eos/pad/unk ids from the tokenizer where the GGUF metadata has none; warn on disagreement."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        from_tokenizer = getattr(tokenizer, key, None)
        if config[key] is None:
            config[key] = from_tokenizer
        elif from_tokenizer is not None and from_tokenizer != config[key]:
            logger.warning("GGUF metadata says %s=%s but the tokenizer says %s; keeping the metadata value",
                           key, config[key], from_tokenizer)


def _stop_ids(reader: GGUFReader) -> list[int]:
    """Every id the GGUF marks as ending a turn: eos, then end-of-turn and end-of-message if distinct."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None and value not in ids:
            ids.append(value)
    return ids


def _generation_config(config: dict[str, Any], stop_ids: list[int]) -> dict[str, Any]:
    """generation_config.json: the model's bos/pad ids and every stop id (one int when there is one)."""
    generation = {key: config[key] for key in ("bos_token_id", "pad_token_id") if config[key] is not None}
    stop = stop_ids or ([config["eos_token_id"]] if config["eos_token_id"] is not None else [])
    if stop:
        generation["eos_token_id"] = stop[0] if len(stop) == 1 else stop
    return generation


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
