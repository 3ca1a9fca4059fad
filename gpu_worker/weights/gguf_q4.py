"""A GGUF file's quantized tensors as their raw blocks, under Hugging Face names and row order.

`read_blocks` is the counterpart of `gguf_convert` for ``quantization="q4"``:
instead of dequantizing, it keeps each Q4_0, Q4_1 and Q8_0 tensor as the
bytes llama.cpp runs, one row of blocks per output feature. Tensors in any
other type (F32 norms, F16, K-quants) are listed in `GGUFBlocks.other_types`
so the caller takes those from the dequantized checkpoint instead.

A block holds 32 consecutive input features of one row:

- Q4_0 (18 bytes): float16 ``d``, then 16 bytes of 4-bit ``q``; ``w = d * (q - 8)``
- Q4_1 (20 bytes): float16 ``d``, float16 ``m``, 16 bytes of ``q``; ``w = d * q + m``
- Q8_0 (34 bytes): float16 ``d``, 32 int8 ``q``; ``w = d * q``

In a 4-bit block, byte ``j`` holds feature ``j`` in its low nibble and
feature ``j + 16`` in its high nibble. Blocks run along a row, so llama's
q/k row permutation (undone as `gguf_convert` does) moves whole rows of
blocks and the values stay exactly those `gguf_convert` writes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from gpu_worker.weights.gguf_convert import _open_reader, _reverse_permute, gguf_config, hf_tensor_name

logger = logging.getLogger("tpqueue.gguf_q4")

Q4_0 = GGMLQuantizationType.Q4_0
Q4_1 = GGMLQuantizationType.Q4_1
Q8_0 = GGMLQuantizationType.Q8_0
BLOCK_SIZE = 32
"""Input features per block in every type read here."""
Q4_TYPES = (Q4_0, Q4_1)
BLOCK_TYPES = (Q4_0, Q4_1, Q8_0)
"""The types `read_blocks` keeps as blocks by default."""


@dataclass(frozen=True)
class QuantizedTensor:
    """One weight [out, in] as raw GGUF blocks: ``blocks`` uint8 [out, in / 32, bytes per block]."""

    name: str
    qtype: GGMLQuantizationType
    blocks: np.ndarray

    def __post_init__(self) -> None:
        assert self.qtype in BLOCK_TYPES, f"{self.name}: {self.qtype.name} is not a 32-wide block type"
        assert self.blocks.dtype == np.uint8 and self.blocks.ndim == 3, self.blocks.shape
        assert self.blocks.shape[2] == GGML_QUANT_SIZES[self.qtype][1], (self.qtype.name, self.blocks.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in], PyTorch's linear layout."""
        return self.blocks.shape[0], self.blocks.shape[1] * BLOCK_SIZE

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        """Rows (dim 0) or columns (dim 1) [start, start + length), zero-padded past the end.

        Mirrors `gpu_worker.layers.sharding.copy_shard`: a padded, uneven split
        reads zero blocks, which dequantize to zero in every type. Columns go in
        whole blocks, so on dim 1 `start` and `length` are multiples of 32.
        """
        assert dim in (0, 1) and start >= 0 and length >= 0, (dim, start, length)
        if dim == 1:
            assert start % BLOCK_SIZE == 0 and length % BLOCK_SIZE == 0, \
                f"{self.name}: columns [{start}, {start + length}) do not fall on {BLOCK_SIZE}-wide blocks"
            start, length = start // BLOCK_SIZE, length // BLOCK_SIZE
        shape = list(self.blocks.shape)
        shape[dim] = length
        out = np.zeros(shape, dtype=np.uint8)                  # [rows, blocks, bytes]
        stop = min(start + length, self.blocks.shape[dim])
        if stop > start:
            index = (slice(None),) * dim + (slice(start, stop),)
            out[(slice(None),) * dim + (slice(0, stop - start),)] = self.blocks[index]
        return QuantizedTensor(self.name, self.qtype, out)

    def dequantize(self) -> np.ndarray:
        """The weight as float32 [out, in]: exactly what `gguf_convert` writes for it."""
        out, n_blocks, n_bytes = self.blocks.shape
        flat = np.ascontiguousarray(self.blocks).reshape(out, n_blocks * n_bytes)
        return dequantize(flat, self.qtype).astype(np.float32, copy=False)


