"""tpqueue's engine in each weight format against transformers and llama.cpp, side by side in one run.

Each (side, format) runs in its own subprocess, so peak RSS is that side's
alone. Same model, same prompts (random token ids from a fixed seed),
greedy, every sequence generating exactly the asked number of tokens.

    .venv/bin/python bench/engine.py [--formats float32 bfloat16 int8] [--no-llama-cpp] [--tp3] [--json]

Sides: transformers ``generate`` in fp32 and bf16; tpqueue in each
``--formats`` entry (a dtype; ``int8``: int8 weights with bf16
activations; ``q4``: the GGUF file's 4-bit weights, bf16 activations;
``bf16-fp8kv``: bf16 with an fp8 KV cache); llama.cpp through ``llama-cpp-python`` (``pip install
.[bench]``; it builds from source) on the GGUF file the model store keeps,
when it is installed. Figures: batch-1 decode tok/s, 32 concurrent prompts
x 128 tokens tok/s (not llama.cpp: its Python binding has no batched
generate), prefill of a 512-token prompt tok/s, peak RSS.

Batch-1 decode reads every weight once a step, so its ceiling is the
machine's read bandwidth (measured here: the best of a few sums of a
1 GiB tensor on all threads) over the bytes of the weights one step reads
(every linear layer and the LM head in the format's storage; the
embedding's one row is left out). Each batch-1 figure is printed as a
fraction of its ceiling. Records the CPU (``lscpu`` flags) with the
figures; paste the table into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH1 = dict(prompt_len=32, new_tokens=64, repeats=3)  # median of distinct prompts
CONCURRENT = dict(num_prompts=32, new_tokens=128)
PREFILL_LEN = 512
MODEL = "smollm2-135m-instruct"
VOCAB = 49152
FORMATS = {  # tpqueue format -> Engine options
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "q4": {"dtype": "bfloat16", "quantization": "q4"},
    "bf16-fp8kv": {"dtype": "bfloat16", "kv_cache_dtype": "fp8"},
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bandwidth_gb_s() -> float:
    """The machine's read bandwidth: the best of 5 sums of a 1 GiB float32 tensor, on all of torch's threads."""
    import torch

    data = torch.ones(2**28, dtype=torch.float32)  # 1 GiB, far past every cache
    data.sum()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def step_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every linear layer's and the LM head's kernel, in their storage."""
    import torch

    total = 0
    for module in model.modules():
        kernel = getattr(module, "kernel", None)
        if kernel is None:
            continue
        if hasattr(kernel, "nbytes"):
            total += kernel.nbytes
            continue
        tensors = [t for t in (getattr(kernel, "weight", None), getattr(kernel, "packed", None))
                   if isinstance(t, torch.Tensor)]
        # a half-precision layer may keep an fp32 copy for large steps; batch 1 reads the smallest
        total += min(t.numel() * t.element_size() for t in tensors)
    return total


def run_transformers(dtype_name: str) -> dict:
    import torch
    from bench import hf_baseline as hf
    from gpu_worker.weights.model_store import resolve_model

    model_dir, dtype = resolve_model(MODEL), hf.DTYPES[dtype_name]
    return {
        "batch1": statistics.median(hf.decode_tok_per_s(model_dir, dtype, prompt_ids=p, new_tokens=BATCH1["new_tokens"])
                                    for p in batch1_prompts()),
        "concurrent32": hf.batch_tok_per_s(model_dir, dtype, prompts=concurrent_prompts(),
                                           new_tokens=CONCURRENT["new_tokens"]),
        "prefill512": hf.prefill_tok_per_s(model_dir, dtype, prompt_ids=prefill_prompts(1)[0]),
        "threads": torch.get_num_threads(),
    }


def run_tpqueue(fmt: str, tp: int) -> dict:
    from bench import hf_baseline as hf
    from common.sampling import SamplingParams
    from gpu_worker.llm import Engine

    with Engine(MODEL, tp=tp, **FORMATS[fmt]) as engine:
        def timed(prompts, new_tokens) -> float:
            sampling = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            start = time.perf_counter()
            results = engine.generate([{"prompt_token_ids": p} for p in prompts], sampling)
            assert all(len(r.token_ids) == new_tokens for r in results)
            return time.perf_counter() - start

        timed(hf.random_prompts(VOCAB, [16], seed=99), 4)                       # warm-up
        out = {"batch1": BATCH1["new_tokens"] / statistics.median(
            timed([p], BATCH1["new_tokens"]) for p in batch1_prompts())}
        prompts = concurrent_prompts()
        out["concurrent32"] = len(prompts) * CONCURRENT["new_tokens"] / timed(prompts, CONCURRENT["new_tokens"])
        # a fresh prompt per repeat, so the prefix cache cannot help; max_tokens=1: prefill + one sample
        seconds = [timed([p], 1) for p in prefill_prompts(3)]
        out["prefill512"] = PREFILL_LEN / statistics.median(seconds)
        out["step_weight_bytes"] = step_weight_bytes(engine.llm.executor.runner.model)
    return out


