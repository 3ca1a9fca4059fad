"""Per-key rate limits, held in Redis so that they bind every gateway replica: requests and tokens per minute.

Each limited key has two token buckets in one hash (``tpq:ratelimit:<id>``),
updated by one Lua script (atomic, every key it touches in KEYS): a bucket
holds up to its limit, refills continuously at limit/60 per second, and a
request takes from it. So at most ``rpm`` requests (``tpm`` tokens) pass in
any minute after an idle one, bursts included, and the budget comes back
smoothly rather than at a window's edge. The time is Redis's own (``TIME``),
the same for every replica; tests pass theirs instead.

Tokens are charged at admission, before anything is enqueued, as the
gateway has no tokenizer: ``max_tokens`` (or its default) times the number
of jobs, plus a prompt estimate of its characters / 4, rounded up (a token-id
prompt counts its ids). A non-streamed answer then corrects the charge to
its real ``usage.total_tokens``; a request that fails before its jobs are
enqueued gets its charge back; a streamed one keeps the estimate.

A WebSocket (``GET /v1/ws``) is charged per request it carries, not for
its handshake: each request sent over it takes one request and its token
estimate (:func:`admit` with ``requests=1``), and a refused one is answered
on the socket with the same error, tagged with the request's id. Batch
lines are not charged at all: see :mod:`producer.gateway.batch_keeper`.

Every ``/v1`` response of a key with limits carries OpenAI's headers
(``x-ratelimit-limit-requests``, ``-remaining-``, ``-reset-`` and the same for
``-tokens``, where reset is the time until the bucket is full, as ``"1s"`` or
``"6m0s"``). A refusal is a 429 (``rate_limit_exceeded``) naming the limit
and when to retry, with ``Retry-After`` in seconds, and is counted in
``tpq_http_rate_limited_total{limit}``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio

from common import keys
from common.metrics import HTTP_RATE_LIMITED
from common.sampling import SamplingParams
from common.settings import Settings
from producer.gateway.errors import APIError
from producer.gateway.params import Completion

if TYPE_CHECKING:
    from producer.gateway.auth import ApiKey

log = logging.getLogger(__name__)

WINDOW_MS = 60_000
"""A limit is per minute: a bucket refills from empty to full in this many milliseconds."""
PROMPT_CHARS_PER_TOKEN = 4
"""Characters of prompt the admission estimate counts as one token."""
LIMITS = ("requests", "tokens")

# KEYS[1]: the key's buckets. ARGV[1]: now in ms ('' for Redis's TIME), ARGV[2], ARGV[3]: the requests and tokens
# limits per minute (0: none), ARGV[4], ARGV[5]: requests and tokens to take, ARGV[6]: '1' to take without a check
# (a correction after the fact; negative gives back). Refills both buckets for the time since the last call, then
# takes from both or, if either holds too little, from neither. Returns {refused (0, 1 requests, 2 tokens), ms to
# wait (-1: never, more than the limit), requests remaining, ms until full, tokens remaining, ms until full}.
_TAKE_SCRIPT = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local caps = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local takes = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local elapsed = math.max(0, now - (tonumber(state[3]) or now))
local levels = {0, 0}
for i = 1, 2 do
  if caps[i] > 0 then
    levels[i] = math.min(caps[i], (tonumber(state[i]) or caps[i]) + elapsed * caps[i] / 60000)
  end
end
local refused, wait = 0, 0
if ARGV[6] ~= '1' then
  for i = 1, 2 do
    if refused == 0 and caps[i] > 0 and takes[i] > 0 and levels[i] < takes[i] then
      refused = i
      if takes[i] > caps[i] then wait = -1 else wait = math.ceil((takes[i] - levels[i]) * 60000 / caps[i]) end
    end
  end
end
local out = {refused, wait}
local ttl = 1000
for i = 1, 2 do
  if caps[i] > 0 then
    if refused == 0 then levels[i] = math.min(caps[i], math.max(-caps[i], levels[i] - takes[i])) end
    local full_in = math.ceil((caps[i] - levels[i]) * 60000 / caps[i])
    ttl = math.max(ttl, full_in + 1000)
    table.insert(out, math.floor(levels[i]))
    table.insert(out, full_in)
  else
    table.insert(out, 0)
    table.insert(out, 0)
  end
end
redis.call('HSET', KEYS[1], 'r', tostring(levels[1]), 't', tostring(levels[2]), 'ts', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return out
"""


