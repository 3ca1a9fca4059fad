"""No Redis password in any output, on the error paths too: wrong password, Redis down, a malformed URL.

The successful path (every component at DEBUG, ``tpq status`` and the
others against a running stack, and every value tpqueue stores in Redis) is
checked by tests/security/test_redis_acl.py. Here each ``tpq`` command runs
as a process with a password in ``TPQ_REDIS_URL`` that cannot work, logging
at DEBUG; its output, and the Python objects and errors a program would
print, must not contain the password in any spelling.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from producer.local_stack.embedded_redis import RedisServer, free_port
from common.errors import InvalidConfigError
from common.redis_conn import RedisUnavailableError, connect
from common.settings import get_settings
from producer import Client

PASSWORD = "Hunter2-S3cr3t/x:y@z"
SPELLINGS = (PASSWORD, quote(PASSWORD, safe=""), "S3cr3t")


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server that wants a different password than the one the commands get."""
    with RedisServer(tmp_path_factory.mktemp("guarded"), password="the-right-one") as server:
        yield server


def urls(server: RedisServer) -> dict[str, str]:
    secret = quote(PASSWORD, safe="")
    return {
        "wrong password": f"redis://:{secret}@127.0.0.1:{server.port}/0",
        "wrong user and password": f"redis://someone:{secret}@127.0.0.1:{server.port}/0",
        "nobody listening": f"redis://tpq:{secret}@127.0.0.1:{free_port()}/0",
        "malformed URL": f"redis://tpq:{secret}@127.0.0.1:{server.port}/0?no_such_option=1",
        "TLS to a plain server": f"rediss://tpq:{secret}@127.0.0.1:{server.port}/0",
        "secret in a query option": f"rediss://127.0.0.1:{free_port()}/0?ssl_password={secret}",
    }


def assert_no_secret(text: str, where: str) -> None:
    for spelling in SPELLINGS:
        assert spelling not in text, f"the password appears in {where}:\n{text[-2000:]}"


COMMANDS = [["status"], ["status", "--json"], ["health"], ["generate", "hi", "--timeout-s", "2"],
            ["supervisor", "--once"], ["batch", "IN", "-o", "OUT"]]
QUICK_CASES = ("wrong password", "wrong user and password", "malformed URL")  # the others wait out retries
SLOWEST_CASE = "TLS to a plain server"  # about 35 s per command: six connect timeouts


def run_tpq(command: list[str], url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hello"}\n')
    command = [str(source) if a == "IN" else str(tmp_path / "out.jsonl") if a == "OUT" else a for a in command]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TPQ_")}, "TPQ_REDIS_URL": url,
           "TPQ_LOG_LEVEL": "DEBUG", "TPQ_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "common.cli", *command], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", [["status"], ["supervisor", "--once"]], ids=["status", "supervisor"])
def test_tpq_commands_never_print_the_password(guarded_server: RedisServer, tmp_path: Path, command: list[str]) -> None:
    for case in QUICK_CASES:
        done = run_tpq(command, urls(guarded_server)[case], tmp_path)
        assert done.returncode != 0, f"tpq {' '.join(command)} ({case}) succeeded"
        assert_no_secret(done.stdout + done.stderr, f"tpq {' '.join(command)} ({case})")


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_every_tpq_command_in_every_failure_never_prints_the_password(
    guarded_server: RedisServer, tmp_path: Path, command: list[str]
) -> None:
    for case, url in urls(guarded_server).items():
        if case == SLOWEST_CASE and command != ["status"]:
            continue
        done = run_tpq(command, url, tmp_path)
        assert done.returncode != 0, f"tpq {' '.join(command)} ({case}) succeeded"
        assert_no_secret(done.stdout + done.stderr, f"tpq {' '.join(command)} ({case})")


def test_python_objects_and_errors_never_show_the_password(guarded_server: RedisServer) -> None:
    for case, url in urls(guarded_server).items():
        shown: list[str] = []
        try:
            settings = get_settings(redis_url=url)
            shown += [repr(settings), str(settings)]
            client = Client(url, settings=settings)
            shown += [repr(client), str(client)]
            client.close()
            connect(url, check=True, retries=0, socket_connect_timeout=1)
        except (InvalidConfigError, RedisUnavailableError) as exc:
            shown += [str(exc), repr(exc)]
        else:
            pytest.fail(f"{case}: connecting succeeded")
        for text in shown:
            assert_no_secret(text, f"{case}: {text[:80]}")
