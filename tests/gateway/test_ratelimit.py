"""Rate limits per API key: the Lua buckets on a real redis-server (with a test clock), and the gateway's 429s.

The gateway runs on Redis's own clock; its tests stay far inside a minute,
where a bucket of ``rpm`` requests refills by less than one request.
"""
from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest
import redis
import redis.asyncio

from common import keys
from common.settings import get_settings
from producer.gateway.auth import ApiKey, create_key
from producer.gateway.params import parse_chat, parse_completion
from producer.gateway.ratelimit import RateLimiter, estimate_tokens, format_reset
from tests.gateway.conftest import FAKE_MODEL, keyed_sdk

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def conn(redis_url):
    with redis.Redis.from_url(redis_url) as connection:
        yield connection


def error_of(caught: pytest.ExceptionInfo) -> dict:
    body = caught.value.body
    return body.get("error", body)


# ------------------------------------------------------------------ no I/O


@pytest.mark.parametrize("ms, text", [
    (0, "0s"), (12, "12ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"), (30_000, "30s"), (59_999, "59.999s"),
    (60_000, "1m0s"), (360_000, "6m0s"), (90_500, "1m30.5s"), (3_600_000, "1h0m0s"), (3_723_000, "1h2m3s"),
])
def test_resets_are_written_as_openai_writes_them(ms, text):
    assert format_reset(ms) == text


def test_the_token_estimate_is_max_tokens_per_job_plus_a_quarter_of_the_prompt_characters():
    settings = get_settings(max_tokens_limit=100)
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x" * 9}], "max_tokens": 10, "n": 3})
    assert estimate_tokens(chat, settings) == 10 * 3 + 3  # ceil(9 / 4)
    text = parse_completion({"model": "m", "prompt": ["abcd", "abcde"], "max_tokens": 5})
    assert estimate_tokens(text, settings) == 5 * 2 + 1 + 2
    token_ids = parse_completion({"model": "m", "prompt": [[1, 2, 3], [4]], "max_tokens": 2})
    assert estimate_tokens(token_ids, settings) == 2 * 2 + 3 + 1  # token ids are counted, not estimated
    default = parse_chat({"model": "m", "messages": MESSAGES})
    assert estimate_tokens(default, settings) == 100 + 1  # the default max_tokens, capped as the client caps it


# ------------------------------------------------------------------ the buckets on Redis, with a test clock


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Limiter:
    """A :class:`RateLimiter` on the test Redis whose clock the test moves; each call on its own event loop."""

    def __init__(self, url: str) -> None:
        self.url, self.clock = url, Clock()

    def take(self, key: ApiKey, **amounts: object):
        async def run():
            async with redis.asyncio.Redis.from_url(self.url) as conn:
                return await RateLimiter(conn, self.clock).take(key, **amounts)

        return asyncio.run(run())


@pytest.fixture
def limiter(redis_url):
    return Limiter(redis_url)


def test_a_request_bucket_refuses_past_its_limit_and_refills_over_the_minute(limiter, conn):
    key = ApiKey(key_id="k1", name="k1", prefix="tpq-k1", created=0, rpm=2)
    first, second, third = (limiter.take(key, requests=1) for _ in range(3))
    assert (first.refused, first.requests.remaining, first.requests.reset_ms) == (None, 1, 30_000)
    assert (second.refused, second.requests.remaining, second.requests.reset_ms) == (None, 0, 60_000)
    assert (third.refused, third.retry_ms, third.requests.remaining) == ("requests", 30_000, 0)
    assert third.tokens is None and "x-ratelimit-limit-tokens" not in third.headers()
    assert third.headers() == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-reset-requests": "1m0s"}
    assert 60_000 < conn.pttl(keys.rate_limit("k1")) <= 61_000  # gone once it would be full again

    limiter.clock.now += 29.999
    assert limiter.take(key, requests=1).refused == "requests"
    limiter.clock.now += 0.001
    assert limiter.take(key, requests=1).refused is None
    limiter.clock.now += 3600  # an idle hour: full, never more than the limit
    assert limiter.take(key).requests.remaining == 2


