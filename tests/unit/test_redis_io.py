"""producer.redis_io: one plan, carried out by the sync and the asyncio runner alike (fakeredis)."""
from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest
import redis

from producer.redis_io import Call, Close, Pause, Pipelined, Plan, run, run_async


class BrokenPubSub:
    """A pub/sub whose close fails, as on a connection that is already gone."""

    closed = 0

    def close(self) -> None:
        BrokenPubSub.closed += 1
        raise redis.ConnectionError("gone")

    async def aclose(self) -> None:
        self.close()


def every_step(conn) -> Plan[list]:
    """A plan that takes every kind of step and recovers from a failed command."""
    yield Call(lambda: conn.set("k", "v"))
    value = yield Call(lambda: conn.get("k"))

    def two(pipe) -> None:
        pipe.incr("n")
        pipe.incr("n")

    counts = yield Pipelined(conn, two)
    yield Pause(0.01)
    yield Close(BrokenPubSub())
    try:
        yield Call(lambda: conn.hget("k", "field"))  # WRONGTYPE: raised into the plan
    except redis.ResponseError as e:
        recovered = type(e).__name__
    return [value, counts, recovered]


def test_both_runners_carry_out_the_same_plan():
    BrokenPubSub.closed = 0
    server = fakeredis.FakeServer()
    started = time.monotonic()
    sync = run(every_step(fakeredis.FakeRedis(server=server)))
    assert time.monotonic() - started >= 0.01

    async def scenario():
        conn = fakeredis.FakeAsyncRedis(server=server)
        await conn.delete("n")
        try:
            return await run_async(every_step(conn))
        finally:
            await conn.aclose()

    assert sync == asyncio.run(scenario()) == [b"v", [1, 2], "ResponseError"]
    assert BrokenPubSub.closed == 2  # a failing close is swallowed, by both


def test_an_error_the_plan_does_not_handle_leaves_the_runner():
    def plan(conn) -> Plan[None]:
        yield Call(lambda: conn.set("k", "v"))
        yield Call(lambda: conn.hget("k", "field"))
        raise AssertionError("not reached")

    with pytest.raises(redis.ResponseError):
        run(plan(fakeredis.FakeRedis()))


def test_a_plan_that_needs_no_step_returns_at_once():
    def plan() -> Plan[int]:
        if False:
            yield Pause(1)
        return 7

    assert run(plan()) == 7 and asyncio.run(run_async(plan())) == 7