def format_reset(ms: int) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's): ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms" if ms > 0 else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


@dataclass(frozen=True)
class Bucket:
    """One limit's state after a call: the limit, what remains now, and milliseconds until it is full again."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class Verdict:
    """What the limiter decided: ``refused`` (None, ``"requests"`` or ``"tokens"``), the wait, each bucket."""

    refused: str | None
    retry_ms: int | None  # None: never (the request needs more than the limit itself)
    requests: Bucket | None
    tokens: Bucket | None

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits the key has."""
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(bucket.remaining, 0))
                headers[f"x-ratelimit-reset-{name}"] = format_reset(bucket.reset_ms)
        return headers


class RateLimiter:
    """Takes requests and tokens from a key's buckets in Redis (one script call); ``clock`` (s) for tests."""

    def __init__(self, conn: redis.asyncio.Redis, clock: Callable[[], float] | None = None) -> None:
        self.conn, self.clock = conn, clock
        self._script = conn.register_script(_TAKE_SCRIPT)

    async def take(self, key: ApiKey, *, requests: int = 0, tokens: int = 0, force: bool = False) -> Verdict:
        """Take ``requests`` and ``tokens`` from ``key``'s buckets if both hold enough (or always, ``force``)."""
        now = "" if self.clock is None else str(int(self.clock() * 1000))
        reply = await self._script(keys=[keys.rate_limit(key.key_id)],
                                   args=[now, key.rpm or 0, key.tpm or 0, requests, tokens, "1" if force else "0"])
        refused, wait, r_left, r_reset, t_left, t_reset = (int(part) for part in reply)
        return Verdict(refused=LIMITS[refused - 1] if refused else None, retry_ms=None if wait < 0 else wait,
                       requests=Bucket(key.rpm, r_left, r_reset) if key.rpm else None,
                       tokens=Bucket(key.tpm, t_left, t_reset) if key.tpm else None)


def refusal(verdict: Verdict, key: ApiKey, requested: int) -> APIError:
    """The 429 of a refused request, in OpenAI's words, with ``Retry-After`` (counted in the metrics)."""
    limit = verdict.refused or "requests"
    HTTP_RATE_LIMITED.labels(limit).inc()
    bucket = verdict.requests if limit == "requests" else verdict.tokens
    per_minute = f"{limit} per minute ({'RPM' if limit == 'requests' else 'TPM'})"
    assert bucket is not None, "a refusal comes from a bucket the key has"
    if verdict.retry_ms is None:
        return APIError(429, f"Request too large for key {key.name!r} on {per_minute}: Limit {bucket.limit}, "
                             f"Requested {requested}. Lower max_tokens (or n, or the prompt) to fit in the limit.",
                        code="rate_limit_exceeded", type_=limit)
    retry_s = max(1, math.ceil(verdict.retry_ms / 1000))
    return APIError(429, f"Rate limit reached for key {key.name!r} on {per_minute}: Limit {bucket.limit}, "
                         f"Remaining {max(bucket.remaining, 0)}, Requested {requested}. Please try again in "
                         f"{format_reset(verdict.retry_ms)}.",
                    code="rate_limit_exceeded", type_=limit, headers={"Retry-After": str(retry_s)})


