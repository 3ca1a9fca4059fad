"""Sampling parameters of one generation request (validated, immutable)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-5  # smaller, non-zero temperatures overflow the scaled logits to inf (NaN probabilities)
MAX_LOGPROBS = 20  # the most alternatives per position, as OpenAI's top_logprobs


class SamplingParams(BaseModel):
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy decoding; any other temperature must be at
    least ``MIN_TEMPERATURE`` (1e-5). ``top_k == 0`` and ``top_p == 1``
    disable those filters. A ``seed`` makes a sampled request reproducible on
    its own, whatever else shares its batch.

    ``logprobs=k`` (0..20) makes every sampled token's event carry its
    log-probability and the ``k`` most likely tokens at its position;
    ``prompt_logprobs=k`` makes the result carry the same for every prompt
    token (given the tokens before it). ``None`` (the default) turns either
    off. They are the model's raw log-probabilities: the fp32 log-softmax of
    its logits, before temperature, top-k and top-p.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    max_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = Field((), max_length=MAX_STOP_STRINGS)
    stop_token_ids: tuple[int, ...] = Field((), max_length=MAX_STOP_STRINGS)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)  # strict: True is no count
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)

    @field_validator("temperature")
    @classmethod
    def _temperature_is_usable(cls, temperature: float) -> float:
        if 0.0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; smaller values "
                             "overflow the model's scaled logits")
        return temperature

    @field_validator("stop")
    @classmethod
    def _stop_strings_are_usable(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        for s in stop:
            if not s:
                raise ValueError("stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_are_non_negative(cls, ids: tuple[int, ...]) -> tuple[int, ...]:
        if any(i < 0 for i in ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
