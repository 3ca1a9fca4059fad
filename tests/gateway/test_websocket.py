"""``GET /v1/ws``: many requests over one WebSocket, each answered with chunks tagged with the client's id.

A real uvicorn gateway on a real redis-server; tests.doubles.ProtocolWorker
plays the worker, so every token a message carries is one the test wrote.
Enqueues the tests hold are held after their jobs exist in Redis, before
the gateway hears back: the window a cancel or a close can fall into.
"""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import redis
import websockets

from common import keys
from common.settings import get_settings
from producer import Client
from producer.gateway import websocket
from producer.gateway.auth import create_key
from producer.gateway.completions import Completions
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


# ------------------------------------------------------------------ rate limits per request


def test_each_request_on_a_socket_is_charged_to_the_keys_limits(start_gateway, redis_url, worker):
    register_fake_group(redis_url)
    with redis.Redis.from_url(redis_url) as conn:
        key, _ = create_key(conn, "ws", rpm=2, tpm=1000)
    gateway = start_gateway()
    body = {"model": FAKE_MODEL, "prompt": "x", "max_tokens": 5}

    async def scenario():
        async with websockets.connect(ws_url(gateway.url), additional_headers={"Authorization": f"Bearer {key}"}
                                      ) as socket:
            thread = serve(worker, 2)
            got = {}
            for request_id, request in [("a", body), ("huge", {**body, "max_tokens": 2000}), ("b", body),
                                        ("c", body)]:  # one at a time: the order they reach the limiter is known
                await socket.send(json.dumps({"type": "completions", "id": request_id, "body": request}))
                got.update(await replies_until_done(socket, {request_id}))
            thread.join(10)
            await socket.send(json.dumps({"type": "cancel", "id": "none"}))  # the socket is still open
            still_open = json.loads(await asyncio.wait_for(socket.recv(), 10))
            http = await asyncio.to_thread(httpx.get, f"{gateway.url}/v1/models",
                                           headers={"Authorization": f"Bearer {key}"})
            return got, still_open, http

    got, still_open, http = asyncio.run(scenario())
    assert got["a"][-1] == {"id": "a", "done": True} and got["b"][-1] == {"id": "b", "done": True}  # the handshake
    huge = got["huge"][-1]["error"]  # is not charged: two requests pass an rpm=2 key
    assert (huge["code"], huge["type"]) == ("rate_limit_exceeded", "tokens") and "Request too large" in huge["message"]
    assert "retry_after" not in huge, "a request larger than the limit itself got a retry hint"
    [refused] = got["c"]
    assert set(refused) == {"id", "error"} and refused["id"] == "c"
    assert set(refused["error"]) == {"message", "type", "param", "code", "retry_after"}
    assert (refused["error"]["code"], refused["error"]["type"]) == ("rate_limit_exceeded", "requests")
    assert "requests per minute (RPM): Limit 2" in refused["error"]["message"]
    assert still_open["id"] == "none" and "no request" in still_open["error"]["message"]
    assert http.status_code == 429, "the socket's requests were the key's: HTTP must be refused too"
    retry_after = refused["error"]["retry_after"]  # rpm=2 refills one request in 30 s; HTTP asked a moment later
    assert isinstance(retry_after, int) and 1 <= retry_after <= 30, retry_after
    assert 0 <= retry_after - int(http.headers["Retry-After"]) <= 1, (retry_after, http.headers["Retry-After"])


def test_a_full_queue_refusal_on_a_socket_carries_the_http_retry_after(start_gateway, redis_url):
    register_fake_group(redis_url)
    gateway = start_gateway(max_queue_depth=1)
    with Client(settings=get_settings(redis_url=redis_url, max_queue_depth=1)) as python_client:
        python_client.submit("fills the batch queue")
    body = {"model": FAKE_MODEL, "prompt": "x", "max_tokens": 5}
    http = httpx.post(f"{gateway.url}/v1/completions", json=body)
    assert http.status_code == 429 and http.json()["error"]["code"] == "queue_full", http.text

    async def scenario():
        async with websockets.connect(ws_url(gateway.url)) as socket:
            await socket.send(json.dumps({"type": "completions", "id": "full", "body": body}))
            return await replies_until_done(socket, {"full"})

    [refused] = asyncio.run(scenario())["full"]
    assert refused["error"]["code"] == "queue_full", refused
    assert refused["error"]["retry_after"] == int(http.headers["Retry-After"]), (refused, http.headers)