@dataclass
class KeyContext:
    """What the key check leaves a ``/v1`` request: its key (None while open), the limiter, the latest verdict."""

    key: ApiKey | None
    limiter: RateLimiter | None = None
    verdict: Verdict | None = None

    async def take(self, **amounts: Any) -> Verdict:
        """:meth:`RateLimiter.take` for this request's key; remembered for the response's headers."""
        assert self.key is not None and self.limiter is not None
        self.verdict = await self.limiter.take(self.key, **amounts)
        return self.verdict


STATE_KEY = "tpq_key"
"""Where in the ASGI scope's ``state`` the key check leaves its :class:`KeyContext`."""


def context_of(request: Any) -> KeyContext | None:
    """The :class:`KeyContext` the key check left on ``request`` (None outside ``/v1``)."""
    return request.scope.get("state", {}).get(STATE_KEY)


def estimate_tokens(completion: Completion, settings: Settings) -> int:
    """Tokens charged at admission: ``max_tokens`` (or the default) per job plus characters / 4 per prompt."""
    max_tokens = completion.sampling.get("max_tokens")
    if max_tokens is None:
        max_tokens = min(SamplingParams.model_fields["max_tokens"].default, settings.max_tokens_limit)
    return max_tokens * completion.num_jobs + sum(_prompt_tokens(given) for given in completion.inputs)


def _prompt_tokens(given: dict[str, Any]) -> int:
    prompt = given.get("prompt", given.get("prompt_token_ids"))
    if isinstance(prompt, list):
        return len(prompt)  # token ids: exact
    if isinstance(prompt, str):
        chars = len(prompt)
    else:
        chars = sum(len(str(m.get("content") or "")) for m in given.get("messages") or ())
    return math.ceil(chars / PROMPT_CHARS_PER_TOKEN)


@dataclass
class TokenCharge:
    """The tokens one completion was charged at admission, to correct once its real usage is known."""

    context: KeyContext | None = None
    charged: int = 0

    @contextlib.asynccontextmanager
    async def refunded_on_error(self) -> AsyncIterator[None]:
        """Give the charge back if the body raises (nothing was enqueued: bad model, queue full, ...)."""
        try:
            yield
        except BaseException:
            await self._correct(-self.charged)
            raise

    async def settle(self, answer: dict[str, Any]) -> None:
        """Correct the charge to ``answer``'s ``usage.total_tokens``."""
        used = (answer.get("usage") or {}).get("total_tokens")
        if isinstance(used, int):
            await self._correct(used - self.charged)

    async def _correct(self, delta: int) -> None:
        if self.context is None or not delta:
            return
        try:
            await self.context.take(tokens=delta, force=True)
            self.charged += delta
        except Exception:  # a lost correction only leaves the estimate charged: never fail the answer for it
            log.warning("gateway: could not correct key %r's token charge by %d", self.context.key, delta,
                        exc_info=True)


async def admit(request: Any, completion: Completion, settings: Settings, *,
                requests: int = 0) -> tuple[Completion, TokenCharge]:
    """Apply the request's key to ``completion``: its priority cap, then its per-minute charge (429).

    A ``batch`` key's completions run at batch priority whatever they ask.
    ``requests``: requests to take with the tokens, in the same call (a
    WebSocket's requests: the key check counted only the HTTP ones). Returns
    the completion to run and its :class:`TokenCharge`.
    """
    context = context_of(request)
    key = context.key if context is not None else None
    if key is None:
        return completion, TokenCharge()
    if key.priority == "batch" and completion.priority != "batch":
        completion = dataclasses.replace(completion, priority="batch")
    tokens = estimate_tokens(completion, settings) if key.tpm else 0
    requests = requests if key.rpm else 0
    if not tokens and not requests:
        return completion, TokenCharge()
    verdict = await context.take(requests=requests, tokens=tokens)
    if verdict.refused is not None:
        raise refusal(verdict, key, tokens if verdict.refused == "tokens" else requests)
    return completion, TokenCharge(context, tokens) if tokens else TokenCharge()
