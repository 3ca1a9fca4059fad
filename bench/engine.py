"""tpqueue's engine against transformers `generate`, side by side in one run.

Each (side, dtype) runs in its own subprocess, so peak RSS is that side's
alone. Same model, same dtype, same prompts (random token ids from a fixed
seed), greedy, every sequence generating exactly the asked number of tokens.

    .venv/bin/python bench/engine.py [--dtypes float32 bfloat16] [--tp3]

Figures: batch-1 decode tok/s, 32 concurrent prompts x 128 tokens tok/s,
prefill of a 512-token prompt tok/s, peak RSS; with --tp3 also tp=3 vs tp=1
(fp32). Prints a table with the ratios; paste it into bench/RESULTS.md.
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_transformers(dtype_name: str) -> dict:
    import torch
    from bench import hf_baseline as hf
    from gpu_worker.weights.model_store import resolve_model

    model_dir, dtype = resolve_model(MODEL), hf.DTYPES[dtype_name]
    vocab = 49152
    return {
        "batch1": statistics.median(hf.decode_tok_per_s(model_dir, dtype, prompt_ids=p, new_tokens=BATCH1["new_tokens"])
                                    for p in batch1_prompts(vocab)),
        "concurrent32": hf.batch_tok_per_s(model_dir, dtype, prompts=concurrent_prompts(vocab),
                                           new_tokens=CONCURRENT["new_tokens"]),
        "prefill512": hf.prefill_tok_per_s(model_dir, dtype, prompt_ids=prefill_prompts(vocab, 1)[0]),
        "threads": torch.get_num_threads(),
    }


def run_tpqueue(dtype_name: str, tp: int) -> dict:
    from bench import hf_baseline as hf
    from common.sampling import SamplingParams
    from gpu_worker.llm import Engine

    vocab = 49152
    with Engine(MODEL, tp=tp, dtype=dtype_name) as engine:
        def timed(prompts, new_tokens) -> float:
            sampling = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            start = time.perf_counter()
            results = engine.generate([{"prompt_token_ids": p} for p in prompts], sampling)
            assert all(len(r.token_ids) == new_tokens for r in results)
            return time.perf_counter() - start

        timed(hf.random_prompts(vocab, [16], seed=99), 4)                       # warm-up
        out = {"batch1": BATCH1["new_tokens"] / statistics.median(
            timed([p], BATCH1["new_tokens"]) for p in batch1_prompts(vocab))}
        prompts = concurrent_prompts(vocab)
        out["concurrent32"] = len(prompts) * CONCURRENT["new_tokens"] / timed(prompts, CONCURRENT["new_tokens"])
        # a fresh prompt per repeat, so the prefix cache cannot help; max_tokens=1: prefill + one sample
        seconds = [timed([p], 1) for p in prefill_prompts(vocab, 3)]
        out["prefill512"] = PREFILL_LEN / statistics.median(seconds)
    return out


def batch1_prompts(vocab: int) -> list[list[int]]:
    from bench import hf_baseline as hf

    return hf.random_prompts(vocab, [BATCH1["prompt_len"]] * BATCH1["repeats"], seed=3)


def concurrent_prompts(vocab: int) -> list[list[int]]:
    from bench import hf_baseline as hf

    return hf.random_prompts(vocab, hf.random_lengths(CONCURRENT["num_prompts"]), seed=1)


def prefill_prompts(vocab: int, count: int) -> list[list[int]]:
    from bench import hf_baseline as hf

    return hf.random_prompts(vocab, [PREFILL_LEN] * count, seed=2)


def child(side: str, dtype: str, tp: int) -> None:
    result = run_transformers(dtype) if side == "transformers" else run_tpqueue(dtype, tp)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def measure(side: str, dtype: str, tp: int = 1) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", side, dtype, str(tp)],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{side} {dtype} tp={tp} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {side:12} {dtype:9} tp={tp}: " + ", ".join(
        f"{k}={v:.1f}" for k, v in result.items() if isinstance(v, float)) + f"  ({time.perf_counter() - start:.0f} s)",
        flush=True)
    return result


def table(rows: list[tuple[str, str, float, float, str]]) -> str:
    lines = ["| dtype | figure | transformers | tpqueue | ratio | target |", "|---|---|---:|---:|---:|---|"]
    for dtype, name, theirs, ours, target in rows:
        lines.append(f"| {dtype} | {name} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tp3", action="store_true", help="also measure tp=3 (fp32)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "DTYPE", "TP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, dtype, tp = args.child
        return child(side, dtype, int(tp))
    rows = []
    for dtype in args.dtypes:
        theirs, ours = measure("transformers", dtype), measure("tpqueue", dtype)
        rows += [
            (dtype, "decode, batch 1 (tok/s)", theirs["batch1"], ours["batch1"], ">= 40 tok/s in the faster dtype"),
            (dtype, "32 concurrent x 128 tokens (tok/s)", theirs["concurrent32"], ours["concurrent32"], ">= 2x"),
            (dtype, "prefill, 512-token prompt (tok/s)", theirs["prefill512"], ours["prefill512"], ">= 1x"),
            (dtype, "peak RSS (MiB)", theirs["peak_rss_mib"], ours["peak_rss_mib"], "report"),
        ]
    print("\n" + table(rows))
    if args.tp3:
        one, three = measure("tpqueue", "float32", 1), measure("tpqueue", "float32", 3)
        print("\n| tpqueue fp32 | tp=1 | tp=3 | tp=3 / tp=1 |\n|---|---:|---:|---:|")
        for key, name in (("batch1", "decode, batch 1 (tok/s)"), ("concurrent32", "32 concurrent (tok/s)"),
                          ("prefill512", "prefill 512 (tok/s)"), ("peak_rss_mib", "rank-0 peak RSS (MiB)")):
            print(f"| {name} | {one[key]:.1f} | {three[key]:.1f} | {three[key] / one[key]:.2f}x |")


if __name__ == "__main__":
    main()