def run_llama_cpp() -> dict:
    """llama.cpp on the model store's GGUF file: batch-1 decode and a 512-token prefill, on all cores."""
    import os

    from llama_cpp import Llama

    from gpu_worker.weights.model_store import gguf_file, resolve_model

    path = gguf_file(resolve_model(MODEL))
    if path is None:
        raise RuntimeError(f"the model store kept no GGUF file for {MODEL}")
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    no_eos = {llm.token_eos(): -float("inf")}

    def decode(prompt: list[int]) -> float:
        llm.reset()
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=BATCH1["new_tokens"], temperature=0.0, logit_bias=no_eos)
        assert out["usage"]["completion_tokens"] == BATCH1["new_tokens"]
        return BATCH1["new_tokens"] / (time.perf_counter() - start)  # includes the 32-token prompt, as ours does

    def prefill(prompt: list[int]) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - start)

    decode(batch1_prompts()[0][:8])  # warm-up
    return {"batch1": statistics.median(decode(p) for p in batch1_prompts()),
            "prefill512": statistics.median(prefill(p) for p in prefill_prompts(3)),
            "step_weight_bytes": path.stat().st_size}


def batch1_prompts() -> list[list[int]]:
    from bench import hf_baseline as hf

    return hf.random_prompts(VOCAB, [BATCH1["prompt_len"]] * BATCH1["repeats"], seed=3)


def concurrent_prompts() -> list[list[int]]:
    from bench import hf_baseline as hf

    return hf.random_prompts(VOCAB, hf.random_lengths(CONCURRENT["num_prompts"]), seed=1)


def prefill_prompts(count: int) -> list[list[int]]:
    from bench import hf_baseline as hf

    return hf.random_prompts(VOCAB, [PREFILL_LEN] * count, seed=2)


def child(side: str, fmt: str, tp: int) -> None:
    if side == "transformers":
        result = run_transformers(fmt)
    elif side == "llama.cpp":
        result = run_llama_cpp()
    elif side == "bandwidth":
        result = {"read_gb_s": read_bandwidth_gb_s()}
    else:
        result = run_tpqueue(fmt, tp)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def measure(side: str, fmt: str, tp: int = 1) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", side, fmt, str(tp)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{side} {fmt} tp={tp} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {side:12} {fmt:9} tp={tp}: " + ", ".join(
        f"{k}={v:.1f}" for k, v in result.items() if isinstance(v, float)) + f"  ({time.perf_counter() - start:.0f} s)",
        flush=True)
    return result


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def table(rows: list[dict], bandwidth: float) -> str:
    lines = [f"read bandwidth: {bandwidth:.1f} GB/s",
             "| side | format | batch 1 tok/s | of its ceiling | 32 x 128 tok/s | prefill 512 tok/s | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ceiling = bandwidth * 1e9 / r["step_weight_bytes"] if r.get("step_weight_bytes") else None
        share = f"{r['batch1'] / ceiling:.0%} of {ceiling:.0f}" if ceiling else "-"
        concurrent = f"{r['concurrent32']:.1f}" if "concurrent32" in r else "-"
        lines.append(f"| {r['side']} | {r['format']} | {r['batch1']:.1f} | {share} | {concurrent} | "
                     f"{r['prefill512']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """The issue's targets, each with the figures it compares."""
    ours = [r for r in rows if r["side"] == "tpqueue"]
    theirs = [r for r in rows if r["side"] == "transformers"]
    lines = []
    if ours and theirs:
        best = lambda side, key: max(side, key=lambda r: r[key])  # noqa: E731
        for key, name, goal in (("concurrent32", "32 x 128", 3.0), ("prefill512", "prefill 512", 1.5)):
            a, b = best(ours, key), best(theirs, key)
            lines.append(f"- {name}: tpqueue {a['format']} {a[key]:.1f} / transformers {b['format']} {b[key]:.1f} = "
                         f"{a[key] / b[key]:.2f}x (target >= {goal:g}x)")
    llama = next((r for r in rows if r["side"] == "llama.cpp"), None)
    q4 = next((r for r in ours if r["format"] == "q4"), None)
    if llama and q4:
        lines.append(f"- batch 1: q4 {q4['batch1']:.1f} / llama.cpp {llama['batch1']:.1f} = "
                     f"{q4['batch1'] / llama['batch1']:.2f}x (target >= 1x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--transformers-dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    parser.add_argument("--tp3", action="store_true", help="also measure tp=3 (fp32)")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON line")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "FORMAT", "TP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, fmt, tp = args.child
        return child(side, fmt, int(tp))
    from bench.gateway import cpu

    print(f"CPU: {cpu()}", flush=True)
    bandwidth = measure("bandwidth", "-")["read_gb_s"]
    sides = [("transformers", d) for d in args.transformers_dtypes] + [("tpqueue", f) for f in args.formats]
    if not args.no_llama_cpp:
        if llama_cpp_installed():
            sides.append(("llama.cpp", "gguf"))
        else:
            print("  llama.cpp: llama-cpp-python is not installed (pip install '.[bench]'); skipped", flush=True)
    rows = [{"side": side, "format": fmt, **measure(side, fmt)} for side, fmt in sides]
    print("\n" + table(rows, bandwidth) + "\n" + targets(rows))
    if args.tp3:
        one, three = measure("tpqueue", "float32", 1), measure("tpqueue", "float32", 3)
        print("\n| tpqueue fp32 | tp=1 | tp=3 | tp=3 / tp=1 |\n|---|---:|---:|---:|")
        for key, name in (("batch1", "decode, batch 1 (tok/s)"), ("concurrent32", "32 concurrent (tok/s)"),
                          ("prefill512", "prefill 512 (tok/s)"), ("peak_rss_mib", "rank-0 peak RSS (MiB)")):
            print(f"| {name} | {one[key]:.1f} | {three[key]:.1f} | {three[key] / one[key]:.2f}x |")
    if args.json:
        print(json.dumps({"cpu": cpu(), "read_gb_s": bandwidth, "rows": rows}))


if __name__ == "__main__":
    main()
