"""Transformers throughput on CPU: the baseline our engine is compared with.

Three figures per dtype, all greedy and under `torch.inference_mode()`:
batch-1 decode, batched decode of prompts of varied length (left padded),
and prefill of one long prompt. Prompts are random token ids from a fixed
seed; pass your own to feed another engine the same ones.

    .venv/bin/python bench/hf_baseline.py [MODEL_DIR] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

DEFAULT_MODEL_DIR = Path.home() / ".cache/tpqueue/models/smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP_NEW_TOKENS = 4


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """One list of random token ids per entry of `lengths`, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def random_lengths(count: int, low: int = 16, high: int = 128, seed: int = 0) -> list[int]:
    """`count` prompt lengths drawn uniformly from [low, high], from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=generator).tolist()


def load_model(model_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    """Load a checkpoint in `dtype`, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.inference_mode()
def decode_tok_per_s(
    model_dir: Path,
    dtype: torch.dtype,
    prompt_len: int = 32,
    new_tokens: int = 64,
    prompt_ids: list[int] | None = None,
) -> float:
    """Batch-1 greedy decode: generated tokens per second (warm-up excluded)."""
    model = load_model(model_dir, dtype)
    prompt_ids = prompt_ids or random_prompts(model.config.vocab_size, [prompt_len])[0]
    return _generate_tok_per_s(model, [prompt_ids], new_tokens)


@torch.inference_mode()
def batch_tok_per_s(
    model_dir: Path,
    dtype: torch.dtype,
    num_prompts: int = 32,
    new_tokens: int = 128,
    prompt_lens: list[int] | None = None,
    prompts: list[list[int]] | None = None,
) -> float:
    """Batched greedy decode of varied-length prompts: generated tokens per second.

    Every prompt yields exactly `new_tokens` tokens. Lengths default to
    `random_lengths(num_prompts)`; `prompts`, if given, overrides both.
    """
    model = load_model(model_dir, dtype)
    if prompts is None:
        lengths = prompt_lens or random_lengths(num_prompts)
        prompts = random_prompts(model.config.vocab_size, lengths)
    return _generate_tok_per_s(model, prompts, new_tokens)


@torch.inference_mode()
def prefill_tok_per_s(
    model_dir: Path,
    dtype: torch.dtype,
    prompt_len: int = 512,
    prompt_ids: list[int] | None = None,
    repeats: int = 3,
) -> float:
    """One forward over a long prompt: prompt tokens per second (median of `repeats`).

    Only the last position's logits are computed, as a serving engine would.
    """
    model = load_model(model_dir, dtype)
    prompt_ids = prompt_ids or random_prompts(model.config.vocab_size, [prompt_len])[0]
    input_ids = torch.tensor([prompt_ids])  # [1, prompt]
    forward = lambda: model(input_ids, logits_to_keep=1, use_cache=False)  # noqa: E731
    forward()
    seconds = statistics.median(_seconds(forward) for _ in range(repeats))
    return len(prompt_ids) / seconds


def _generate_tok_per_s(model: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> float:
    """Warm up, then time one greedy `generate` of `new_tokens` per prompt."""
    input_ids, attention_mask = _left_pad(prompts, _pad_id(model))
    run = lambda n: _greedy(model, input_ids, attention_mask, n)  # noqa: E731
    run(WARMUP_NEW_TOKENS)
    seconds = _seconds(lambda: run(new_tokens))
    return len(prompts) * new_tokens / seconds


def _greedy(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """Greedy `generate` that never stops before `new_tokens` tokens."""
    output = model.generate(
        input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=_pad_id(model),
    )
    assert output.shape[1] == input_ids.shape[1] + new_tokens
    return output


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into `input_ids` and `attention_mask`, both [batch, longest]."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids, attention_mask


def _pad_id(model: PreTrainedModel) -> int:
    """The checkpoint's pad id, falling back to EOS, then 0."""
    config = model.config
    for token_id in (config.pad_token_id, config.eos_token_id, 0):
        if token_id is not None:
            return token_id[0] if isinstance(token_id, list) else token_id


def _seconds(fn) -> float:
    """Wall-clock seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Print all three figures for each requested dtype."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    args = parser.parse_args()
    print(f"{args.model_dir}  torch threads={torch.get_num_threads()}")
    for name in args.dtypes:
        dtype = DTYPES[name]
        for label, measure in (
            ("decode batch=1", decode_tok_per_s),
            ("decode batch=32", batch_tok_per_s),
            ("prefill 512", prefill_tok_per_s),
        ):
            start = time.perf_counter()
            rate = measure(args.model_dir, dtype)
            elapsed = time.perf_counter() - start
            print(f"{name:9} {label:16} {rate:9.1f} tok/s   ({elapsed:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