def test_a_batch_keys_socket_requests_run_at_batch_priority(start_gateway, redis_url, worker):
    register_fake_group(redis_url)
    with redis.Redis.from_url(redis_url) as conn:
        key, _ = create_key(conn, "ws-batch", priority="batch")
    gateway = start_gateway()

    async def scenario():
        async with websockets.connect(ws_url(gateway.url), additional_headers={"Authorization": f"Bearer {key}"}
                                      ) as socket:
            await socket.send(json.dumps({"type": "completions", "id": "a",
                                          "body": {"model": FAKE_MODEL, "prompt": "x", "priority": "interactive"}}))
            thread = serve(worker, 1)
            got = await replies_until_done(socket, {"a"})
            thread.join(10)
            return got

    assert asyncio.run(scenario())["a"][-1] == {"id": "a", "done": True}
    [running] = worker.served
    assert running.request.priority == "batch"


# ------------------------------------------------------------------ a request whose enqueue is in flight


class HeldEnqueue:
    """Holds every enqueue of the gateway after its jobs exist in Redis, before the gateway hears back."""

    def __init__(self, monkeypatch) -> None:
        self.enqueued = threading.Event()
        self.job_ids: list[str] = []
        self._gates: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        create = Completions.create

        async def held(service, *args, **kwargs):
            record, handles = await create(service, *args, **kwargs)
            gate = asyncio.Event()
            self._gates.append((asyncio.get_running_loop(), gate))
            self.job_ids += [h.id for h in handles]
            self.enqueued.set()
            await gate.wait()
            return record, handles

        monkeypatch.setattr(Completions, "create", held)

    def release(self) -> None:
        for loop, gate in self._gates:
            loop.call_soon_threadsafe(gate.set)


def test_a_cancel_that_arrives_while_the_request_is_being_enqueued_cancels_its_jobs(start_gateway, redis_url,
                                                                                   monkeypatch):
    register_fake_group(redis_url)
    held = HeldEnqueue(monkeypatch)
    cancel_taken = threading.Event()
    cancel = websocket.Socket.cancel

    async def taking_cancel(socket, request_id):
        cancel_taken.set()  # the original stops the request before its first await: before release() below
        await cancel(socket, request_id)

    monkeypatch.setattr(websocket.Socket, "cancel", taking_cancel)
    gateway = start_gateway()

    async def scenario():
        async with websockets.connect(ws_url(gateway.url)) as socket:
            await socket.send(json.dumps({"type": "completions", "id": "x",
                                          "body": {"model": FAKE_MODEL, "prompt": "x", "n": 2}}))
            assert await asyncio.to_thread(held.enqueued.wait, 10), "the enqueue did not happen"
            await socket.send(json.dumps({"type": "cancel", "id": "x"}))
            assert await asyncio.to_thread(cancel_taken.wait, 10), "the cancel did not arrive"
            held.release()
            return await replies_until_done(socket, {"x"})

    got = asyncio.run(scenario())
    assert got["x"] == [{"id": "x", "cancelled": True}]
    with redis.Redis.from_url(redis_url) as conn:
        assert len(held.job_ids) == 2
        assert all(conn.exists(keys.cancel_flag(job_id)) for job_id in held.job_ids), "a job runs on"
        assert all(conn.hget(keys.rq_job_key(job_id), "status") == b"canceled" for job_id in held.job_ids)


def test_jobs_whose_socket_closed_while_they_were_enqueued_get_the_disconnect_grace(start_gateway, redis_url,
                                                                                     monkeypatch):
    register_fake_group(redis_url)
    held = HeldEnqueue(monkeypatch)
    served = threading.Event()
    serve_socket = websocket.Socket.serve

    async def observed_serve(socket):
        try:
            await serve_socket(socket)
        finally:
            served.set()

    monkeypatch.setattr(websocket.Socket, "serve", observed_serve)
    gateway = start_gateway(http_disconnect_grace_s=0)

    async def scenario():
        async with websockets.connect(ws_url(gateway.url)) as socket:
            await socket.send(json.dumps({"type": "completions", "id": "x",
                                          "body": {"model": FAKE_MODEL, "prompt": "x"}}))
            assert await asyncio.to_thread(held.enqueued.wait, 10), "the enqueue did not happen"
        assert await asyncio.to_thread(served.wait, 10), "the gateway did not see the socket close"
        held.release()

    asyncio.run(scenario())
    [job_id] = held.job_ids
    with redis.Redis.from_url(redis_url) as conn:
        wait_for(lambda: conn.hget(keys.rq_job_key(job_id), "status") == b"canceled", "the abandoned job's cancel",
                 timeout_s=10)
