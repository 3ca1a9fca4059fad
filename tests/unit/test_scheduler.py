"""Scheduler: token budget, sequence cap, priorities, chunked prefill, preemption (no torch)."""
from common.results import FinishReason
from common.sampling import SamplingParams
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.engine.scheduler import Scheduler, SchedulerConfig
from gpu_worker.engine.sequence import Priority, Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_seqs=8, budget=64):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_seqs, budget), bm)


def seq(n, rid, priority=Priority.INTERACTIVE, first=0):
    return Sequence(rid, list(range(first, first + n)), SamplingParams(temperature=0), priority)


def step(sched, token=1):
    """One scheduler step with a fake model: every sampled sequence gets ``token``."""
    batch = sched.schedule()
    for row in sched.on_step_done(batch):
        batch.seqs[row].append_token(token)
    return batch


def test_prefill_then_decode_in_one_loop():
    s = make()
    a = seq(10, "a")
    s.add(a)
    batch = step(s)
    assert batch.seqs == [a] and batch.num_new_tokens == [10]
    b = seq(5, "b", first=100)
    s.add(b)
    batch = step(s)
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 5]   # a decodes while b prefills
    c = seq(6, "c")                                                   # shares a's first block
    s.add(c)
    assert step(s).num_new_tokens == [1, 1, 2]


def test_token_budget_chunks_long_prompts():
    s = make(budget=16)
    a = seq(40, "a")
    s.add(a)
    assert step(s).num_new_tokens == [16]
    assert step(s).num_new_tokens == [16]
    assert a.num_generated_tokens == 0                     # mid-prefill: nothing sampled yet
    assert step(s).num_new_tokens == [8]
    assert a.num_generated_tokens == 1


def test_max_running_sequences_is_respected():
    s = make(max_seqs=2)
    for i in range(4):
        s.add(seq(3, f"r{i}", first=10 * i))
    step(s)
    assert len(s.running) == 2 and s.num_waiting == 2


def test_interactive_admitted_before_batch():
    s = make(max_seqs=1)
    s.add(seq(3, "batch", Priority.BATCH))
    s.add(seq(3, "chat", Priority.INTERACTIVE, first=50))
    assert [q.request_id for q in step(s).seqs] == ["chat"]


def test_preemption_when_blocks_run_out_and_everything_still_finishes():
    s = make(num_blocks=6, block_size=2, max_seqs=4, budget=64)
    seqs = [seq(3, f"r{i}", first=10 * i) for i in range(3)]
    for q in seqs:
        s.add(q)
    for _ in range(200):
        if not s.has_unfinished():
            break
        step(s)
        for q in list(s.running):
            if q.num_generated_tokens >= 5:
                s.finish(q, FinishReason.LENGTH)
    assert not s.has_unfinished()
    assert s.num_preemptions > 0
    assert all(q.status is SequenceStatus.FINISHED and q.num_generated_tokens == 5 for q in seqs)
    assert s.block_manager.num_free_blocks == 6


def test_preempted_sequence_is_recomputed_with_its_generated_tokens():
    s = make(num_blocks=4, block_size=2, max_seqs=2, budget=64)
    a, b = seq(3, "a"), seq(3, "b", first=20)
    s.add(a)
    s.add(b)
    step(s)                                   # both prefilled: 2 blocks each, cache full
    step(s)                                   # both decode their 4th token: still fits
    batch = step(s)                           # a needs a third block: b (newest) is preempted
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert batch.num_preempted == 1 and b not in batch.seqs
    assert b.token_ids[:3] == [20, 21, 22] and b.num_generated_tokens == 2


def test_finish_waiting_sequence_removes_it():
    s = make()
    a = seq(3, "a")
    s.add(a)
    s.finish(a, FinishReason.CANCELLED)
    assert not s.has_unfinished() and a.finish_reason is FinishReason.CANCELLED
