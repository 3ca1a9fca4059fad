"""Perplexity of the engine on a fixed English text, per weight format and dtype, beside transformers' fp32.

    .venv/bin/python bench/quality.py [--formats float32 bfloat16 int8] [--window 1024] [--json]

The text is ``bench/data/public_domain.txt``: the Declaration of
Independence (1776), the Gettysburg Address (1863) and Lincoln's second
inaugural address (1865), all public domain; about 2,900 SmolLM2 tokens.
It is cut into windows of ``--window`` tokens; each window is one prompt
with ``prompt_logprobs``, so every token but a window's first is scored
given the tokens before it in its window, prefilled in chunks of
:data:`PREFILL_CHUNK` tokens (so later chunks read earlier keys back from
the KV cache, in its storage dtype). Perplexity is ``exp`` of the mean
negative log-probability over the scored tokens, the same tokens for every
format. transformers' fp32 forward on the same windows is the reference
(its log-softmax of the same logits), so the ``float32`` row also checks
the engine against it; llama.cpp on the GGUF file the model store keeps
(when ``llama-cpp-python`` is installed) is ``q4``'s.

A format is one of ``bench/engine.py``'s: a dtype (``float32``,
``bfloat16``) or a weight quantization (``int8``: int8 weights, bf16
activations). Each runs in its own subprocess (its peak RSS
is its own). Prints a table of perplexity and its difference from the
engine's fp32; records the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import engine as engine_bench  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "public_domain.txt"
MODEL = "smollm2-135m-instruct"
FORMATS = engine_bench.FORMATS  # format -> Engine options, as bench/engine.py runs them
PREFILL_CHUNK = 128


def windows(token_ids: list[int], size: int) -> list[list[int]]:
    """``token_ids`` cut into consecutive windows of ``size`` (the last may be shorter, but has 2 tokens or more)."""
    cut = [token_ids[i:i + size] for i in range(0, len(token_ids), size)]
    return [w for w in cut if len(w) >= 2]


def text_windows(size: int) -> list[list[int]]:
    from gpu_worker.models.tokenizer import Tokenizer
    from gpu_worker.weights.model_store import resolve_model

    tokenizer = Tokenizer(resolve_model(MODEL))
    return windows(tokenizer.encode(TEXT.read_text()), size)


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def engine_logprobs(options: dict, size: int) -> list[float]:
    """The engine's log-probability of every scored token (each window's tokens after its first)."""
    from common.sampling import SamplingParams
    from gpu_worker import Engine

    prompts = [{"prompt_token_ids": w} for w in text_windows(size)]
    # prefill in chunks of PREFILL_CHUNK tokens: most scored positions attend to keys read back from the KV
    # cache, so its storage (kv_cache_dtype) counts, as it does for a served prompt longer than one step
    with Engine(MODEL, **options, max_model_len=size + 8, max_num_batched_tokens=PREFILL_CHUNK) as engine:
        results = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    scored = []
    for window, result in zip(prompts, results):
        entries = result.prompt_logprobs
        assert len(entries) == len(window["prompt_token_ids"]) and entries[0].logprob is None
        scored.extend(entry.logprob for entry in entries[1:])
    return scored


def transformers_logprobs(size: int) -> list[float]:
    """transformers' fp32 log-probability of the same tokens (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gpu_worker.weights.model_store import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), torch_dtype=torch.float32).eval()
    scored = []
    with torch.inference_mode():
        for window in text_windows(size):
            ids = torch.tensor([window])                                            # [1, tokens]
            logits = model(ids).logits[0, :-1].float()                              # [tokens - 1, vocab]
            logprobs = torch.log_softmax(logits, dim=-1)
            scored.extend(logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist())      # [tokens - 1]
    return scored


def llama_cpp_logprobs(size: int) -> list[float]:
    """llama.cpp's log-probability of the same tokens, on the GGUF file the model store keeps (q4's reference)."""
    import os

    import numpy as np
    from llama_cpp import Llama

    from gpu_worker.weights.model_store import gguf_file, resolve_model

    llm = Llama(model_path=str(gguf_file(resolve_model(MODEL))), n_ctx=size, n_batch=size, logits_all=True,
                n_threads=os.cpu_count(), verbose=False)
    scored = []
    for window in text_windows(size):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)        # [tokens - 1, vocab]
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        scored.extend(logprobs[np.arange(len(window) - 1), window[1:]].tolist())
    return scored


def child(side: str, size: int) -> None:
    if side == "transformers":
        scored = transformers_logprobs(size)
    elif side == "llama.cpp":
        scored = llama_cpp_logprobs(size)
    else:
        scored = engine_logprobs(FORMATS[side], size)
    print(json.dumps({"side": side, "tokens": len(scored), "ppl": perplexity(scored),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(side: str, size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", side, "--window", str(size)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict], cpu: str) -> str:
    base = next((r["ppl"] for r in rows if r["side"] == "float32"), None)
    lines = [f"CPU: {cpu}", "| side | scored tokens | perplexity | vs engine fp32 | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r['ppl'] / base - 1):+.2f} %" if base else "-"
        lines.append(f"| {r['side']} | {r['tokens']} | {r['ppl']:.3f} | {delta} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--window", type=int, default=1024, help="tokens per scored window (default 1024)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' fp32 reference")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.window)
        return 0
    from bench.gateway import cpu

    sides = ([] if args.no_transformers else ["transformers"]) + args.formats
    if engine_bench.llama_cpp_installed():
        sides.append("llama.cpp")
    rows = [measure(side, args.window) for side in sides]
    print(report(rows, cpu()))
    if args.json:
        print(json.dumps({"cpu": cpu(), "window": args.window, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
