"""``tpq gateway``'s options: a non-loopback address needs an API key to exist, or anonymous access allowed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.gateway.cli import check_host, is_loopback

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.com", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_public_address_needs_a_key_or_allow_anonymous() -> None:
    check_host("127.0.0.1", allow_anonymous=False, keys_exist=False)
    check_host("0.0.0.0", allow_anonymous=True, keys_exist=False)
    check_host("0.0.0.0", allow_anonymous=False, keys_exist=True)
    with pytest.raises(ValueError, match="no API key exists yet.*tpq keys create NAME.*--allow-anonymous"):
        check_host("0.0.0.0", allow_anonymous=False, keys_exist=False)


def run_gateway(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TPQ_")}, "TPQ_REDIS_URL": redis_url}
    return subprocess.run([sys.executable, "-m", "common.cli", "gateway", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_tpq_gateway_refuses_a_public_address_while_no_key_exists(redis_url) -> None:
    done = run_gateway(redis_url, "--host", "0.0.0.0")
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0: no API key exists yet" in done.stderr
    assert "tpq keys create NAME" in done.stderr and "--allow-anonymous" in done.stderr
    bad_port = run_gateway("redis://127.0.0.1:1/0", "--port", "70000")  # refused before Redis is asked
    assert bad_port.returncode == 2 and "--port must be in 1..65535" in bad_port.stderr


def test_tpq_gateway_listens_on_a_public_address_once_a_key_exists(redis_url, monkeypatch) -> None:
    import redis

    from producer.gateway import cli
    from producer.gateway.auth import create_key

    served: list[tuple] = []
    monkeypatch.setattr(cli, "serve", lambda settings, host, port, url: served.append((settings, host, url)))
    monkeypatch.setenv("TPQ_REDIS_URL", redis_url)
    assert cli.main(["--host", "0.0.0.0"]) == 2 and served == []
    with redis.Redis.from_url(redis_url) as conn:
        create_key(conn, "ops")
    assert cli.main(["--host", "0.0.0.0", "--port", "8123"]) == 0
    [(settings, host, url)] = served
    assert (host, url) == ("0.0.0.0", redis_url)
    assert (settings.http_host, settings.http_allow_anonymous) == ("0.0.0.0", False)  # its app requires keys
