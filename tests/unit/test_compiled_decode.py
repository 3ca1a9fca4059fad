"""The compiled decode path (gpu_worker/engine/compiled_decode.py) against eager and transformers, tp=1.

One compiled runner (batch sizes 1, 2, 4: a few compiles of a two-layer
model) serves the whole module; each test uses its own blocks of its cache.
"""
import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec
from gpu_worker.engine.plan import pack_step
from gpu_worker.engine.sequence import Sequence
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context
from gpu_worker.llm import Engine
from tests.checkpoints import hf_greedy, hf_reference_logits
from tests.parity import BLOCK_SIZE, NUM_BLOCKS, paged_logits

pytestmark = pytest.mark.slow  # a cold compile takes tens of seconds on two cores

TOLERANCE = 1e-4


def make_runner(model_dir, enforce_eager: bool) -> ModelRunner:
    set_parallel_context(ParallelContext(0, 1))
    # the eager side on torch ops too (no fused CPU kernels), as the compiled path's own fallback runs
    return ModelRunner(RunnerSpec(str(model_dir), "float32", "cpu", BLOCK_SIZE, NUM_BLOCKS, calibrate=False,
                                  max_num_seqs=4, enforce_eager=enforce_eager, cpu_kernels=False))


@pytest.fixture(scope="module")
def compiled(tiny_llama_dir):
    runner = make_runner(tiny_llama_dir, enforce_eager=False)
    assert runner.compiled.sizes == (1, 2, 4) and runner.compile_s > 0
    return runner


@pytest.fixture(scope="module")
def eager(tiny_llama_dir):
    runner = make_runner(tiny_llama_dir, enforce_eager=True)
    assert runner.compiled is None and runner.compile_s is None
    return runner


def count_compiled_steps(runner: ModelRunner, monkeypatch) -> list[int]:
    """Record the padded batch of each step that runs compiled."""
    calls, forward = [], runner.compiled.forward
    monkeypatch.setattr(runner.compiled, "forward", lambda ids, *rest: calls.append(len(ids)) or forward(ids, *rest))
    return calls


def decoding_batch(lengths: list[int], first_block: int) -> tuple[list[Sequence], list[list[int]]]:
    """Sequences of ``lengths`` random tokens, each with its own blocks from ``first_block`` on."""
    gen, seqs, ids = torch.Generator().manual_seed(sum(lengths)), [], []
    blocks_each = -(-(max(lengths) + 1) // BLOCK_SIZE)
    for i, n in enumerate(lengths):
        ids.append(torch.randint(0, 500, (n,), generator=gen).tolist())
        seq = Sequence(f"s{i}", ids[-1][:-1], SamplingParams(temperature=0))
        seq.block_table = list(range(first_block + i * blocks_each, first_block + (i + 1) * blocks_each))
        seqs.append(seq)
    return seqs, ids


def run_batch(runner: ModelRunner, lengths: list[int], first_block: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill each sequence but its last token, then decode that token for all of them in one step."""
    seqs, ids = decoding_batch(lengths, first_block)
    for seq in seqs:
        runner.execute(pack_step([seq], [seq.num_tokens], BLOCK_SIZE))
        seq.num_computed_tokens = seq.num_tokens
    for seq, tokens in zip(seqs, ids):
        seq.append_token(tokens[-1])
    return runner.execute(pack_step(seqs, [1] * len(seqs), BLOCK_SIZE)), ids


def test_compiled_decodes_match_transformers_and_eager(tiny_llama_dir, compiled, eager, monkeypatch):
    token_ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    calls = count_compiled_steps(compiled, monkeypatch)
    logits, positions = paged_logits(compiled.execute, token_ids, prefill_chunks=[10])
    assert calls == [1] * (len(token_ids) - 10)                   # every decode step, no prefill
    reference = hf_reference_logits(tiny_llama_dir, token_ids)
    assert (logits - reference[positions]).abs().max().item() <= TOLERANCE
    eager_logits, _ = paged_logits(eager.execute, token_ids, prefill_chunks=[10])
    assert torch.equal(logits.argmax(-1), eager_logits.argmax(-1))
    assert (logits - eager_logits).abs().max().item() <= TOLERANCE


def test_greedy_tokens_match_transformers(tiny_llama_dir, compiled):
    prompt = [5, 17, 230, 41, 9, 88]
    seq = Sequence("g", prompt, SamplingParams(temperature=0))
    seq.block_table = list(range(20, 24))
    tokens = []
    for n in [len(prompt)] + [1] * 7:
        next_token = int(compiled.execute(pack_step([seq], [n], BLOCK_SIZE))[0].argmax())
        seq.num_computed_tokens += n
        seq.append_token(next_token)
        tokens.append(next_token)
    assert tokens == hf_greedy(tiny_llama_dir, prompt, len(tokens))


def test_three_sequences_padded_to_four(tiny_llama_dir, compiled, eager, monkeypatch):
    calls = count_compiled_steps(compiled, monkeypatch)
    logits, ids = run_batch(compiled, [7, 13, 5], first_block=30)
    assert calls == [4] and logits.shape[0] == 3                  # padded rows' logits dropped
    eager_logits, _ = run_batch(eager, [7, 13, 5], first_block=30)
    assert (logits - eager_logits).abs().max().item() <= TOLERANCE
    for row, tokens in zip(logits, ids):
        assert (row - hf_reference_logits(tiny_llama_dir, tokens)[-1]).abs().max().item() <= TOLERANCE


def test_batch_above_largest_size_runs_eagerly(tiny_llama_dir, compiled, eager, monkeypatch):
    calls = count_compiled_steps(compiled, monkeypatch)
    logits, ids = run_batch(compiled, [3, 4, 5, 6, 7], first_block=46)
    assert calls == [] and compiled.compiled.padded_size(5) is None
    eager_logits, _ = run_batch(eager, [3, 4, 5, 6, 7], first_block=46)
    assert torch.equal(logits, eager_logits)


def test_engine_with_compiled_decode_generates_eager_tokens(tiny_llama_dir):
    """Batches that grow and shrink (6 prompts, 4 at a time, a small cache: preemption) through a whole engine."""
    gen = torch.Generator().manual_seed(7)
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=gen).tolist()} for n in (3, 9, 14, 5, 11, 7)]
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for eager in (True, False):
        with Engine(str(tiny_llama_dir), block_size=BLOCK_SIZE, max_num_seqs=4, num_kv_blocks=16,
                    enforce_eager=eager) as engine:
            runner = engine.llm.executor.runner
            assert (runner.compile_s is None) == eager
            outputs[eager] = [r.token_ids for r in engine.generate(prompts, sampling)]
            assert engine.llm.scheduler.num_preemptions > 0
    assert outputs[False] == outputs[True]
