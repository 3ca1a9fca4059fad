"""The cost of building one step's inputs (`ModelRunner.prepare_inputs`), before and after issue 12, in one run.

"before" is a frozen copy of the earlier `prepare_inputs` (fresh torch ops every
step, lengths read back from tensors with ``.tolist()``); "after" is the
runner's own (lengths from the host-side plan, index tensors built into
preallocated buffers). Both run on the same runner and the same plans: decode
steps at batch 1 and batch 32 with ~256 tokens of context each, SmolLM2-135M,
float32 on the CPU. Also prints one whole decode step for scale, the CPU, and
what the start-up attention calibration measures on it for SmolLM2's heads at
tp=1 and tp=3 (bf16 vs upcast to float32; `gpu_worker.engine.calibration`).

    nice -n 10 .venv/bin/python bench/step_overhead.py [--repeats 2000] [--no-step] [--no-attention] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.sampling import SamplingParams  # noqa: E402
from gpu_worker.engine import calibration  # noqa: E402
from gpu_worker.engine.calibration import AttentionChoice, AttentionShape  # noqa: E402
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec, StepInputs  # noqa: E402
from gpu_worker.engine.plan import StepPlan, pack_step  # noqa: E402
from gpu_worker.engine.sequence import Sequence  # noqa: E402
from gpu_worker.layers.attention import AttentionMetadata, PrefillSpan  # noqa: E402
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context  # noqa: E402
from gpu_worker.weights.model_store import resolve_model  # noqa: E402

MODEL = "smollm2-135m-instruct"
BLOCK_SIZE = 16
CONTEXT = 256
BATCHES = (1, 32)


def legacy_prepare_inputs(runner: ModelRunner, plan: StepPlan) -> StepInputs:
    """The `prepare_inputs` of before issue 12, verbatim but for ``self`` (the baseline)."""
    _, num_seqs, num_tokens, max_blocks = plan.header.tolist()
    payload = plan.payload.to(runner.device)
    input_ids = payload[:num_tokens]
    query_lens = payload[num_tokens:num_tokens + num_seqs]
    context_lens = payload[num_tokens + num_seqs:num_tokens + 2 * num_seqs]
    logit_counts = plan.payload[num_tokens + 2 * num_seqs:num_tokens + 3 * num_seqs].tolist()
    block_tables = payload[num_tokens + 3 * num_seqs:].view(num_seqs, max_blocks)
    bs, device = runner.spec.block_size, runner.device
    if num_tokens == num_seqs:
        seq_of_token, positions = torch.arange(num_seqs, device=device), context_lens - 1
    else:
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)
        first_token = torch.cumsum(query_lens, 0) - query_lens
        offsets = torch.arange(num_tokens, device=device) - first_token[seq_of_token]
        positions = (context_lens - query_lens)[seq_of_token] + offsets
    slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
    q_lens, ctx_lens = query_lens.tolist(), context_lens.tolist()
    if all(c == 1 for c in logit_counts):
        logits_rows = torch.cumsum(query_lens, 0) - 1
    else:
        rows, end = [], 0
        for q, c in zip(q_lens, logit_counts):
            end += q
            rows.extend(range(end - c, end))
        logits_rows = torch.tensor(rows, dtype=torch.int64, device=device)
    num_decodes = next((i for i, q in enumerate(q_lens) if q != 1), num_seqs)
    decode_blocks = -(-max(ctx_lens[:num_decodes], default=1) // bs)
    decode_tables = block_tables[:num_decodes, :decode_blocks]
    key_index = torch.arange(decode_blocks * bs, device=device)
    decode_mask = (key_index < context_lens[:num_decodes, None]).view(num_decodes, 1, 1, len(key_index))
    prefills = []
    for i in range(num_decodes, num_seqs):
        n, ctx = q_lens[i], ctx_lens[i]
        token_start = sum(q_lens[:i])
        if ctx == n:
            prefills.append(PrefillSpan(token_start, n, ctx, None, None))
            continue
        query_pos = torch.arange(ctx - n, ctx, device=device)
        mask = torch.arange(ctx, device=device)[None, :] <= query_pos[:, None]
        prefills.append(PrefillSpan(token_start, n, ctx, block_tables[i, :-(-ctx // bs)], mask))
    meta = AttentionMetadata(slot_mapping, num_decodes, decode_tables, decode_mask, prefills)
    return StepInputs(input_ids, positions, logits_rows, meta)


def decode_plan(batch: int) -> StepPlan:
    """One decode step of ``batch`` sequences, each ~CONTEXT tokens in (lengths differ, as in a real batch)."""
    blocks_per_seq = -(-(CONTEXT + batch) // BLOCK_SIZE)
    seqs = []
    for i in range(batch):
        length = CONTEXT - batch // 2 + i
        seq = Sequence(f"s{i}", [(7 * i + j) % 1000 for j in range(length)], SamplingParams(temperature=0))
        seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        seq.num_computed_tokens = length - 1
        seqs.append(seq)
    return pack_step(seqs, [1] * batch, BLOCK_SIZE)


def per_call_us(fn, repeats: int) -> float:
    """Median over 5 rounds of the mean time of one call, in microseconds."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats // 5):
            fn()
        rounds.append((time.perf_counter() - start) / (repeats // 5) * 1e6)
    return statistics.median(rounds)


def cpu_lines() -> list[str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    name = [line for line in out if line.startswith("Model name")]
    flags = next((line.split(":", 1)[1].split() for line in out if line.startswith("Flags")), [])
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2")
    return [*name, "Flags (avx2/avx512/amx): " + " ".join(wanted)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--no-step", action="store_true", help="skip timing a whole decode step")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention figures (and bf16 steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--step-repeats", type=int, default=5, help="bf16 decode steps per attention path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_parallel_context(ParallelContext(0, 1))
    blocks = sum(-(-(CONTEXT + b) // BLOCK_SIZE) * b for b in BATCHES)
    runner = ModelRunner(RunnerSpec(str(resolve_model(MODEL)), "float32", "cpu", BLOCK_SIZE, blocks))
    print(*cpu_lines(), f"torch {torch.__version__}, {torch.get_num_threads()} threads", sep="\n")
    print(f"\nprepare_inputs, decode, ~{CONTEXT} tokens of context, median of 5 rounds of {args.repeats // 5}")
    print(f"| batch | before (us) | after (us) | after / before | whole step (ms) |\n|---:|---:|---:|---:|---:|")
    for batch in BATCHES:
        plan = decode_plan(batch)
        with torch.inference_mode():
            check_same(legacy_prepare_inputs(runner, plan), runner.prepare_inputs(plan))
            before = per_call_us(lambda: legacy_prepare_inputs(runner, plan), args.repeats)
            after = per_call_us(lambda: runner.prepare_inputs(plan), args.repeats)
        step_ms = float("nan") if args.no_step else per_call_us(lambda: runner.execute(plan), 10) / 1e3
        print(f"| {batch} | {before:.1f} | {after:.1f} | {after / before:.2f}x | {step_ms:.1f} |")
    if not args.no_attention:
        print_attention_calibration()
        print_bf16_decode_steps(args.step_repeats)


def print_bf16_decode_steps(repeats: int) -> None:
    """Whole bf16 decode steps with decode attention in bf16 and upcast to float32, alternating (fastest of each)."""
    blocks = sum(-(-(CONTEXT + b) // BLOCK_SIZE) * b for b in BATCHES)
    runner = ModelRunner(RunnerSpec(str(resolve_model(MODEL)), "bfloat16", "cpu", BLOCK_SIZE, blocks, calibrate=False))
    print(f"\nbf16 decode step (ms), context ~{CONTEXT}, fastest of {repeats} alternating steps")
    print("| batch | attention bf16 | attention float32 | float32 / bf16 |\n|---:|---:|---:|---:|")
    for batch in BATCHES:
        plan, best = decode_plan(batch), {False: float("inf"), True: float("inf")}
        for _ in range(repeats):
            for upcast in (False, True):
                runner.use_attention_choice(AttentionChoice(((1, upcast),)))
                start = time.perf_counter()
                runner.execute(plan)
                best[upcast] = min(best[upcast], time.perf_counter() - start)
        print(f"| {batch} | {best[False] * 1e3:.1f} | {best[True] * 1e3:.1f} | {best[True] / best[False]:.2f}x |")


def print_attention_calibration() -> None:
    """The calibration's own measurement (fastest of its timed calls) for SmolLM2's heads per rank."""
    print(f"\ndecode attention, context {calibration.CONTEXT}, bf16 vs upcast to float32 (calibration.measure)")
    print("| heads per rank | batch | bf16 (us) | float32 (us) | bf16 / float32 | choice |")
    print("|---|---:|---:|---:|---:|---|")
    for label, shape in [("9/3x64 (tp=1)", AttentionShape(9, 3, 64)), ("3/1x64 (tp=3)", AttentionShape(3, 1, 64))]:
        for case in calibration.measure(shape, torch.bfloat16):
            ratio = case["model_dtype_us"] / case["float32_us"]
            print(f"| {label} | {case['batch']} | {case['model_dtype_us']:.0f} | {case['float32_us']:.0f} "
                  f"| {ratio:.2f}x | {'float32' if case['upcast'] else 'bf16'} |")


def check_same(a: StepInputs, b: StepInputs) -> None:
    """Both builders give the same step (so the timing compares like with like)."""
    for x, y in [(a.input_ids, b.input_ids), (a.positions, b.positions), (a.logits_rows, b.logits_rows),
                 (a.meta.slot_mapping, b.meta.slot_mapping), (a.meta.decode_block_tables, b.meta.decode_block_tables),
                 (a.meta.decode_mask, b.meta.decode_mask)]:
        assert torch.equal(x, y), (x, y)
    assert a.meta.num_decodes == b.meta.num_decodes


if __name__ == "__main__":
    main()
