"""A client that reads slower than its job generates: bounded buffers in the gateway, and still every token once."""
from __future__ import annotations

import json

import httpx

from producer import pubsub_mux
from producer.gateway import streaming
from tests.gateway.conftest import FAKE_MODEL, register_fake_group, wait_for
from tests.gateway.sse import sse_events

TOKENS = 3000
STREAM_BUFFER = 4
HUB_BUFFER = 8


def test_a_stalled_client_costs_bounded_buffers_and_still_gets_every_token(start_gateway, redis_url, worker,
                                                                           monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BUFFER", STREAM_BUFFER)
    monkeypatch.setattr(pubsub_mux, "MAX_BUFFERED", HUB_BUFFER)
    register_fake_group(redis_url)
    server = start_gateway(http_disconnect_grace_s=60)
    hub = server.server.config.app.state.completions.client._streams
    # 2 kB a token, 6 MB in all: more than the sockets buffer, so the gateway has to hold back
    texts = [f"<{i:05d}>" + "x" * 2000 for i in range(TOKENS)]
    body = {"model": FAKE_MODEL, "prompt": "a slow reader", "max_tokens": TOKENS, "stream": True}

    def subscriptions():
        return [member for entry in list(hub._channels.values()) for member in entry.members]

    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            running = worker.take()
            worker.emit(running, texts)  # the client reads nothing meanwhile
            worker.succeed(running)
            wait_for(lambda: any(s.dropped for s in subscriptions()), "the hub to drop messages of the stalled stream")
            assert all(s.buffered <= HUB_BUFFER for s in subscriptions())
            events = [e for e in sse_events(response.iter_lines())]
    chunks = [json.loads(e["data"]) for e in events if e["data"] != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "".join(texts)  # every token once, in order: the dropped ones came from the log
    token_ids = [int(e["id"]) for e in events]
    assert token_ids == sorted(token_ids) and token_ids[-1] == TOKENS - 1
    assert events[-1]["data"] == "[DONE]"
