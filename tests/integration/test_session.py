"""producer.Session against a real redis-server, with tests/doubles.py's ProtocolWorker as the worker."""
from __future__ import annotations

import pytest

from common import keys
from common.errors import InvalidRequestError, JobFailed
from common.results import ChatMessage
from producer import Client, Session


def session_queue(client: Client, session: Session) -> list[str]:
    return [keys.shard_queue_name(keys.shard_for_session(session.session_id, client.settings.num_shards))]


def test_reply_keeps_history_and_session_id(client, worker):
    session = Session(client, session_id="chat-42", system="You are terse.")
    queue = session_queue(client, session)
    thread = worker.run_in_thread(["Hi", "!"], queue, count=2)
    assert session.reply("Hello", max_tokens=8, temperature=0, timeout=5) == "Hi!"
    assert session.reply("Again?", max_tokens=8, timeout=5) == "Hi!"
    thread.join(5)
    assert not worker.errors
    assert session.history == (
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Hello"),
        ChatMessage(role="assistant", content="Hi!"),
        ChatMessage(role="user", content="Again?"),
        ChatMessage(role="assistant", content="Hi!"),
    )
    first, second = (r.request for r in worker.served)
    assert first.session_id == second.session_id == "chat-42"
    assert first.messages == session.history[:2]
    assert second.messages == session.history[:4]  # the whole conversation so far, plus the new turn
    assert first.sampling.max_tokens == 8 and first.sampling.temperature == 0
    assert first.priority == "interactive"
    assert {r.queue.name for r in worker.served} == set(queue)  # one shard, so one worker group


def test_send_stream_then_complete(client, worker):
    session = Session(client)
    assert len(session.session_id) == 32 and session.history == ()
    handle = session.send("Tell me", subscribe=True)
    assert session.history == ()  # unchanged until the turn completes
    worker.run(["Once", " upon"], session_queue(client, session))
    assert "".join(e.text for e in handle.stream(timeout=5)) == "Once upon"
    assert session.complete(handle, timeout=5) == "Once upon"
    assert [m.role for m in session.history] == ["user", "assistant"]


def test_complete_refuses_a_stale_turn(client, worker):
    session = Session(client)
    first = session.send("one")
    second = session.send("two")
    worker.run(["a"], session_queue(client, session))
    worker.run(["b"], session_queue(client, session))
    assert session.complete(first, timeout=5) == "a"
    with pytest.raises(InvalidRequestError, match="not sent from this session's current history"):
        session.complete(second, timeout=5)
    other = Session(client).send("x")
    with pytest.raises(InvalidRequestError, match="another session"):
        session.complete(other)


def test_failed_turn_leaves_history_unchanged(client, worker):
    session = Session(client, system="sys")
    handle = session.send("boom")
    running = worker.take(session_queue(client, session))
    worker.fail(running, "RuntimeError: model crashed")
    with pytest.raises(JobFailed, match="model crashed"):
        session.complete(handle, timeout=5)
    assert session.history == (ChatMessage(role="system", content="sys"),)


def test_bad_session_arguments(client):
    with pytest.raises(InvalidRequestError, match="session id must be non-empty"):
        Session(client, session_id="")
    session = Session(client)
    with pytest.raises(InvalidRequestError, match="text must be a string"):
        session.send(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="sets session_id and messages itself"):
        session.send("x", session_id="other")
    with pytest.raises(InvalidRequestError, match="temprature"):
        session.send("x", temprature=1)
