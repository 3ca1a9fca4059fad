"""`ModelRunner.prepare_inputs`: index tensors equal a plain-Python reference, built in the preallocated buffers."""
from __future__ import annotations

import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec, StepInputs
from gpu_worker.engine.plan import pack_step
from gpu_worker.engine.sequence import Sequence
from gpu_worker.layers.attention import DecodeScratch
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context

BLOCK_SIZE = 4
NUM_BLOCKS = 128


@pytest.fixture(scope="module")
def runner(tiny_llama_dir) -> ModelRunner:
    set_parallel_context(ParallelContext(0, 1))
    return ModelRunner(RunnerSpec(str(tiny_llama_dir), "float32", "cpu", BLOCK_SIZE, NUM_BLOCKS,
                                  max_num_seqs=4, max_num_batched_tokens=32))


def sequence(name: str, length: int, computed: int, first_block: int) -> Sequence:
    """A sequence of ``length`` tokens, ``computed`` of them in the cache, blocks from ``first_block`` (scattered)."""
    seq = Sequence(name, [(7 * first_block + j) % 500 for j in range(length)], SamplingParams(temperature=0))
    seq.block_table = [(first_block + 3 * b) % NUM_BLOCKS for b in range(-(-length // BLOCK_SIZE))]
    seq.num_computed_tokens = computed
    return seq


def expected_inputs(seqs: list[Sequence], num_new: list[int], logit_counts: list[int]) -> dict:
    """The step's index tensors, spelled out one token at a time (the reference)."""
    positions, slots, rows, masks, row = [], [], [], [], 0
    for seq, n, count in zip(seqs, num_new, logit_counts):
        ctx = seq.num_computed_tokens + n
        for pos in range(ctx - n, ctx):
            positions.append(pos)
            slots.append(seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        rows.extend(range(row + n - count, row + n))
        row += n
        if n > 1 and ctx != n:
            masks.append([[k <= pos for k in range(ctx)] for pos in range(ctx - n, ctx)])
    decodes = [s for s, n in zip(seqs, num_new) if n == 1]
    width = -(-max((s.num_computed_tokens + 1 for s in decodes), default=1) // BLOCK_SIZE) * BLOCK_SIZE
    decode_mask = [[k < s.num_computed_tokens + 1 for k in range(width)] for s in decodes]
    return {"positions": positions, "slots": slots, "rows": rows, "decode_mask": decode_mask, "masks": masks}


def assert_matches(inputs: StepInputs, seqs: list[Sequence], num_new: list[int], logit_counts: list[int]) -> None:
    want = expected_inputs(seqs, num_new, logit_counts)
    meta = inputs.meta
    assert inputs.input_ids.tolist() == [t for s, n in zip(seqs, num_new)
                                         for t in s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n]]
    assert inputs.positions.tolist() == want["positions"]
    assert meta.slot_mapping.tolist() == want["slots"]
    assert inputs.logits_rows.tolist() == want["rows"]
    assert meta.num_decodes == len(want["decode_mask"])
    assert meta.decode_mask.shape[:3] == (meta.num_decodes, 1, 1)
    assert meta.decode_mask.flatten(1).tolist() == want["decode_mask"]
    width = meta.decode_mask.shape[-1] // BLOCK_SIZE
    padded = [(s.block_table + [0] * width)[:width] for s in seqs[:meta.num_decodes]]  # pack_step pads with 0
    assert meta.decode_block_tables.tolist() == padded
    assert [s.mask.tolist() for s in meta.prefills if s.mask is not None] == want["masks"]
    for span, seq in zip(meta.prefills, seqs[meta.num_decodes:]):
        if span.block_table is not None:
            assert span.block_table.tolist() == seq.block_table[:-(-span.context_len // BLOCK_SIZE)]
    assert all(t.dtype == torch.int64 for t in (inputs.input_ids, inputs.positions, meta.slot_mapping))


def step(runner, seqs, num_new, logit_counts=None):
    logit_counts = logit_counts or [1] * len(seqs)
    inputs = runner.prepare_inputs(pack_step(seqs, num_new, BLOCK_SIZE, logit_counts))
    assert_matches(inputs, seqs, num_new, logit_counts)
    return inputs


def test_decode_only_step(runner):
    seqs = [sequence("a", 9, 8, 5), sequence("b", 17, 16, 40), sequence("c", 2, 1, 77)]
    step(runner, seqs, [1, 1, 1])


def test_mixed_step_decodes_fresh_and_cached_prefills(runner):
    seqs = [sequence("d", 13, 12, 3), sequence("fresh", 10, 0, 20), sequence("cached", 19, 8, 60)]
    step(runner, seqs, [1, 10, 11])


def test_prefill_only_step_with_prompt_logits(runner):
    seqs = [sequence("p", 7, 0, 1), sequence("q", 12, 5, 30)]
    step(runner, seqs, [7, 7], logit_counts=[7, 3])


def test_a_step_past_the_planned_sizes_grows_the_buffers(runner):
    """max_num_seqs=4, max_num_batched_tokens=32: nine sequences of ~300 tokens and 48 new ones still come out right."""
    sizes = runner.buffers.ints_np.size, runner.buffers.flags_np.size
    seqs = [sequence(f"s{i}", 300 + i, 299 + i, 4 * i) for i in range(8)] + [sequence("big", 100, 60, 90)]
    step(runner, seqs, [1] * 8 + [40])
    assert runner.buffers.ints_np.size > sizes[0] and runner.buffers.flags_np.size > sizes[1]
    step(runner, seqs[:2], [1, 1])


def test_steps_reuse_the_preallocated_buffers(runner):
    """Two decode steps build into the same memory: nothing per step is freshly allocated."""
    seqs = [sequence("a", 9, 8, 5), sequence("b", 17, 16, 40)]
    first = step(runner, seqs, [1, 1])
    pointers = [t.data_ptr() for t in (first.positions, first.meta.slot_mapping, first.meta.decode_mask)]
    for seq in seqs:
        seq.append_token(3)
        seq.num_computed_tokens += 1
    second = step(runner, seqs, [1, 1])
    assert [t.data_ptr() for t in (second.positions, second.meta.slot_mapping, second.meta.decode_mask)] == pointers
    buffers = runner.buffers
    ints = buffers.ints_np.ctypes.data, buffers.ints_np.ctypes.data + buffers.ints_np.nbytes
    assert all(ints[0] <= p < ints[1] for p in pointers[:2])


def test_decode_scratch_reuses_its_memory_and_keeps_keys_and_values_apart():
    scratch = DecodeScratch(torch.device("cpu"))
    keys, values = scratch.take(0, (4, 8), torch.float32), scratch.take(1, (4, 8), torch.float32)
    assert values.data_ptr() == keys.data_ptr() + keys.nbytes
    assert scratch.take(0, (2, 8), torch.float32).data_ptr() == keys.data_ptr()   # smaller: same memory
    bigger = scratch.take(1, (9, 8), torch.float32)                                # larger: grown
    assert bigger.shape == (9, 8) and bigger.is_contiguous()
    assert scratch.take(0, (3, 8), torch.bfloat16).dtype == torch.bfloat16         # one buffer per dtype
