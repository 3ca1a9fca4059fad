"""The one-call decode program against the op-by-op path of the same runner, what it covers, and when it runs."""
from __future__ import annotations

import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec
from gpu_worker.engine.plan import pack_step
from gpu_worker.engine.sequence import Sequence
from gpu_worker.kernels import decode_program
from gpu_worker.kernels.decode_program import DecodeProgram
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context
from gpu_worker.llm import Engine
from tests.checkpoints import hf_reference_logits
from tests.parity import BLOCK_SIZE, NUM_BLOCKS, paged_logits

BF16_RMS = 0.05  # bf16 against float32 transformers (tests/unit/test_calibration.py measured 0.03)


def make_runner(model_dir, dtype: str, quantization: str | None = None, **options) -> ModelRunner:
    set_parallel_context(ParallelContext(0, 1))
    return ModelRunner(RunnerSpec(str(model_dir), dtype, "cpu", BLOCK_SIZE, NUM_BLOCKS, calibrate=False,
                                  quantization=quantization, **options))


def count_program_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    run = DecodeProgram.__call__

    def counted(self, input_ids, positions, meta):
        calls.append(input_ids.shape[0])
        return run(self, input_ids, positions, meta)

    monkeypatch.setattr(DecodeProgram, "__call__", counted)
    return calls


def decode_batch(runner: ModelRunner, lengths: list[int], first_block: int) -> torch.Tensor:
    """Prefill one sequence per length in one step, then decode one token for all: that step's logits."""
    gen = torch.Generator().manual_seed(sum(lengths))
    seqs = [Sequence(f"s{i}", torch.randint(3, 500, (n,), generator=gen).tolist(), SamplingParams(temperature=0))
            for i, n in enumerate(lengths)]
    for i, seq in enumerate(seqs):
        seq.block_table = [first_block + 3 * i + b for b in range(3)]
    runner.execute(pack_step(seqs, [len(s.token_ids) for s in seqs], BLOCK_SIZE))
    for seq in seqs:
        seq.num_computed_tokens = len(seq.token_ids)
        seq.append_token(7)
    return runner.execute(pack_step(seqs, [1] * len(seqs), BLOCK_SIZE))            # [seqs, vocab]


@pytest.mark.parametrize("dtype,quantization,kv_cache_dtype", [
    ("float32", "int8", "auto"), ("bfloat16", "int8", "auto"), ("bfloat16", None, "auto"),
    ("float32", "int8", "fp8"), ("bfloat16", "int8", "fp8"),   # the program writes e4m3 as torch's cast rounds
])
def test_the_program_gives_the_logits_of_the_op_by_op_path(tiny_llama_dir, monkeypatch, dtype, quantization,
                                                            kv_cache_dtype):
    calls = count_program_calls(monkeypatch)
    program = make_runner(tiny_llama_dir, dtype, quantization, kv_cache_dtype=kv_cache_dtype)
    assert program.program is not None
    ops = make_runner(tiny_llama_dir, dtype, quantization, kv_cache_dtype=kv_cache_dtype)
    ops.program = None                                         # the same kernels, layer by layer from Python
    token_ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    logits, positions = paged_logits(program.execute, token_ids, prefill_chunks=[9, 5])   # then 10 decodes
    expected, _ = paged_logits(ops.execute, token_ids, prefill_chunks=[9, 5])
    assert calls == [1] * 10                                   # every decode step, no prefill
    batch = decode_batch(program, [3, 6, 9, 4, 7], first_block=30)
    assert calls[-1] == 5
    batch_expected = decode_batch(ops, [3, 6, 9, 4, 7], first_block=30)
    if quantization is not None:  # the same C kernels in the same order: equal up to float32 summation order
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch, batch_expected, rtol=1e-4, atol=1e-4)
        return
    # dense bf16: the program's own matrix-vector product against torch's; both within bf16 of float32
    reference = hf_reference_logits(tiny_llama_dir, token_ids)[positions]          # [12, vocab]
    for got in (logits, expected):
        rms = ((got - reference).square().mean() / reference.square().mean()).sqrt()
        assert rms <= BF16_RMS, rms
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_more_sequences_than_the_program_takes_run_op_by_op(tiny_llama_dir, monkeypatch):
    calls = count_program_calls(monkeypatch)
    runner = make_runner(tiny_llama_dir, "float32", "int8")
    ops = make_runner(tiny_llama_dir, "float32", "int8")
    ops.program = None
    lengths = [3, 4, 5, 6, 7, 3, 4, 5, 6]                      # 9 > decode_program.MAX_SEQS
    assert len(lengths) > decode_program.MAX_SEQS
    logits = decode_batch(runner, lengths, first_block=2)
    assert calls == []
    torch.testing.assert_close(logits, decode_batch(ops, lengths, first_block=2), rtol=0, atol=0)


@pytest.mark.parametrize("options,reason", [
    ({"dtype": "float32"}, "qkv_proj: LinearKernel"),                    # fp32 dense: only oneDNN's packed copy
    ({"dtype": "float32", "quantization": "int8", "cpu_kernels": False}, None),  # no kernels: no program at all
])
def test_what_the_program_does_not_cover_runs_op_by_op_and_says_why(tiny_llama_dir, options, reason):
    runner = make_runner(tiny_llama_dir, options.pop("dtype"), options.pop("quantization", None), **options)
    assert runner.program is None
    if reason is not None:
        assert reason in DecodeProgram.unsupported(runner.model, runner.kv_cache, 1)
        assert "tensor parallelism" in DecodeProgram.unsupported(runner.model, runner.kv_cache, 3)


def test_a_program_refuses_a_step_it_does_not_cover(tiny_llama_dir):
    runner = make_runner(tiny_llama_dir, "float32", "int8")
    seq = Sequence("s", list(range(3, 12)), SamplingParams(temperature=0))
    seq.block_table = [1, 2, 3]
    inputs = runner.prepare_inputs(pack_step([seq], [9], BLOCK_SIZE))                # a prefill
    with pytest.raises(ValueError, match="decode steps of 1..8"):
        runner.program(inputs.input_ids, inputs.positions, inputs.meta)


def test_an_engine_on_the_program_generates_the_op_by_op_tokens(tiny_llama_dir, monkeypatch):
    """A whole engine (batches that grow and shrink, a small cache: preemption) in bf16 int8, program on and off."""
    calls = count_program_calls(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=gen).tolist()} for n in (3, 9, 14, 5, 11, 7)]
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for on in (True, False):
        with Engine(str(tiny_llama_dir), dtype="float32", quantization="int8", block_size=BLOCK_SIZE, max_num_seqs=4,
                    num_kv_blocks=16) as engine:
            if not on:
                engine.llm.executor.runner.program = None
            outputs[on] = [r.token_ids for r in engine.generate(prompts, sampling)]
            assert engine.llm.scheduler.num_preemptions > 0
    assert calls and outputs[True] == outputs[False]
