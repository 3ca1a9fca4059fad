"""Decode steps on torch ops, on the fused CPU kernels op by op, and as the one-call decode program, side by side.

Three runners of SmolLM2-135M per weight format (bf16 activations; the
same plans, ~256 tokens of context per sequence), their steps alternating,
so a noisy machine slows all three alike:

- ``torch ops``: ``TPQ_CPU_KERNELS=0`` (``RunnerSpec.cpu_kernels=False``);
- ``kernels``: the fused C kernels (`gpu_worker.kernels.cpu_ops`), layer by layer from Python;
- ``program``: every layer in one C call (`gpu_worker.kernels.decode_program`), batches up to 8.

Then, for the program at batch 1, where a step's time goes: the layers'
C call, the same call running only the matrix products and attention
(``matrix_work_only``), and the LM head; a step's overhead is its time
minus its matrix work (the layers' matrix products, attention and the LM
head). Prints the CPU with the figures.

    nice -n 10 .venv/bin/python bench/decode_paths.py [--formats bfloat16 int8 q4] [--batches 1 8 32] [--steps 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.step_overhead import BLOCK_SIZE, CONTEXT, cpu_lines, decode_plan  # noqa: E402
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec  # noqa: E402
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context  # noqa: E402
from gpu_worker.weights.model_store import resolve_model  # noqa: E402

MODEL = "smollm2-135m-instruct"
FORMATS = {"bfloat16": None, "int8": "int8", "q4": "q4"}
PATHS = ("torch ops", "kernels", "program")


def runners(quantization: str | None, blocks: int) -> dict[str, ModelRunner]:
    model_dir = str(resolve_model(MODEL))
    made = {path: ModelRunner(RunnerSpec(model_dir, "bfloat16", "cpu", BLOCK_SIZE, blocks, quantization=quantization,
                                         cpu_kernels=path != "torch ops"))
            for path in PATHS}
    made["kernels"].program = None
    assert made["program"].program is not None, "the decode program does not cover this format"
    return made


def alternate(fns: dict[str, callable], steps: int) -> dict[str, list[float]]:
    """Seconds of each call, the calls alternating, after two warm-up rounds."""
    times = {name: [] for name in fns}
    for round_ in range(steps + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return times


def overhead_at_batch1(runner: ModelRunner, steps: int) -> dict[str, float]:
    """Milliseconds (fastest of ``steps``) of a whole step and of its parts, on the program path."""
    plan = decode_plan(1)
    inputs = runner.prepare_inputs(plan)
    hidden = runner.program(inputs.input_ids, inputs.positions, inputs.meta)
    times = alternate({
        "step": lambda: runner.execute(plan),
        "layers": lambda: runner.program(inputs.input_ids, inputs.positions, inputs.meta),
        "matrix work in the layers": lambda: runner.program(inputs.input_ids, inputs.positions, inputs.meta, True),
        "LM head": lambda: runner.model.compute_logits(hidden),
    }, steps)
    return {name: min(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    set_parallel_context(ParallelContext(0, 1))
    blocks = max(-(-(CONTEXT + b) // BLOCK_SIZE) * b for b in args.batches)
    print(*cpu_lines(), f"torch {torch.__version__}, {torch.get_num_threads()} threads", sep="\n")
    print(f"\ndecode step (ms), bf16 activations, ~{CONTEXT} tokens of context, fastest | median of {args.steps}")
    print("| format | batch | " + " | ".join(PATHS) + " | program vs torch ops |")
    print("|---|---:|" + "---:|" * (len(PATHS) + 1))
    breakdown = {}
    for fmt in args.formats:
        made = runners(FORMATS[fmt], blocks)
        with torch.inference_mode():
            for batch in args.batches:
                plan = decode_plan(batch)
                times = alternate({path: (lambda r=r: r.execute(plan)) for path, r in made.items()}, args.steps)
                cells = [f"{min(times[p]) * 1e3:.1f} \\| {statistics.median(times[p]) * 1e3:.1f}" for p in PATHS]
                ratio = min(times["torch ops"]) / min(times["program"])
                print(f"| {fmt} | {batch} | " + " | ".join(cells) + f" | {ratio:.2f}x |", flush=True)
            breakdown[fmt] = overhead_at_batch1(made["program"], args.steps)
        del made
    print("\nbatch-1 step on the program path, its parts (ms, fastest of each); overhead = step - matrix work")
    print("| format | step | layers call | matrix work in the layers | LM head | overhead |")
    print("|---|---:|---:|---:|---:|---:|")
    for fmt, parts in breakdown.items():
        overhead = parts["step"] - parts["matrix work in the layers"] - parts["LM head"]
        print(f"| {fmt} | {parts['step']:.2f} | {parts['layers']:.2f} | {parts['matrix work in the layers']:.2f} | "
              f"{parts['LM head']:.2f} | {overhead:.2f} |")


if __name__ == "__main__":
    main()
