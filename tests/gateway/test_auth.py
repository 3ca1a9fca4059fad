"""API keys: `tpq keys` on a real redis-server, and the gateway's 401s through the real ``openai`` SDK."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import redis
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from common import keys
from producer.cli import keys as keys_cli
from producer.gateway.auth import KeyGuard, bearer_token, create_key, key_id_of, list_keys, revoke_key
from tests.gateway.conftest import FAKE_MODEL, keyed_sdk, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def conn(redis_url):
    with redis.Redis.from_url(redis_url) as connection:
        yield connection


def body_of(caught: pytest.ExceptionInfo) -> dict:
    return caught.value.body if "error" not in caught.value.body else caught.value.body["error"]


def assert_401(caught: pytest.ExceptionInfo, fragment: str) -> None:
    error = caught.value
    assert error.status_code == 401 and error.response.headers["www-authenticate"] == "Bearer"
    body = body_of(caught)
    assert (body["type"], body["code"], body["param"]) == ("invalid_request_error", "invalid_api_key", None)
    assert fragment in body["message"]


def test_bearer_tokens_are_parsed_strictly() -> None:
    assert bearer_token("Bearer tpq-abc") == "tpq-abc"
    assert bearer_token("bearer   tpq-abc ") == "tpq-abc"
    assert [bearer_token(h) for h in (None, "", "Bearer", "Bearer ", "Basic dXNlcg==", "tpq-abc")] == [None] * 6


# ------------------------------------------------------------------ the gateway


def test_without_keys_the_v1_routes_are_open(gateway):
    base = gateway()
    assert [m.id for m in keyed_sdk(base, "anything").models.list().data] == [FAKE_MODEL]
    assert httpx.get(f"{base}/v1/models").status_code == 200  # no header at all


def test_with_a_key_every_v1_route_needs_it(gateway, conn):
    key, _ = create_key(conn, "alice")
    base = gateway()
    assert [m.id for m in keyed_sdk(base, key).models.list().data] == [FAKE_MODEL]

    with pytest.raises(openai.AuthenticationError) as caught:
        keyed_sdk(base, "tpq-not-a-key-of-this-gateway").models.list()
    assert_401(caught, "incorrect API key provided: tpq-not-***")
    assert "tpq-not-a-key" not in body_of(caught)["message"]  # the key offered is not echoed whole
    with pytest.raises(openai.AuthenticationError):
        keyed_sdk(base, "tpq-wrong").chat.completions.retrieve("chatcmpl-none")  # a route with a path parameter too
    missing = httpx.post(f"{base}/v1/chat/completions", json={"model": FAKE_MODEL, "messages": MESSAGES})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in missing.json()["error"]["message"]
    basic = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Basic {key}"})
    assert basic.status_code == 401

    assert httpx.get(f"{base}/health").status_code == 200  # open, as vLLM's
    assert httpx.get(f"{base}/metrics").status_code == 200


def test_a_known_key_reaches_the_route_and_an_unknown_route_is_still_a_404(gateway, conn):
    key, _ = create_key(conn, "alice")
    base = gateway()
    with pytest.raises(openai.NotFoundError):
        keyed_sdk(base, key).chat.completions.retrieve("chatcmpl-none")
    assert httpx.get(f"{base}/v1/nothing-here").status_code == 401  # unauthenticated: nothing is revealed


def requests_total(base: str) -> dict[tuple[str, str], float]:
    """``tpq_http_requests_total`` by (route, status), read from the gateway's /metrics."""
    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == "tpq_http_requests_total":
                counts[(sample.labels["route"], sample.labels["status"])] = sample.value
    return counts


def test_a_401_is_counted_under_the_route_it_was_for_and_a_made_up_path_under_unmatched(gateway, conn):
    create_key(conn, "alice")
    base = gateway()
    before = requests_total(base)
    for completion_id in ("chatcmpl-1", "chatcmpl-2"):
        assert httpx.get(f"{base}/v1/chat/completions/{completion_id}").status_code == 401
    assert httpx.post(f"{base}/v1/files/file-x", headers={"Authorization": "Bearer tpq-no"}).status_code == 401
    assert httpx.get(f"{base}/v1/made-up/path").status_code == 401
    after = requests_total(base)

    def added(route: str) -> float:
        return after.get((route, "401"), 0) - before.get((route, "401"), 0)

    assert added("/v1/chat/completions/{completion_id}") == 2  # the template, not the id
    assert added("/v1/files/{file_id}") == 1  # a route of the Batch API, asked with a method it does not serve
    assert added("unmatched") == 1
    assert not any("made-up" in route or "chatcmpl-" in route for route, _ in after)


def test_a_revoked_key_stops_working_at_once(gateway, conn):
    key, _ = create_key(conn, "alice")
    other, _ = create_key(conn, "bob")
    base = gateway()
    assert keyed_sdk(base, key).models.list().data
    revoke_key(conn, "alice")
    with pytest.raises(openai.AuthenticationError) as caught:
        keyed_sdk(base, key).models.list()
    assert_401(caught, "unknown or was revoked")
    assert keyed_sdk(base, other).models.list().data


def test_a_new_key_closes_an_open_gateway_within_a_second(gateway, conn):
    base = gateway()
    assert httpx.get(f"{base}/v1/models").status_code == 200  # the gateway now remembers "no keys"
    key, _ = create_key(conn, "alice")
    wait_for(lambda: httpx.get(f"{base}/v1/models").status_code == 401, "the new key to take effect", timeout_s=1.5)
    assert keyed_sdk(base, key).models.list().data


