"""Tests of the tiny-checkpoint helpers in tests/checkpoints.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from tests.checkpoints import (
    BOS_ID,
    EOS_ID,
    hf_greedy,
    hf_reference_logits,
    load_hf_model,
    write_tiny_llama,
    write_tiny_qwen2,
)

WRITERS = {"llama": write_tiny_llama, "qwen2": write_tiny_qwen2}
SAMPLE_TEXT = "Héllo, 日本 🙂! 3.14 is pi."


@pytest.fixture(scope="module", params=sorted(WRITERS))
def model_dir(request, tmp_path_factory) -> Path:
    """One tiny checkpoint per architecture, shared by the module."""
    out_dir = tmp_path_factory.mktemp(request.param)
    return WRITERS[request.param](out_dir)


def random_prompts(count: int, vocab_size: int = 512, seed: int = 0) -> list[list[int]]:
    """Random non-special token id lists of varied length."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=generator).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def tensor_names(model_dir: Path) -> set[str]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_config_has_rope_theta_and_special_ids(model_dir):
    config = read_config(model_dir)
    assert config["rope_theta"] == 10000.0
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS_ID, EOS_ID)


def test_defaults_split_evenly_for_tp2(model_dir):
    config = read_config(model_dir)
    for key in ("num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size"):
        assert config[key] % 2 == 0, key
    assert config["hidden_size"] % config["num_attention_heads"] == 0


def test_transformers_loads_float32(model_dir):
    model = load_hf_model(model_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == 512


def test_qkv_biases_only_in_qwen2(model_dir):
    names = tensor_names(model_dir)
    has_bias = {f"model.layers.0.self_attn.{p}_proj.bias" in names for p in "qkv"}
    expected = read_config(model_dir)["model_type"] == "qwen2"
    assert has_bias == {expected}
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_qwen2_biases_are_nonzero(tmp_path):
    model = load_hf_model(write_tiny_qwen2(tmp_path))
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert bias.abs().mean() > 0.01


def test_tokenizer_loads_with_special_tokens(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 512
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID)


def test_tokenizer_round_trips_multibyte_text(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)
    assert ids == raw.encode(SAMPLE_TEXT).ids
    assert tokenizer.decode(ids) == SAMPLE_TEXT
    assert len(ids) < len(SAMPLE_TEXT.encode())  # merges were learned


def test_chat_template_is_chatml(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == BOS_ID and ids.count(EOS_ID) == 2


def test_logits_have_healthy_top1_margin(model_dir):
    gaps = []
    for prompt in random_prompts(5):
        top2 = hf_reference_logits(model_dir, prompt).topk(2, dim=-1).values  # [tokens, 2]
        gaps.append(top2[:, 0] - top2[:, 1])
    gaps = torch.cat(gaps)
    assert gaps.median() > 0.1
    assert (gaps > 1e-3).float().mean() > 0.95


def test_hf_greedy_matches_argmax_loop(model_dir):
    prompt = random_prompts(1, seed=3)[0]
    new_ids = hf_greedy(model_dir, prompt, 8)
    expected = []
    for _ in range(8):
        logits = hf_reference_logits(model_dir, prompt + expected)
        expected.append(int(logits[-1].argmax()))
    assert new_ids == expected


def test_hf_greedy_eos_handling(tmp_path):
    prompt = [5, 6, 7]
    eos_dir = write_eos_first_checkpoint(tmp_path, prompt)
    ignoring = hf_greedy(eos_dir, prompt, 6)
    assert len(ignoring) == 6 and ignoring[0] == EOS_ID
    assert hf_greedy(eos_dir, prompt, 6, stop_at_eos=True) == [EOS_ID]


def write_eos_first_checkpoint(tmp_path: Path, prompt: list[int]) -> Path:
    """A tiny Llama whose first greedy token after `prompt` is EOS."""
    model = load_hf_model(write_tiny_llama(tmp_path / "base"))
    with torch.no_grad():
        hidden = model.model(torch.tensor([prompt])).last_hidden_state[0, -1]  # [hidden]
        model.lm_head.weight[EOS_ID] = hidden * (100.0 / hidden.dot(hidden))
    model.save_pretrained(tmp_path / "eos_first")
    return tmp_path / "eos_first"