def test_a_token_bucket_charges_refunds_and_refuses_what_can_never_fit(limiter):
    key = ApiKey(key_id="k2", name="k2", prefix="tpq-k2", created=0, rpm=10, tpm=600)
    assert limiter.take(key, requests=1, tokens=500).tokens.remaining == 100
    refused = limiter.take(key, requests=1, tokens=101)
    assert (refused.refused, refused.retry_ms) == ("tokens", 100)  # 1 token more, 10 tokens a second
    assert refused.requests.remaining == 9  # a refusal takes nothing from either bucket
    assert limiter.take(key, tokens=-450, force=True).tokens.remaining == 550  # the real usage was lower
    assert limiter.take(key, tokens=1000, force=True).tokens.remaining == -450  # or higher: a debt
    too_large = limiter.take(key, tokens=601)
    assert (too_large.refused, too_large.retry_ms) == ("tokens", None)


# ------------------------------------------------------------------ through the gateway


def rate_limited_total(base: str, limit: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f'tpq_http_rate_limited_total{{limit="{limit}"}}'):
            return float(line.split()[-1])
    return 0.0


def requests_total(base: str, route: str, status: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f'tpq_http_requests_total{{route="{route}",status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_the_third_request_of_a_two_rpm_key_is_a_429_with_openais_headers(gateway, conn):
    key, _ = create_key(conn, "two", rpm=2)
    base = gateway()
    client = keyed_sdk(base, key)
    refused_before = rate_limited_total(base, "requests")
    refused_429s_before = requests_total(base, "/v1/models", "429")
    first = client.models.with_raw_response.list()
    second = client.models.with_raw_response.list()
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second)] == ["1", "0"]
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-reset-requests"]
    assert "x-ratelimit-limit-tokens" not in first.headers  # the key has no tokens limit
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    headers = caught.value.response.headers
    assert 29 <= int(headers["retry-after"]) <= 30
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-requests"] == "2"
    error = error_of(caught)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert "requests per minute (RPM): Limit 2" in error["message"]
    assert re.search(r"try again in (29\.\d+|30)s\.", error["message"]), error["message"]
    assert rate_limited_total(base, "requests") == refused_before + 1
    assert requests_total(base, "/v1/models", "429") == refused_429s_before + 1  # its route's, not "unmatched"


def test_limits_hold_across_two_gateway_replicas(gateway, conn):
    key, _ = create_key(conn, "shared", rpm=3)
    one, two = keyed_sdk(gateway(), key), keyed_sdk(gateway(), key)
    remaining = [int(c.models.with_raw_response.list().headers["x-ratelimit-remaining-requests"])
                 for c in (one, two, one)]
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError):
        two.models.list()
    with pytest.raises(openai.RateLimitError):
        one.models.list()


def test_a_tpm_key_is_charged_its_estimate_corrected_by_the_usage_and_refused_past_it(gateway, conn, worker,
                                                                                       redis_url):
    key, _ = create_key(conn, "tokens", tpm=100)
    base = gateway()
    client = keyed_sdk(base, key)
    thread = worker.run_in_thread(["a", "b"])
    answer = client.chat.completions.with_raw_response.create(model=FAKE_MODEL, messages=MESSAGES, max_tokens=40)
    thread.join(timeout=30)
    assert worker.errors == []
    usage = answer.parse().usage.total_tokens  # 3 prompt (the fake worker's) + 2 completion tokens
    assert usage == 5
    assert answer.headers["x-ratelimit-limit-tokens"] == "100" and "x-ratelimit-limit-requests" not in answer.headers
    assert 95 <= int(answer.headers["x-ratelimit-remaining-tokens"]) <= 96  # 41 charged, 36 given back

    refused_before = rate_limited_total(base, "tokens")
    with pytest.raises(openai.RateLimitError) as caught:  # 96 + ceil(2 / 4) = 97 > ~95
        client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, max_tokens=96)
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 2
    error = error_of(caught)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert "tokens per minute (TPM): Limit 100" in error["message"] and "Requested 97" in error["message"]
    with pytest.raises(openai.RateLimitError, match="Request too large") as caught:
        client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, max_tokens=100)
    assert "retry-after" not in caught.value.response.headers
    assert rate_limited_total(base, "tokens") == refused_before + 2
    assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0  # nothing refused was enqueued


def test_a_request_that_fails_before_enqueueing_gets_its_tokens_back(gateway, conn):
    key, _ = create_key(conn, "refund", tpm=1000)
    base = gateway(max_prompt_chars=100)
    client = keyed_sdk(base, key)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="TPQ_MAX_PROMPT_CHARS"):  # prompts are bounded (the client's)
        client.completions.create(model=FAKE_MODEL, prompt="x" * 101, max_tokens=500)
    after = client.models.with_raw_response.list()
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000