def test_a_public_gateway_needs_a_key_even_before_one_exists(gateway, conn):
    base = gateway(http_host="0.0.0.0")  # as `tpq gateway --host 0.0.0.0` with a key (its app; it binds loopback)
    with pytest.raises(openai.AuthenticationError) as caught:
        keyed_sdk(base, "anything").models.list()
    assert_401(caught, "no API key exists yet")
    key, _ = create_key(conn, "alice")
    assert keyed_sdk(base, key).models.list().data
    revoke_key(conn, "alice")
    with pytest.raises(openai.AuthenticationError):  # revoking the last key does not open it
        keyed_sdk(base, key).models.list()
    assert httpx.get(f"{gateway(http_host='0.0.0.0', http_allow_anonymous=True)}/v1/models").status_code == 200


@pytest.mark.parametrize("key_priority, asked, runs_at", [
    ("batch", "interactive", "batch"), ("interactive", "interactive", "interactive"), ("interactive", "batch", "batch"),
])
def test_a_keys_priority_caps_its_requests(gateway, conn, worker, key_priority, asked, runs_at):
    key, _ = create_key(conn, "k", priority=key_priority)
    client = keyed_sdk(gateway(), key)
    thread = worker.run_in_thread(["ok"])
    extra = {} if asked is None else {"priority": asked}
    answer = client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, extra_body=extra)
    thread.join(timeout=30)
    assert worker.errors == [] and answer.choices[0].message.content == "ok"
    [running] = worker.served
    assert running.request.priority == runs_at


def test_a_websocket_on_v1_is_closed_before_the_handshake_without_a_key(redis_url, conn):
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("in")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/v1/ws", echo)])
    app.add_middleware(KeyGuard)
    key, _ = create_key(conn, "alice")
    with TestClient(app) as client:
        app.state.completions = SimpleNamespace(client=SimpleNamespace(redis=redis.asyncio.Redis.from_url(redis_url)))
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/ws"):
            pass
        assert closed.value.code == 1008 and "API key" in closed.value.reason
        with client.websocket_connect("/v1/ws", headers={"Authorization": f"Bearer {key}"}) as socket:
            assert socket.receive_text() == "in"


# ------------------------------------------------------------------ the key store and `tpq keys`


def every_value(conn: redis.Redis) -> list[bytes]:
    """Every key name and every value in Redis, whatever its type."""
    found: list[bytes] = []
    for name in conn.scan_iter(count=1000):
        found.append(name)
        kind = conn.type(name).decode()
        if kind == "string":
            found.append(conn.get(name))
        elif kind == "hash":
            found += [part for item in conn.hgetall(name).items() for part in item]
        elif kind == "list":
            found += conn.lrange(name, 0, -1)
        elif kind in ("set", "zset"):
            found += list(conn.smembers(name)) if kind == "set" else conn.zrange(name, 0, -1)
        else:
            found.append(repr(conn.xrange(name) if kind == "stream" else kind).encode())
    return found


def test_create_prints_the_key_once_list_never_shows_it_and_redis_holds_only_its_hash(redis_url, conn, capsys):
    assert keys_cli.main(["--redis-url", redis_url, "create", "ci", "--rpm", "5", "--tpm", "1000",
                          "--priority", "batch"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert out.count("\n") == 1 and key.startswith("tpq-") and len(key) >= 4 + 43
    assert "cannot be shown again" in err and key not in err

    stored = every_value(conn)
    assert not any(key.encode() in value for value in stored), "Redis holds the plain key"
    assert conn.hget(keys.api_key_names(), "ci").decode() == key_id_of(key)
    [record] = list_keys(conn)
    assert (record.name, record.prefix, record.rpm, record.tpm, record.priority) == ("ci", key[:8], 5, 1000, "batch")

    assert keys_cli.main(["--redis-url", redis_url, "list"]) == 0
    listed = capsys.readouterr().out
    assert "ci" in listed and f"{key[:8]}..." in listed and key not in listed and key_id_of(key) not in listed
    assert keys_cli.main(["--redis-url", redis_url, "list", "--json"]) == 0
    assert key not in capsys.readouterr().out

    assert keys_cli.main(["--redis-url", redis_url, "create", "ci"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert keys_cli.main(["--redis-url", redis_url, "revoke", "ci"]) == 0
    assert "revoked 'ci'" in capsys.readouterr().out
    assert not conn.exists(keys.api_key_names(), keys.api_key(key_id_of(key)))
    assert keys_cli.main(["--redis-url", redis_url, "revoke", "ci"]) == 2
    assert "no key named 'ci'" in capsys.readouterr().err
    assert keys_cli.main(["--redis-url", redis_url, "list"]) == 0
    assert "no API keys" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["create", "bad name"], "invalid key name"),
    (["create", "x", "--rpm", "0"], "rpm must be a whole number of at least 1"),
    (["create", "x", "--tpm", "-5"], "tpm must be"),
])
def test_create_refuses_bad_names_and_limits(redis_url, conn, capsys, argv, message):
    assert keys_cli.main(["--redis-url", redis_url, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not conn.exists(keys.api_key_names())


def test_tpq_keys_is_a_tpq_command(redis_url):
    done = subprocess.run([sys.executable, "-m", "common.cli", "keys", "--redis-url", redis_url, "create", "sub"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with redis.Redis.from_url(redis_url) as conn:
        assert [r.name for r in list_keys(conn)] == ["sub"]
        assert key_id_of(done.stdout.strip()) == conn.hget(keys.api_key_names(), "sub").decode()
