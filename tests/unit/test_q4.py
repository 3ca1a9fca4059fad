"""gguf_q4 and Q4LinearKernel: a GGUF file's raw blocks under Hugging Face names, and the int4 kernel on them.

A tiny llama GGUF written here holds Q4_0, Q4_1 and Q8_0 tensors (read as
blocks) and Q5_0, F16 and F32 ones (reported for the fallback). The kernel
is checked twice: tightly against the formula it is built on, ``(q - 8) *
scale + zero`` with bf16 scale and zero, and against llama.cpp's own
dequantized weights (``gguf.quants.dequantize``) within bf16 tolerance.
The same checks run on SmolLM2's real file when ``tpq model fetch`` has
kept it in the cache (``slow``).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize
from safetensors import safe_open

from gpu_worker.kernels.cpu_ops import load_kernels
from gpu_worker.layers.q4 import Q4LinearKernel, kernel_available, scale_and_zero
from gpu_worker.weights import gguf_convert
from gpu_worker.weights.gguf_q4 import Q4_0, Q4_1, Q8_0, QuantizedTensor, q4_fields, q8_0_fields, read_blocks
from gpu_worker.weights.model_store import DEFAULT_MODEL, cache_root, gguf_file

Q5_0, F16, F32 = GGMLQuantizationType.Q5_0, GGMLQuantizationType.F16, GGMLQuantizationType.F32
HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 64, 4, 2, 96, 72
TINY_TYPES = {  # GGUF name -> (type, [out, in])
    "token_embd.weight": (Q8_0, (VOCAB, HIDDEN)),
    "blk.0.attn_norm.weight": (F32, (HIDDEN,)),
    "blk.0.attn_q.weight": (Q4_0, (HIDDEN, HIDDEN)),
    "blk.0.attn_k.weight": (Q4_1, (KV_HEADS * 16, HIDDEN)),
    "blk.0.attn_v.weight": (Q5_0, (KV_HEADS * 16, HIDDEN)),
    "blk.0.attn_output.weight": (F16, (HIDDEN, HIDDEN)),
    "blk.0.ffn_norm.weight": (F32, (HIDDEN,)),
    "blk.0.ffn_gate.weight": (Q4_1, (INTERMEDIATE, HIDDEN)),
    "blk.0.ffn_up.weight": (Q4_0, (INTERMEDIATE, HIDDEN)),
    "blk.0.ffn_down.weight": (Q4_1, (HIDDEN, INTERMEDIATE)),
    "output_norm.weight": (F32, (HIDDEN,)),
    "output.weight": (Q4_1, (VOCAB, HIDDEN)),
}
BF16_STEP = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by at most this, relatively
needs_int4_kernel = pytest.mark.skipif(not kernel_available(), reason="this torch has no CPU int4 kernel")


def write_tiny_gguf(path: Path) -> None:
    """A one-layer llama GGUF whose tensors are in `TINY_TYPES`' types (q/k stored llama.cpp-permuted)."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(VOCAB)
    for name, (qtype, shape) in TINY_TYPES.items():
        weights = (rng.standard_normal(shape, dtype=np.float32) * 0.1 + 0.02).astype(np.float32)
        if qtype == F32:
            writer.add_tensor(name, weights)
        elif qtype == F16:
            writer.add_tensor(name, weights.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(weights, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q4") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def converted(tiny: Path) -> dict[str, np.ndarray]:
    """gguf_convert's float32 tensors for the tiny file, by Hugging Face name."""
    reader = GGUFReader(tiny)
    return dict(gguf_convert._hf_tensors(reader, gguf_convert.gguf_config(reader)))


def kernel_weight(tensor: QuantizedTensor) -> np.ndarray:
    """The weight [out, in] float64 the kernel computes with: (q - 8) * bf16(scale) + bf16(zero)."""
    q, scale, zero = scale_and_zero(tensor)
    def bf16(a: np.ndarray) -> np.ndarray:
        return torch.from_numpy(a).bfloat16().double().numpy().repeat(32, axis=1)  # [out, in]
    return (q.astype(np.float64) - 8) * bf16(scale) + bf16(zero)


def check_kernel(kernel: Q4LinearKernel, tensor: QuantizedTensor, tokens: int = 5, seed: int = 0) -> float:
    """Assert kernel(x) matches its own formula tightly and llama.cpp's weights within bf16 tolerance.

    Returns the largest error against llama.cpp's weights relative to the outputs' largest magnitude.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, tensor.shape[1], generator=gen).bfloat16()        # [tokens, in]
    x64 = x.double().numpy()
    y = kernel(x, None).double().numpy()                                      # [tokens, out]
    w_kernel, w_gguf = kernel_weight(tensor), tensor.dequantize().astype(np.float64)
    y_kernel, y_gguf = x64 @ w_kernel.T, x64 @ w_gguf.T                       # [tokens, out]
    accumulation = 1e-5 * (np.abs(x64) @ np.abs(w_kernel).T)                  # fp32 sums in another order
    np.testing.assert_array_less(np.abs(y - y_kernel), BF16_STEP * np.abs(y_kernel) + accumulation + 1e-30)
    _, scale, zero = scale_and_zero(tensor)
    metadata_rounding = BF16_STEP * (8 * np.abs(scale) + np.abs(zero)).repeat(32, axis=1)  # [out, in]
    assert np.all(np.abs(w_kernel - w_gguf) <= metadata_rounding + 1e-30)
    bound = BF16_STEP * np.abs(y_gguf) + np.abs(x64) @ metadata_rounding.T + accumulation
    np.testing.assert_array_less(np.abs(y - y_gguf), bound + 1e-30)
    return float(np.abs(y - y_gguf).max() / max(np.abs(y_gguf).max(), 1e-30))


# --- the raw-block reader ----------------------------------------------------------------------------


def test_blocks_have_gguf_converts_names_shapes_and_values(tiny: Path, converted) -> None:
    blocks = read_blocks(tiny)
    assert sorted([*blocks.tensors, *blocks.other_types]) == sorted(converted)
    for name, tensor in blocks.tensors.items():
        assert tensor.shape == converted[name].shape, name
        np.testing.assert_array_equal(tensor.dequantize(), converted[name], err_msg=name)  # q/k rows permuted back


def test_other_types_are_reported(tiny: Path) -> None:
    blocks = read_blocks(tiny)
    by_type = {gguf_convert.hf_tensor_name(n): t for n, (t, _) in TINY_TYPES.items()}
    assert {n: t for n, t in by_type.items() if t in (Q4_0, Q4_1, Q8_0)} == \
        {n: t.qtype for n, t in blocks.tensors.items()}
    assert blocks.other_types == {n: t for n, t in by_type.items() if t not in (Q4_0, Q4_1, Q8_0)}
    assert blocks.other_types["model.layers.0.self_attn.v_proj.weight"] == Q5_0
    assert blocks.summary() == "2 Q4_0, 4 Q4_1, 1 Q8_0 as blocks; 1 F16, 3 F32, 1 Q5_0 not"
    only_q4 = read_blocks(tiny, types=(Q4_0, Q4_1))
    assert only_q4.other_types["model.embed_tokens.weight"] == Q8_0


def test_fields_rebuild_the_dequantized_weights_exactly(tiny: Path) -> None:
    for tensor in read_blocks(tiny).tensors.values():
        if tensor.qtype == Q8_0:
            q, d = q8_0_fields(tensor)
            w = d.astype(np.float32).repeat(32, axis=1) * q.astype(np.float32)
        else:
            q, d, m = q4_fields(tensor)
            assert q.dtype == np.uint8 and q.max() <= 15 and (m is None) == (tensor.qtype == Q4_0)
            d32 = d.astype(np.float32).repeat(32, axis=1)
            w = d32 * (q.astype(np.float32) - 8) if m is None else d32 * q + m.astype(np.float32).repeat(32, axis=1)
        np.testing.assert_array_equal(w, tensor.dequantize(), err_msg=tensor.name)


def test_narrow_slices_rows_and_whole_blocks_of_columns(tiny: Path) -> None:
    tensor = read_blocks(tiny).tensors["model.layers.0.mlp.down_proj.weight"]   # [64, 96]
    full = tensor.dequantize()
    np.testing.assert_array_equal(tensor.narrow(0, 16, 24).dequantize(), full[16:40])
    np.testing.assert_array_equal(tensor.narrow(1, 32, 64).dequantize(), full[:, 32:96])
    padded = tensor.narrow(0, 48, 32).dequantize()                              # rows 64..79 do not exist
    np.testing.assert_array_equal(padded, np.concatenate([full[48:], np.zeros((16, 96), np.float32)]))
    np.testing.assert_array_equal(tensor.narrow(1, 64, 64).dequantize()[:, 32:], np.zeros((64, 32)))
    with pytest.raises(AssertionError, match="do not fall on 32-wide blocks"):
        tensor.narrow(1, 16, 32)


# --- the kernel ----------------------------------------------------------------------------------------


@needs_int4_kernel
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                  "model.layers.0.mlp.down_proj.weight", "lm_head.weight"])
@pytest.mark.parametrize("tokens", [1, 3, 4, 37])
def test_kernel_matches_the_gguf_weights(tiny: Path, name: str, tokens: int) -> None:
    tensor = read_blocks(tiny).tensors[name]
    assert check_kernel(Q4LinearKernel(tensor), tensor, tokens) < 2 * BF16_STEP


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                                  "lm_head.weight"])
@pytest.mark.parametrize("tokens", [1, 5, 37])  # up to 8: q4_gemv on the blocks; 37: dequantized, dense
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernels_compute_with_the_files_own_weights(tiny: Path, name: str, tokens: int,
                                                               dtype: torch.dtype) -> None:
    """On the fused CPU kernels the weights are d * q + m with d and m exact from the file's float16."""
    kernels = load_kernels()
    assert kernels is not None, "the fused CPU kernels did not build here"
    tensor = read_blocks(tiny).tensors[name]
    kernel = Q4LinearKernel(tensor, kernels)
    x = torch.randn(tokens, tensor.shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
    y = kernel(x, None).double()                                              # [tokens, out]
    expected = x.double() @ torch.from_numpy(tensor.dequantize().astype(np.float64)).T
    rounding = BF16_STEP if dtype == torch.bfloat16 else 1e-6                 # the output's own rounding
    magnitude = x.double().abs() @ torch.from_numpy(np.abs(tensor.dequantize()).astype(np.float64)).T
    accumulation = 1e-5 * magnitude
    if tokens > 8 and dtype == torch.bfloat16:  # the dense path multiplies weights rounded to bf16
        accumulation += BF16_STEP * magnitude
    assert bool(((y - expected).abs() <= rounding * expected.abs() + accumulation + 1e-30).all())
    assert kernel.nbytes == kernel.packed.nbytes + kernel.d.nbytes + kernel.m.nbytes


@needs_int4_kernel
@pytest.mark.parametrize("world_size", [2, 3])
def test_column_parallel_slices(tiny: Path, world_size: int) -> None:
    tensor = read_blocks(tiny).tensors["model.layers.0.mlp.gate_proj.weight"]   # [96, 64]
    size = -(-96 // world_size)
    for rank in range(world_size):
        part = tensor.narrow(0, rank * size, size)
        check_kernel(Q4LinearKernel(part), part, seed=rank)


@needs_int4_kernel
def test_row_parallel_slices(tiny: Path) -> None:
    tensor = read_blocks(tiny).tensors["model.layers.0.mlp.down_proj.weight"]   # [64, 96]: 3 blocks per row
    x = torch.randn(4, 96).bfloat16()
    partial = []
    for rank in range(3):
        part = tensor.narrow(1, rank * 32, 32)
        check_kernel(Q4LinearKernel(part), part, seed=rank)
        partial.append(Q4LinearKernel(part)(x[:, rank * 32:(rank + 1) * 32], None).float())
    whole = torch.from_numpy(x.double().numpy() @ tensor.dequantize().astype(np.float64).T)
    torch.testing.assert_close(sum(partial).double(), whole, atol=0.05, rtol=0.02)


@needs_int4_kernel
def test_fused_parts_mixing_q4_0_and_q4_1(tiny: Path) -> None:
    blocks = read_blocks(tiny).tensors
    gate, up = blocks["model.layers.0.mlp.gate_proj.weight"], blocks["model.layers.0.mlp.up_proj.weight"]
    parts = [gate.narrow(0, 0, 40), up.narrow(0, 0, 40)]                       # Q4_1 then Q4_0, 80 rows
    fused = QuantizedTensor("fused", Q4_1, np.concatenate([parts[0].blocks, np.zeros((40, 2, 20), np.uint8)]))
    kernel = Q4LinearKernel(parts)
    assert kernel.out_features == 80 and kernel.qtypes == ["Q4_0", "Q4_1"]
    x = torch.randn(3, 64).bfloat16()
    y = kernel(x, None)
    torch.testing.assert_close(y[:, :40], Q4LinearKernel(parts[0])(x, None), atol=0, rtol=0)
    torch.testing.assert_close(y[:, 40:], Q4LinearKernel(parts[1])(x, None), atol=0, rtol=0)
    assert Q4LinearKernel(fused)(x, None)[:, 40:].abs().max() == 0  # zero blocks are zero rows


@needs_int4_kernel
def test_kernel_call_matches_linear_kernel_signature(tiny: Path) -> None:
    tensor = read_blocks(tiny).tensors["model.layers.0.self_attn.k_proj.weight"]  # [32, 64]
    kernel = Q4LinearKernel(tensor)
    assert kernel.needs_plain_weight is False and kernel.weight is None
    bias = torch.randn(32)
    x = torch.randn(2, 3, 64)
    reference = kernel(x.reshape(6, 64), None).reshape(2, 3, 32) + bias
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = kernel(x.to(dtype), bias.to(dtype))
        assert y.dtype == dtype and y.shape == (2, 3, 32)
        torch.testing.assert_close(y.float(), reference, atol=0.02, rtol=0.02)
    assert kernel(torch.randn(0, 64), None).shape == (0, 32)


def test_kernel_refuses_other_types(tiny: Path) -> None:
    embedding = read_blocks(tiny).tensors["model.embed_tokens.weight"]
    with pytest.raises(AssertionError, match="takes Q4_0/Q4_1 tensors"):
        Q4LinearKernel(embedding)


# --- SmolLM2's real file (kept by `tpq model fetch`) ---------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, Path]:
    model_dir = cache_root() / "models" / DEFAULT_MODEL
    path = gguf_file(model_dir)
    if path is None or not (model_dir / "model.safetensors").is_file():
        pytest.skip(f"{DEFAULT_MODEL}'s GGUF file is not in {model_dir}; run `tpq model fetch`")
    return path, model_dir / "model.safetensors"


@pytest.mark.slow
def test_smollm2_blocks_match_the_converted_checkpoint(smollm2) -> None:
    gguf_path, weights = smollm2
    blocks = read_blocks(gguf_path)
    assert Counter(t.qtype for t in blocks.tensors.values()) == {Q4_1: 210, Q8_0: 1}
    assert Counter(blocks.other_types.values()) == {F32: 61}
    with safe_open(weights, "np") as converted:
        assert sorted(converted.keys()) == sorted([*blocks.tensors, *blocks.other_types])
        for name, tensor in blocks.tensors.items():
            assert tuple(converted.get_slice(name).get_shape()) == tensor.shape, name
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                     "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight"):
            np.testing.assert_array_equal(blocks.tensors[name].dequantize(), converted.get_tensor(name))


@pytest.mark.slow
@needs_int4_kernel
def test_smollm2_kernels_whole_and_sliced(smollm2) -> None:
    blocks = read_blocks(smollm2[0]).tensors
    q_proj, o_proj = blocks["model.layers.0.self_attn.q_proj.weight"], blocks["model.layers.0.self_attn.o_proj.weight"]
    down = blocks["model.layers.0.mlp.down_proj.weight"]                       # [576, 1536]
    for tensor in (q_proj, down, blocks["model.layers.0.self_attn.k_proj.weight"]):
        assert check_kernel(Q4LinearKernel(tensor), tensor, tokens=7) < 2 * BF16_STEP
    for rank in range(3):                                                      # tp=3: 3 of 9 heads, 6 blocks
        for part in (q_proj.narrow(0, rank * 192, 192), o_proj.narrow(1, rank * 192, 192)):
            check_kernel(Q4LinearKernel(part), part, seed=rank)
    check_kernel(Q4LinearKernel(down.narrow(1, 768, 768)), down.narrow(1, 768, 768))  # tp=2 row-parallel
