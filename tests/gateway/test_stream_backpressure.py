"""How a gateway stream reads its jobs: several merged through a bounded queue, one read in the response's task."""
from __future__ import annotations

import json

import httpx

from producer import pubsub_mux
from producer.gateway import streaming
from tests.gateway.conftest import FAKE_MODEL, register_fake_group, wait_for
from tests.gateway.sse import content_of, sse_events

STREAM_BUFFER = 2
HUB_BUFFER = 8


def hub_of(server):
    """The pub/sub hub of the gateway's client: every stream's subscription."""
    return server.server.config.app.state.completions.client._streams


def subscriptions(hub) -> list:
    return [member for entry in list(hub._channels.values()) for member in entry.members]


def test_a_stalled_client_of_two_jobs_holds_both_pumps_back_and_gets_every_token(start_gateway, redis_url, worker,
                                                                                 monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BUFFER", STREAM_BUFFER)
    monkeypatch.setattr(pubsub_mux, "MAX_BUFFERED", HUB_BUFFER)
    register_fake_group(redis_url)
    hub = hub_of(server := start_gateway(http_disconnect_grace_s=60))
    # choice 0: 2 kB a token, 6 MB, more than the sockets buffer, so the client stalls the stream; choice 1's
    # tokens then come while the stream's queue is full: its pump must wait too, not grow the queue
    texts = [[f"<{i:05d}>" + "x" * 2000 for i in range(3000)], [f"[{i:04d}]" for i in range(200)]]
    body = {"model": FAKE_MODEL, "prompt": "two slow choices", "max_tokens": 3000, "n": 2, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            runs = sorted((worker.take() for _ in texts), key=lambda running: running.id)  # choice i: job ...-i
            for running, job_texts in zip(runs, texts):
                worker.emit(running, job_texts)  # the client reads nothing meanwhile
                worker.succeed(running)
            wait_for(lambda: len(subscriptions(hub)) == 2 and all(s.dropped for s in subscriptions(hub)),
                     "both jobs' readers to fall behind their stalled stream (the hub drops their messages)")
            assert all(s.buffered <= HUB_BUFFER for s in subscriptions(hub))
            events = list(sse_events(response.iter_lines()))
    chunks = [json.loads(e["data"]) for e in events if e["data"] != "[DONE]"]
    for choice, job_texts in enumerate(texts):
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice)
        assert text == "".join(job_texts)  # every token once, in order: the dropped ones came from the log
    assert events[-1]["data"] == "[DONE]"
    assert events[-2]["id"] == "2999,199"


def test_a_one_job_stream_whose_client_left_unsubscribes(start_gateway, redis_url, worker):
    register_fake_group(redis_url)
    hub = hub_of(server := start_gateway(http_disconnect_grace_s=60))
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            running = worker.take()
            worker.emit(running, ["one"])
            events = sse_events(response.iter_lines())
            assert next(c for e in events if (c := content_of(e))) == "one"
            assert hub.channels == 1  # the stream reads its job in its own task: subscribed while it runs
    wait_for(lambda: hub.channels == 0, "the gateway to unsubscribe the job of a stream whose client left")
    assert not worker.cancel_requested(running)  # within the grace: the job runs on
