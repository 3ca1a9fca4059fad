"""common.redis_conn: URL parsing, redaction, connecting and retrying against a real redis-server."""
from __future__ import annotations

import asyncio
import threading
import time
from urllib.parse import quote

import pytest
import redis
from hypothesis import assume, given
from hypothesis import strategies as st
from redis.connection import SSLConnection, UnixDomainSocketConnection

from common.errors import InvalidConfigError
from common.redis_conn import (
    RedisUnavailableError,
    async_connect,
    connect,
    parse_redis_url,
    redact_url,
)
from producer.local_stack.embedded_redis import RedisServer

# ---------------------------------------------------------------- parsing


def test_parse_redis_url_with_credentials() -> None:
    kw = parse_redis_url("redis://alice:s3cret@db.example:6380/2")
    assert (kw["host"], kw["port"], kw["db"]) == ("db.example", 6380, 2)
    assert (kw["username"], kw["password"]) == ("alice", "s3cret")
    assert "connection_class" not in kw


def test_parse_password_only_and_percent_encoding() -> None:
    kw = parse_redis_url(f"redis://:{quote('p@ss:w/rd?#', safe='')}@10.0.0.5")
    assert kw["password"] == "p@ss:w/rd?#"
    assert "username" not in kw
    assert kw["host"] == "10.0.0.5"


def test_parse_rediss_passes_tls_options() -> None:
    kw = parse_redis_url(
        "rediss://bob:pw@cache.example:6379/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/etc/c.pem"
        "&ssl_keyfile=/etc/k.pem&ssl_cert_reqs=required&ssl_check_hostname=false"
    )
    assert kw["connection_class"] is SSLConnection
    assert (kw["username"], kw["password"]) == ("bob", "pw")
    assert kw["ssl_ca_certs"] == "/etc/ca.pem"
    assert (kw["ssl_certfile"], kw["ssl_keyfile"]) == ("/etc/c.pem", "/etc/k.pem")
    assert kw["ssl_cert_reqs"] == "required"
    assert kw["ssl_check_hostname"] is False


def test_parse_unix_socket_url() -> None:
    kw = parse_redis_url("unix://carol:pw@/run/redis/redis.sock?db=3")
    assert kw["connection_class"] is UnixDomainSocketConnection
    assert (kw["path"], kw["db"]) == ("/run/redis/redis.sock", 3)
    assert (kw["username"], kw["password"]) == ("carol", "pw")


