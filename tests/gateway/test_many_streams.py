"""500 concurrent streams through one gateway: all complete, on at most 8 Redis connections.

The streams are opened while no worker serves the queue (a registered
stand-in group makes the gateway accept them), so all 500 are open at once
when the gateway's connections are counted (CLIENT LIST, by the names its
client gives them); then a real group of the tiny model starts, drains the
queue, and every stream must end with ``[DONE]`` and text equal to the
finished completion's.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import redis

from tests.gateway.conftest import register_fake_group

pytestmark = pytest.mark.slow

STREAMS = 500
MAX_TOKENS = 8
MAX_GATEWAY_CONNECTIONS = 8


def gateway_connections(redis_url: str) -> list[str]:
    with redis.Redis.from_url(redis_url) as conn:
        return [c["name"] for c in conn.client_list() if c["name"].startswith("tpq-gateway")]


async def open_streams_metric(http: httpx.AsyncClient, url: str) -> float:
    """The gateway's ``tpq_http_open_streams``."""
    for line in (await http.get(f"{url}/metrics")).text.splitlines():
        if line.startswith("tpq_http_open_streams "):
            return float(line.split()[1])
    raise AssertionError("the gateway exports no tpq_http_open_streams")


async def open_streams(url: str, model: str, opened: asyncio.Event, release_count: list[int], http: httpx.AsyncClient,
                       i: int) -> tuple[str, str, bool]:
    """Stream one chat; ``(completion id, joined text, ended with [DONE])``."""
    body = {"model": model, "messages": [{"role": "user", "content": f"question {i % 7}"}], "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    text, cid, done = [], "", False
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        release_count[0] += 1
        if release_count[0] == STREAMS:
            opened.set()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            cid = chunk["id"]
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
    return cid, "".join(text), done


def test_500_streams_complete_on_at_most_8_connections(start_stack, start_gateway, redis_url, tiny_llama_dir):
    model = str(tiny_llama_dir)
    register_fake_group(redis_url, model=model)  # the gateway accepts; nothing serves the queue yet
    gateway = start_gateway()

    async def scenario():
        limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=STREAMS + 10)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as http:
            opened, count = asyncio.Event(), [0]
            tasks = [asyncio.ensure_future(open_streams(gateway.url, model, opened, count, http, i))
                     for i in range(STREAMS)]
            await asyncio.wait_for(opened.wait(), 120)  # every response started: its stream opens next
            deadline = asyncio.get_running_loop().time() + 30
            while (open_now := await open_streams_metric(http, gateway.url)) < STREAMS:
                assert asyncio.get_running_loop().time() < deadline, f"only {open_now} streams opened"
                await asyncio.sleep(0.05)
            names = await asyncio.to_thread(gateway_connections, redis_url)  # all 500 open now
            assert len(names) <= MAX_GATEWAY_CONNECTIONS, f"{len(names)} gateway connections: {sorted(names)}"
            await asyncio.to_thread(start_stack, 1, 1, model)
            streamed = await asyncio.gather(*tasks)
            # A fresh pool for the lookups: the streams' connections sat idle past the server's keep-alive
            # while the slowest streams finished, and reusing one the server is closing is a ReadError.
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32), timeout=60.0) as lookups:
                finished = await asyncio.gather(*(lookups.get(f"{gateway.url}/v1/chat/completions/{cid}")
                                                  for cid, _, _ in streamed))
            after = await asyncio.to_thread(gateway_connections, redis_url)  # the result waits' one is in now
            assert len(after) <= MAX_GATEWAY_CONNECTIONS, f"{len(after)} gateway connections: {sorted(after)}"
            return names, streamed, [f.json() for f in finished]

    names, streamed, finished = asyncio.run(scenario())
    assert all(done for _, _, done in streamed)
    assert len({cid for cid, _, _ in streamed}) == STREAMS
    for (cid, text, _), answer in zip(streamed, finished):
        assert answer["id"] == cid and answer["choices"][0]["message"]["content"] == text
        assert answer["usage"]["completion_tokens"] == MAX_TOKENS
    print(f"gateway connections with {STREAMS} open streams: {len(names)} {sorted(names)}")