@dataclass(frozen=True)
class GGUFBlocks:
    """What `read_blocks` found: the block tensors, and every other tensor's type for the fallback."""

    tensors: dict[str, QuantizedTensor]
    other_types: dict[str, GGMLQuantizationType]  # Hugging Face name -> its GGUF type (F32, F16, Q6_K, ...)

    def summary(self) -> str:
        """One line counting the tensors per type, e.g. ``"210 Q4_1, 1 Q8_0 as blocks; 61 F32 not"``."""
        def count(types) -> str:
            names = [t.name for t in types]
            return ", ".join(f"{names.count(n)} {n}" for n in sorted(set(names))) or "none"
        return (f"{count(t.qtype for t in self.tensors.values())} as blocks; "
                f"{count(self.other_types.values())} not")


def read_blocks(gguf_path: Path, types: Sequence[GGMLQuantizationType] = BLOCK_TYPES) -> GGUFBlocks:
    """Read every 2-D tensor of `gguf_path` in one of `types` as blocks, under its Hugging Face name.

    The blocks are views of the memory-mapped file, except llama's q and k
    projections, whose rows are put back in Hugging Face order (a copy). 1-D
    tensors and tensors in other types go to `GGUFBlocks.other_types`.
    Raises `ModelNotFoundError` as `gguf_convert` does for a file it cannot read.
    """
    assert set(types) <= set(BLOCK_TYPES), f"only {[t.name for t in BLOCK_TYPES]} are 32-wide block types"
    reader = _open_reader(Path(gguf_path))
    config = gguf_config(reader)
    tensors: dict[str, QuantizedTensor] = {}
    other: dict[str, GGMLQuantizationType] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if tensor.tensor_type not in types or len(tensor.shape) != 2:
            other[name] = tensor.tensor_type
            continue
        out, features = int(tensor.shape[1]), int(tensor.shape[0])   # GGUF lists dims innermost first
        blocks = tensor.data.reshape(out, features // BLOCK_SIZE, -1)  # [out, in / 32, bytes]
        if config["model_type"] == "llama" and ".attn_q." in tensor.name:
            blocks = _reverse_permute(blocks, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".attn_k." in tensor.name:
            blocks = _reverse_permute(blocks, config["num_key_value_heads"])
        tensors[name] = QuantizedTensor(name, tensor.tensor_type, blocks)
    result = GGUFBlocks(tensors, other)
    logger.info("read %s: %s", Path(gguf_path).name, result.summary())
    return result


def q4_fields(tensor: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Q4_0/Q4_1 tensor's parts: ``(q, d, m)``, with ``m`` None for Q4_0.

    ``q`` uint8 [out, in] in 0..15; ``d`` and ``m`` float16 [out, in / 32], as stored.
    """
    assert tensor.qtype in Q4_TYPES, f"{tensor.name} is {tensor.qtype.name}, not Q4_0/Q4_1"
    blocks = tensor.blocks                                       # [out, blocks, 18 or 20]
    d = _float16(blocks[..., 0:2])                               # [out, blocks]
    m = _float16(blocks[..., 2:4]) if tensor.qtype == Q4_1 else None
    packed = blocks[..., 4:] if tensor.qtype == Q4_1 else blocks[..., 2:]  # [out, blocks, 16]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)   # [out, blocks, 32]
    return q.reshape(tensor.shape), d, m


def q8_0_fields(tensor: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's parts ``(q, d)``: ``q`` int8 [out, in], ``d`` float16 [out, in / 32]; ``w = d * q``."""
    assert tensor.qtype == Q8_0, f"{tensor.name} is {tensor.qtype.name}, not Q8_0"
    d = _float16(tensor.blocks[..., 0:2])                        # [out, blocks]
    q = np.ascontiguousarray(tensor.blocks[..., 2:]).view(np.int8)  # [out, blocks, 32]
    return q.reshape(tensor.shape), d


def _float16(two_bytes: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 little-endian halves -> [...] float16."""
    return np.ascontiguousarray(two_bytes).view(np.float16)[..., 0]
