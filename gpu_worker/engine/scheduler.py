"""Continuous batching: which sequences run in the next step, and how many tokens each (torch-free).

Every step has a token budget. Running sequences go first, oldest first: a
decoding sequence takes one token, a sequence still prefilling takes the
next chunk of its prompt. Waiting sequences are then admitted, interactive
before batch, while the budget, the running-sequence cap and free KV blocks
allow. When a running sequence needs a block and none is free, the newest
running sequence is preempted: its blocks are freed and it waits again, to
be recomputed (cheaply, where its blocks are still in the prefix cache).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from common.results import FinishReason
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.engine.sequence import Priority, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        assert self.max_num_seqs > 0 and self.max_num_batched_tokens > 0


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes its next ``num_new_tokens[i]`` tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Decides each step's batch from the token budget, the sequence cap and free KV blocks."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: dict[Priority, deque[Sequence]] = {p: deque() for p in Priority}
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queries -------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    # -- admission and removal -----------------------------------------------
    def add(self, seq: Sequence) -> None:
        needed = self.block_manager.blocks_for(seq.num_tokens + 1)
        assert needed <= self.block_manager.num_blocks, "callers reject prompts that cannot fit the cache"
        seq.status = SequenceStatus.WAITING
        self.waiting[seq.priority].append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Stop ``seq`` (running or waiting) and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting[seq.priority].remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- the step ------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_new, batch):
                continue
            batch.add(seq, num_new)
            budget -= num_new
        if batch.num_preempted == 0:
            self._admit_waiting(batch, budget)
        return batch

    def on_step_done(self, batch: ScheduledBatch) -> list[int]:
        """Advance computed counts; returns the batch rows whose next token is sampled now.

        A sequence midway through a chunked prefill samples nothing yet.
        """
        rows = []
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                rows.append(row)
        return rows

    def _make_room(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Find blocks for ``seq``, preempting the newest running sequences; False if ``seq`` itself went."""
        while not self.block_manager.append_slots(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            batch.num_preempted += 1
            if victim is seq:
                return False
            assert victim not in batch.seqs, "victims are newer than seq, so not yet scheduled"
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting[seq.priority].appendleft(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        for priority in Priority:
            queue = self.waiting[priority]
            while queue and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = queue[0]
                cached = [] if seq.needs_prompt_logits else self.block_manager.match_prefix(seq)
                num_cached = len(cached) * self.block_manager.block_size
                num_new = min(seq.num_tokens - num_cached, budget)
                if not self.block_manager.allocate(seq, cached, num_new):
                    return  # first come, first served: nobody overtakes a sequence waiting for space
                queue.popleft()
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
                    seq.num_cached_tokens = num_cached
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                batch.add(seq, num_new)
                budget -= num_new
