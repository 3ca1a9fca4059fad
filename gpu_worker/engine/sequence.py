"""One request's tokens and bookkeeping inside the engine (torch-free)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from common.results import FinishReason, TokenLogprob
from common.sampling import SamplingParams

_next_seq_id = itertools.count()


class Priority(IntEnum):
    """Scheduling class: interactive requests are admitted before batch ones."""

    INTERACTIVE = 0
    BATCH = 1


class SequenceStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt plus the tokens generated so far.

    ``num_computed_tokens`` of ``token_ids`` have their keys and values in the
    KV cache; a step computes some of the rest (a prefill chunk, or the one
    newest token when decoding). ``block_table`` lists the cache blocks that
    hold the sequence, in order. With ``sampling.prompt_logprobs``,
    ``prompt_logprobs`` fills up, one entry per prompt token, as prefill
    steps compute the logits of every prompt position.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: Priority = Priority.INTERACTIVE
    arrival_time: float = field(default_factory=time.monotonic)

    seq_id: int = field(default_factory=lambda: next(_next_seq_id))
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0           # prompt tokens served by the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.prompt_logprobs = None
        if self.sampling.prompt_logprobs is not None and self.prompt_token_ids:
            self.prompt_logprobs = [TokenLogprob(token_id=self.prompt_token_ids[0])]  # nothing precedes it

    @property
    def needs_prompt_logits(self) -> bool:
        """True while some prompt position's logits are still to be computed for ``prompt_logprobs``.

        Such a sequence takes nothing from the prefix cache: its cached
        positions would have no logits.
        """
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
