"""What a generation produces: token events while it runs, a result at the end."""
from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

TopLogprobs = list[tuple[int, float]]
"""The most likely tokens at one position, most likely first: ``[(token_id, logprob), ...]``."""


class FinishReason(str, Enum):
    """Why a sequence stopped generating."""

    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_tokens, or the model's context is full
    DEADLINE = "deadline"    # the request's deadline passed while it ran
    CANCELLED = "cancelled"  # the client cancelled it


class ChatMessage(BaseModel):
    """One turn of a chat, rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class Usage(BaseModel):
    """Token counts of one request. ``cached_tokens`` of the prompt came from the prefix cache."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(ge=0)
    cached_tokens: int = Field(ge=0)
    generated_tokens: int = Field(ge=0)


class Timings(BaseModel):
    """Wall-clock seconds: waiting before the first schedule, to the first token, in all."""

    model_config = ConfigDict(extra="forbid")

    queue_s: float = Field(ge=0.0)
    time_to_first_token_s: float = Field(ge=0.0)
    total_s: float = Field(ge=0.0)


class TokenLogprob(BaseModel):
    """One token's log-probability at its position and the ``k`` most likely tokens there.

    The model's raw distribution: the fp32 log-softmax of its logits, before
    temperature, top-k and top-p. ``logprob`` is None for a prompt's first
    token (nothing precedes it) and for tokens an earlier run streamed
    without it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_id: int = Field(ge=0)
    logprob: float | None = None
    top_logprobs: TopLogprobs = Field(default_factory=list)


def _drop_none(data: dict, names: tuple[str, ...]) -> dict:
    """``data`` without those of ``names`` whose value is None: the wire stays as it was when they are off."""
    for name in names:
        if name in data and data[name] is None:
            del data[name]
    return data


class TokenEvent(BaseModel):
    """One sampled token of one request, in order: ``index`` counts from 0 with no gaps.

    ``text`` is the valid UTF-8 text this token completes (possibly empty while
    a multi-byte character is still incomplete). The last event of a request
    carries its ``finish_reason``. With ``SamplingParams.logprobs=k`` it
    carries the token's ``logprob`` and ``top_logprobs`` (k pairs, most
    likely first); without, neither field is written at all.
    """

    model_config = ConfigDict(extra="forbid")

    request_id: str
    index: int = Field(ge=0)
    token_id: int = Field(ge=0)
    text: str
    finish_reason: FinishReason | None = None
    sampled_at: float | None = Field(None, description="Unix time the token was sampled (set by the engine).")
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_logprobs(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("logprob", "top_logprobs"))

    def token_logprob(self) -> TokenLogprob:
        """This event's token and its log-probabilities (``logprob`` None when the event has none)."""
        return TokenLogprob(token_id=self.token_id, logprob=self.logprob, top_logprobs=self.top_logprobs or [])


class GenerationResult(BaseModel):
    """The finished output of one request.

    ``logprobs`` (with ``SamplingParams.logprobs``): one entry per generated
    token, as its events carried. ``prompt_logprobs`` (with
    ``SamplingParams.prompt_logprobs``): one entry per prompt token, the
    first with ``logprob`` None. Absent from the serialized result when not asked.
    """

    model_config = ConfigDict(extra="forbid")

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_logprobs(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("logprobs", "prompt_logprobs"))


class StreamEnd(BaseModel):
    """The last message of a job's token stream: no token follows it.

    ``num_tokens`` is how many token events precede it (indices ``0 ..
    num_tokens - 1``). A job that finished (any :class:`FinishReason`,
    including ``cancelled`` and ``deadline``) has ``finish_reason`` set; a job
    the worker failed has ``error`` set instead.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["end"] = "end"
    request_id: str
    num_tokens: int = Field(ge=0)
    finish_reason: FinishReason | None = None
    error: str | None = None


class JobResult(GenerationResult):
    """A finished job's result as stored by rq: the generation plus where it ran."""

    group: str = Field(description="The worker group that finished the job.")
    attempt: int = Field(1, ge=1, description="1 for a first run, more when it resumed after a failure.")
