"""Tiny random Hugging Face checkpoints and transformers reference outputs.

Parity tests build a checkpoint with `write_tiny_llama` / `write_tiny_qwen2`,
load it into our own model, and compare against `hf_reference_logits` and
`hf_greedy`. Each checkpoint directory is complete: float32 safetensors
weights, a config.json with `eos_token_id=2`, `bos_token_id=1` and a
top-level `rope_theta`, and a small byte-level BPE tokenizer with a ChatML
chat template.

The defaults split evenly for tensor parallel size 2: Llama has 4 query and
2 KV heads, Qwen2 6 and 2; vocab 512; intermediate size 128.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT_ID, BOS_ID, EOS_ID = 0, 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough distinct text for 512 tokens (256 bytes + 3 special + 253 merges).
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow?
0123456789 42 3.14 1,000,000 (x+y)=z [a]{b} <c> "quoted" 'single' #tag @user $5 %50
^_^ ~/path/to/file.py | a&b * c
Café, naïve, résumé, déjà vu: é è ê ü ö ñ ç. 日本語のテキスト 日本 東京 こんにちは 你好世界
🙂 🚀 👍 emoji 🙂🙂
Once upon a time, there was a little robot who loved to read books about the sea,
the stars, and the mountains.
It counted 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and then went to sleep.
Question: what is 7 * 6? Answer: 42.
def hello(name):
    return f"Hello, {name}!"
"""

# Qwen2's split regex; transformers' Qwen2Tokenizer rebuilds its pipeline with
# it (plus NFC), so Qwen2 checkpoints get the same pipeline in tokenizer.json.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

LINEAR_STD = 0.3
NORM_STD = 0.1
BIAS_STD = 0.1


@dataclass(frozen=True)
class TinySizes:
    """The sizes of a tiny checkpoint; the defaults are the tiny Llama's."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


def write_tiny_llama(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write a tiny random Llama checkpoint plus tokenizer; return `out_dir`. `sizes`: fields of `TinySizes`."""
    config = LlamaConfig(**_common_config_kwargs(TinySizes(**sizes)))
    return _write_checkpoint(out_dir, LlamaForCausalLM, config, seed, "gpt2")


def write_tiny_qwen2(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write a tiny random Qwen2 checkpoint (q/k/v biases, GQA) plus tokenizer.

    The default hidden size is 96 and 6 heads, so that each gets a head_dim
    of 16; `sizes` (fields of `TinySizes`) override any of them.
    """
    config = Qwen2Config(**_common_config_kwargs(TinySizes(**{"hidden_size": 96, "num_heads": 6, **sizes})))
    return _write_checkpoint(out_dir, Qwen2ForCausalLM, config, seed, "qwen2")


def load_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a checkpoint directory with transformers, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


def hf_reference_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """Return transformers' float32 logits `[len(token_ids), vocab]` for one sequence."""
    model = load_hf_model(model_dir)
    with torch.inference_mode():
        logits = model(torch.tensor([token_ids])).logits  # [1, tokens, vocab]
    return logits[0].float()


def hf_reference_logprobs(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """Return transformers' float32 log-softmax `[len(token_ids), vocab]`: row i is the distribution of token i+1."""
    return torch.log_softmax(hf_reference_logits(model_dir, token_ids), dim=-1)


def hf_greedy(
    model_dir: Path,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    stop_at_eos: bool = False,
) -> list[int]:
    """Greedy-decode with transformers `generate`; return only the new ids.

    With `stop_at_eos=False` exactly `max_new_tokens` ids come back and EOS is
    an ordinary token (still chosen when it is the argmax). With
    `stop_at_eos=True` generation ends after the first EOS, which is included.
    """
    model = load_hf_model(model_dir)
    input_ids = torch.tensor([prompt_ids])  # [1, prompt]
    # eos_token_id=None must be a keyword: inside a GenerationConfig, None
    # means "unset" and the checkpoint's EOS comes back.
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=EOS_ID if stop_at_eos else None,
            pad_token_id=EOS_ID,
        )
    return output[0, len(prompt_ids):].tolist()


def _common_config_kwargs(sizes: TinySizes) -> dict:
    """Config fields shared by the Llama and Qwen2 writers."""
    return dict(
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        intermediate_size=sizes.intermediate_size,
        vocab_size=sizes.vocab_size,
        max_position_embeddings=sizes.max_position_embeddings,
        rope_theta=sizes.rope_theta,
        tie_word_embeddings=sizes.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        dtype="float32",
    )


def _write_checkpoint(
    out_dir: Path, model_class: type, config, seed: int, tokenizer_style: str
) -> Path:
    """Build, re-initialize and save a model, then its tokenizer, into `out_dir`."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    _reinit_weights(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    _add_top_level_rope_theta(out_dir / "config.json", config)
    _write_tokenizer(out_dir, config.vocab_size, tokenizer_style)
    return out_dir


def _reinit_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights large enough that logits are far from uniform.

    The default init (std 0.02) gives nearly flat logits and greedy ties.
    Matrices get std `LINEAR_STD`, norm weights 1 ± `NORM_STD`, biases
    std `BIAS_STD`.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2:
                param.copy_(noise * LINEAR_STD)
            elif name.endswith("bias"):
                param.copy_(noise * BIAS_STD)
            else:
                param.copy_(1.0 + noise * NORM_STD)


def _add_top_level_rope_theta(config_path: Path, config) -> None:
    """Make config.json carry `rope_theta` at top level as well as in `rope_parameters`."""
    data = json.loads(config_path.read_text())
    data["rope_theta"] = float(config.rope_parameters["rope_theta"])
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(out_dir: Path, vocab_size: int, style: str) -> None:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens and save it."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_tokenizer(vocab_size, style),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    wrapped.save_pretrained(out_dir)


def train_tiny_tokenizer(vocab_size: int = 512, style: str = "gpt2") -> Tokenizer:
    """Train a byte-level BPE tokenizer on `TRAINING_TEXT`.

    `style` "gpt2" pre-tokenizes like GPT-2 / SmolLM2, "qwen2" like Qwen2
    (NFC, Qwen2 split regex, single digits). Special tokens take ids 0, 1, 2.
    The result has exactly `vocab_size` tokens up to about 580, the most
    this text supports; past that the model vocab is larger than the tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        assert style == "gpt2", f"unknown tokenizer style {style!r}"
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer)
    assert tokenizer.get_vocab_size() <= vocab_size, "tokenizer larger than model vocab"
    return tokenizer