def test_parse_ipv6_and_default_port() -> None:
    assert parse_redis_url("redis://[::1]")["host"] == "::1"
    assert "port" not in parse_redis_url("redis://localhost")  # redis-py's default, 6379


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://:topsecret@localhost:6379", "unsupported scheme http://"),
        ("localhost:6379", "no scheme"),
        ("redis://", "needs a host"),
        ("redis://:topsecret@", "needs a host"),
        ("redis://:topsecret@localhost:99999", "Port out of range"),
        ("redis://:topsecret@localhost:port", "Port could not be cast"),
        ("redis://localhost/abc", "db number"),
        ("redis://localhost?db=-1", "db number must be >= 0"),
        ("redis://localhost?bogus=1", "unknown option 'bogus'"),
        ("redis://localhost?ssl_ca_certs=/ca.pem", "needs TLS: use rediss://"),
        ("redis://localhost?db=1&db=2", "given 2 times"),
        ("redis://localhost?socket_timeout=soon", "socket_timeout"),
        ("rediss://localhost?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("unix://relative/path.sock", "absolute socket path and no host"),
        ("unix://", "absolute socket path and no host"),
        ("unix://localhost:6379/x.sock", "absolute socket path and no host"),
        ("redis://localhost#frag", "fragment"),
        ("", "non-empty"),
    ],
)
def test_bad_urls_raise_clear_errors(url: str, fragment: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        parse_redis_url(url)
    message = str(info.value)
    assert fragment in message
    assert "topsecret" not in message
    if url:
        assert "redis://" in message and "rediss://" in message and "unix://" in message  # accepted forms


def test_connect_rejects_bad_url_before_any_io() -> None:
    with pytest.raises(InvalidConfigError, match="unsupported scheme"):
        connect("memcached://:topsecret@localhost")
    with pytest.raises(InvalidConfigError, match="unsupported scheme"):
        async_connect("memcached://:topsecret@localhost")


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://alice:s3cret@h:6379/0", "redis://alice:***@h:6379/0"),
        ("redis://:s3cret@h", "redis://:***@h"),
        ("rediss://u:p%40ss@h?ssl_password=kp&db=1", "rediss://u:***@h?ssl_password=***&db=1"),
        ("unix://:s3cret@/run/r.sock?db=0", "unix://:***@/run/r.sock?db=0"),
        ("unix:///run/r.sock?password=s3cret", "unix:///run/r.sock?password=***"),
        ("redis://alice@h", "redis://alice@h"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///tmp/a@b.sock", "unix:///tmp/a@b.sock"),
        ("alice:s3cret@h", "***@h"),
        ("redis://u:p@ss@h", "redis://u:***@h"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


_secret = st.text(min_size=8, max_size=40).filter(lambda s: "\x00" not in s)


@given(
    scheme=st.sampled_from(["redis", "rediss", "unix", "http", ""]),
    user=st.sampled_from(["", "alice"]),
    password=_secret,
    encode=st.booleans(),
    tail=st.sampled_from(["db.example:6379/0", "/run/redis.sock?db=1", "h", "h:notaport", "[::1]:1/2?x=y"]),
)
def test_redact_url_never_leaks_the_password(scheme: str, user: str, password: str, encode: bool, tail: str) -> None:
    head = f"{scheme}://" if scheme else ""
    written = quote(password, safe="") if encode else password
    url = f"{head}{user}:{written}@{tail}"
    assume(password not in f"{head}{user}:***@{tail}" and written not in f"{head}{user}:***@{tail}")
    out = redact_url(url)
    assert written not in out
    assert password not in out


@given(password=_secret, option=st.sampled_from(["password", "ssl_password"]))
def test_redact_url_hides_query_passwords(password: str, option: str) -> None:
    written = quote(password, safe="")
    skeleton = f"rediss://h:6379?{option}=***&db=0"
    assume(password not in skeleton and written not in skeleton)
    out = redact_url(f"rediss://h:6379?{option}={written}&db=0")
    assert written not in out and password not in out
    assert out.endswith(f"{option}=***&db=0")


def test_errors_never_show_the_password() -> None:
    for url in ("ftp://u:topsecret@h", "redis://u:topsecret@h:bad", "redis://u:topsecret@h?x=1"):
        with pytest.raises(InvalidConfigError) as info:
            connect(url)
        assert "topsecret" not in str(info.value)
        assert "u:***@" in str(info.value)


# ---------------------------------------------------------------- a real server


def test_connect_to_real_server(redis_url: str) -> None:
    with connect(redis_url) as client:
        client.set("k", "v")
        assert client.get("k") == b"v"
    with connect(redis_url, decode_responses=True, client_name="tpq-test") as client:
        assert client.get("k") == "v"
        assert client.client_getname() == "tpq-test"


def test_client_retries_connection_errors_and_timeouts(redis_url: str) -> None:
    client = connect(redis_url, retries=4)
    retry = client.get_retry()
    assert retry is not None and retry._retries == 4
    errors = set(retry._supported_errors)
    assert redis.ConnectionError in errors and redis.TimeoutError in errors
    client.close()


def test_async_connect_to_real_server(redis_url: str) -> None:
    async def roundtrip() -> bytes | None:
        client = async_connect(redis_url, client_name="tpq-async")
        try:
            await client.set("ak", "av")
            assert await client.client_getname() in (b"tpq-async", "tpq-async")
            return await client.get("ak")
        finally:
            await client.aclose()

    assert asyncio.run(roundtrip()) == b"av"


def test_client_survives_a_server_restart(redis_server: RedisServer, redis_url: str) -> None:
    client = connect(redis_url)
    client.set("before", "1")
    old_pid = redis_server.pid
    redis_server.restart()
    assert redis_server.pid != old_pid
    assert client.ping()  # the pooled connection broke; the retry reconnected
    assert client.get("before") == b"1"  # AOF replayed
    client.close()


def test_client_waits_out_a_short_outage(redis_server: RedisServer, redis_url: str) -> None:
    client = connect(redis_url)
    client.ping()
    redis_server.kill()
    restarter = threading.Timer(0.5, redis_server.start)
    restarter.start()
    try:
        t0 = time.monotonic()
        client.set("during", "outage")  # retried with back-off until the server is back
        assert time.monotonic() - t0 >= 0.3
        assert client.get("during") == b"outage"
    finally:
        restarter.join()
        client.close()


def test_without_retries_an_outage_fails_fast(redis_server: RedisServer, redis_url: str) -> None:
    client = connect(redis_url, retries=0)
    client.ping()
    redis_server.kill()
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        redis_server.start()
        client.close()


def test_check_reports_an_unreachable_server_without_the_password() -> None:
    with RedisServer() as server:
        url = server.url.replace("redis://", "redis://:topsecret@")
    # the server is gone now: nothing listens on its port
    with pytest.raises(RedisUnavailableError) as info:
        connect(url, retries=1, check=True)
    assert "topsecret" not in str(info.value)
    assert ":***@127.0.0.1" in str(info.value)
    assert "TPQ_REDIS_URL" in str(info.value)


def test_password_protected_server() -> None:
    with RedisServer(password="right-password") as server:
        with connect(server.url, check=True) as client:
            assert client.ping()
        wrong = server.url.replace("right-password", "wrong-password")
        with pytest.raises(RedisUnavailableError) as info:
            connect(wrong, check=True)
        assert "wrong-password" not in str(info.value)


def test_unix_socket_url() -> None:
    with RedisServer(unix_socket=True) as server:
        with connect(server.unix_url) as client:
            client.set("via", "unix")
        with connect(server.url) as client:
            assert client.get("via") == b"unix"


def test_a_wrong_password_is_not_retried() -> None:
    with RedisServer(password="right-password") as server:
        wrong = server.url.replace("right-password", "wrong-password")
        client = connect(wrong, retries=6, backoff_base_s=1.0, backoff_cap_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            client.ping()
        assert time.monotonic() - t0 < 0.9  # one back-off would have slept 1 s
        client.close()


def test_async_client_survives_a_server_restart(redis_server: RedisServer, redis_url: str) -> None:
    async def ping_twice() -> None:
        client = async_connect(redis_url)
        try:
            await client.set("a", "1")
            redis_server.restart()
            assert await client.get("a") == b"1"
        finally:
            await client.aclose()

    asyncio.run(ping_twice())
