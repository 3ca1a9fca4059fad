"""Eager vs compiled decode steps (`gpu_worker.engine.compiled_decode`), side by side in one run.

Builds two runners of SmolLM2-135M on the CPU, one with ``enforce_eager=True``
and one compiled for ``--sizes``, checks that a decode step of each batch gives
the same greedy tokens and logits within tolerance, then times decode steps
(~256 tokens of context), alternating eager and compiled, and prints the
fastest and median of each, with the compile (warm-up) time and the CPU.

    TPQ_CALIBRATE=0 nice -n 15 .venv/bin/python bench/compile_decode.py [--dtype float32] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.step_overhead import BLOCK_SIZE, CONTEXT, MODEL, cpu_lines, decode_plan  # noqa: E402
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec  # noqa: E402
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context  # noqa: E402
from gpu_worker.weights.model_store import resolve_model  # noqa: E402


def build(dtype: str, batches: list[int], eager: bool) -> tuple[ModelRunner, float]:
    blocks = sum(-(-(CONTEXT + b) // BLOCK_SIZE) * b for b in batches)
    start = time.perf_counter()
    runner = ModelRunner(RunnerSpec(str(resolve_model(MODEL)), dtype, "cpu", BLOCK_SIZE, blocks, calibrate=False,
                                    max_num_seqs=max(batches), enforce_eager=eager))
    return runner, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per path and batch")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    set_parallel_context(ParallelContext(0, 1))
    print(*cpu_lines(), f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}", sep="\n")
    eager, eager_s = build(args.dtype, batches, eager=True)
    compiled, compiled_s = build(args.dtype, batches, eager=False)
    print(f"start: eager {eager_s:.1f} s, compiled {compiled_s:.1f} s "
          f"(compile + warm of sizes {compiled.compiled.sizes}: {compiled.compiled.compile_s:.1f} s)")
    print(f"\ndecode step (ms), ~{CONTEXT} tokens of context, {args.repeats} alternating steps each")
    print("| batch | padded | eager min | eager median | compiled min | compiled median | speedup (min) "
          "| max logit diff | greedy equal |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch in batches:
        plan = decode_plan(batch)
        a, b = eager.execute(plan), compiled.execute(plan)
        diff, same = (a - b).abs().max().item(), torch.equal(a.argmax(-1), b.argmax(-1))
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, runner in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                runner.execute(plan)
                times[name].append((time.perf_counter() - start) * 1e3)
        e, c = times["eager"], times["compiled"]
        print(f"| {batch} | {compiled.compiled.padded_size(batch)} | {min(e):.1f} | {statistics.median(e):.1f} "
              f"| {min(c):.1f} | {statistics.median(c):.1f} | {min(e) / min(c):.2f}x | {diff:.1e} | {same} |")


if __name__ == "__main__":
    main()
