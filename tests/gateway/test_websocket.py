"""``GET /v1/ws``: many requests over one WebSocket, each answered with chunks tagged with the client's id.

A real uvicorn gateway on a real redis-server; tests.doubles.ProtocolWorker
plays the worker, so every token a message carries is one the test wrote.
"""
from __future__ import annotations

import asyncio
import json
import threading

import websockets

from common import keys
from tests.gateway.conftest import FAKE_MODEL, register_fake_group, wait_for

TEXTS = ["Hel", "lo", "!"]


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/v1/ws"


async def replies_until_done(socket, ids: set[str]) -> dict[str, list[dict]]:
    """Every message until each of ``ids`` got its ``done`` (or error, or cancelled), by id."""
    got: dict[str, list[dict]] = {i: [] for i in ids}
    finished: set[str] = set()
    while finished != ids:
        message = json.loads(await asyncio.wait_for(socket.recv(), 30))
        got.setdefault(message["id"], []).append(message)
        if message.get("done") or message.get("error") or message.get("cancelled"):
            finished.add(message["id"])
    return got


def serve(worker, count: int) -> threading.Thread:
    thread = threading.Thread(target=lambda: [worker.run(TEXTS) for _ in range(count)], daemon=True)
    thread.start()
    return thread


def test_concurrent_requests_on_one_socket_are_answered_by_their_ids(start_gateway, redis_url, worker):
    register_fake_group(redis_url)
    gateway = start_gateway()

    async def scenario():
        async with websockets.connect(ws_url(gateway.url)) as socket:
            chat = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
            await socket.send(json.dumps({"type": "chat.completions", "id": "a", "body": chat}))
            await socket.send(json.dumps({"type": "completions", "id": "b",
                                          "body": {"model": FAKE_MODEL, "prompt": "x"}}))
            thread = serve(worker, 2)
            got = await replies_until_done(socket, {"a", "b"})
            thread.join(10)
            return got

    got = asyncio.run(scenario())
    chat_chunks = [m["data"] for m in got["a"] if "data" in m]
    assert chat_chunks[0]["object"] == "chat.completion.chunk" and chat_chunks[0]["choices"][0]["delta"]["role"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chat_chunks) == "".join(TEXTS)
    assert chat_chunks[-1]["choices"][0]["finish_reason"] == "stop" and got["a"][-1] == {"id": "a", "done": True}
    text_chunks = [m["data"] for m in got["b"] if "data" in m]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == "".join(TEXTS)
    assert {c["id"] for c in text_chunks} == {text_chunks[0]["id"]} and text_chunks[0]["id"].startswith("cmpl-")
    assert [m["event_id"] for m in got["b"] if "data" in m][-1] == str(len(TEXTS) - 1)


def test_bad_messages_get_errors_and_the_socket_stays_open(start_gateway, redis_url, worker):
    register_fake_group(redis_url)
    gateway = start_gateway()

    async def scenario():
        async with websockets.connect(ws_url(gateway.url)) as socket:
            answers = []
            for bad in ["not json", json.dumps([1]), json.dumps({"type": "nope", "id": "x"}),
                        json.dumps({"type": "completions", "id": "", "body": {}}),
                        json.dumps({"type": "completions", "id": "m", "body": {"model": "other", "prompt": "x"}}),
                        json.dumps({"type": "completions", "id": "t", "body": {"model": FAKE_MODEL, "prompt": "x",
                                                                              "tools": [{"type": "function"}]}}),
                        json.dumps({"type": "cancel", "id": "never"})]:
                await socket.send(bad)
                answers.append(json.loads(await asyncio.wait_for(socket.recv(), 10)))
            await socket.send(json.dumps({"type": "completions", "id": "ok",
                                          "body": {"model": FAKE_MODEL, "prompt": "x"}}))
            thread = serve(worker, 1)
            got = await replies_until_done(socket, {"ok"})
            thread.join(10)
            return answers, got

    answers, got = asyncio.run(scenario())
    assert all("error" in a for a in answers), answers
    assert [a["id"] for a in answers] == [None, None, "x", "", "m", "t", "never"]
    assert answers[2]["error"]["param"] == "type" and answers[4]["error"]["code"] == "not_found"
    assert answers[5]["error"]["param"] == "tools"
    assert got["ok"][-1] == {"id": "ok", "done": True}


def test_cancel_stops_one_request_and_cancels_its_job(start_gateway, redis_url, worker):
    register_fake_group(redis_url)
    gateway = start_gateway()

    async def scenario():
        async with websockets.connect(ws_url(gateway.url)) as socket:
            body = {"model": FAKE_MODEL, "prompt": "x", "max_tokens": 100}
            await socket.send(json.dumps({"type": "completions", "id": "long", "body": body}))
            running = await asyncio.to_thread(worker.take)
            await asyncio.to_thread(worker.emit, running, ["a"])
            first = json.loads(await asyncio.wait_for(socket.recv(), 10))
            assert first["id"] == "long" and first["data"]["choices"][0]["text"] == "a"
            await socket.send(json.dumps({"type": "cancel", "id": "long"}))
            got = await replies_until_done(socket, {"long"})
            await asyncio.to_thread(wait_for, lambda: worker.cancel_requested(running), "the job's cancel flag")
            return running, got

    running, got = asyncio.run(scenario())
    assert got["long"][-1] == {"id": "long", "cancelled": True}
    assert worker.conn.exists(keys.cancel_flag(running.id))
