"""The whole pipeline as a least-privilege Redis ACL user with a password, and no password in any output.

The test server runs with ``requirepass`` (the default user is the
operator's) and one more user made with ``ACL SETUSER`` and exactly the
rules the README's "Security" section gives. ``tpq up`` (supervisor and a
worker group of two ranks), the Python clients (sync and asyncio) and ``tpq generate``,
``batch``, ``status`` and ``health`` all use that user; the workload covers
streaming, batches, cancelling a queued and a running job, and recovery
after ``kill -9`` of rank 0. Every process logs at DEBUG into one file.
Afterwards the server's ACL LOG must be empty (no command was ever denied),
the user must be unable to do anything else, and the password must appear
in no log line, no command output and no Redis value.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from common import keys
from common.errors import JobCancelled
from common.groups import read_heartbeats
from common.redis_conn import connect
from common.results import FinishReason, JobResult
from producer import AsyncClient, Client, Session
from producer.local_stack.embedded_redis import RedisServer
from tests.pipeline_checks import assert_streams_match_results, collect, wait_until

ACL_USER = "tpqueue"
PASSWORD = "Tpq-S3cret/pa:ss@word-7f3a9c"  # '/', ':' and '@' must be percent-encoded in a URL
ADMIN_PASSWORD = "admin-0p3rator-4c1e"
ACL_RULES = (
    "resetkeys ~rq:* ~tpq:* resetchannels &tpq:tokens:* -@all "
    "+ping +client|setname +info +select +scan "
    "+get +set +del +exists +expire +pexpire +persist +incrby +mget "
    "+hget +hset +hdel +hgetall +hmget +hincrby +hincrbyfloat "
    "+llen +lindex +lpos +lpush +rpush +rpop +lrange +lrem +lmove +sadd +srem +smembers "
    "+zadd +zcard +zcount +zrange +zrangebyscore +zrem +zremrangebyscore +zscore "
    "+xadd +xlen +xrange +xrevrange +xread +publish +subscribe +unsubscribe "
    "+multi +exec +discard +watch +unwatch +evalsha +script|load"
)
"""What tpqueue needs of Redis (README "Security"): its keys, its token channels, the commands it sends."""

STACK_ENV = {
    "TPQ_HEARTBEAT_INTERVAL_S": "0.25",
    "TPQ_HEARTBEAT_TTL_S": "1.5",
    "TPQ_HANG_TIMEOUT_S": "10",
    "TPQ_NUM_SHARDS": "16",
    "TPQ_LOG_LEVEL": "DEBUG",
}
README = Path(__file__).resolve().parents[2] / "README.md"


def acl_setuser(admin: redis.Redis, user: str, password: str) -> None:
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *ACL_RULES.split())


def tpq(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "common.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class AclRun:
    """What the workload did and left behind, for the tests to judge."""

    url: str
    server: RedisServer
    admin: redis.Redis
    log_path: Path
    outputs: dict[str, str] = field(default_factory=dict)  # command -> its stdout + stderr
    checks: dict[str, object] = field(default_factory=dict)  # what the workload saw
    acl_log: list = field(default_factory=list)


def wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert process.poll() is None, f"tpq up exited with {process.returncode}:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)


def run_workload(run: AclRun, env: dict[str, str], tmp: Path) -> None:
    url = run.url
    with Client(url) as client:
        interactive = [client.submit(prompt=f"hello {i}", session_id=f"s{i}", temperature=0, max_tokens=8)
                       for i in range(4)]
        batch = client.submit_batch([{"prompt": f"item {i}", "sampling": {"temperature": 0, "max_tokens": 6}}
                                     for i in range(6)])
        outcomes = collect(interactive + list(batch))
        assert_streams_match_results(outcomes)
        run.checks["streamed jobs"] = len(outcomes)
        assert all(isinstance(outcome, JobResult) for _, outcome in batch.wait(timeout=60))
        assert client.job(interactive[0].id).status().value == "finished"

        # --max-num-seqs 2: the first two long jobs run, the rest wait in the queue.
        long = [client.submit(prompt=f"long {i}", max_tokens=400, ignore_eos=True, temperature=0) for i in range(6)]
        wait_until(lambda: long[0].status().value == "running", 60)
        assert long[-1].cancel() and long[0].cancel()
        with pytest.raises(JobCancelled):
            long[-1].result(timeout=60)
        assert long[0].result(timeout=60).finish_reason is FinishReason.CANCELLED
        for handle in long[1:-1]:
            handle.cancel()
        run.checks["cancelled"] = True
        assert isinstance(Session(client, session_id="chat").reply("hi", max_tokens=4, temperature=0), str)

    async def asynchronous() -> int:
        async with AsyncClient(url) as client:
            handle = await client.submit(prompt="async hello", max_tokens=5, temperature=0)
            events = [event async for event in handle.stream(timeout=60)]
            result = await handle.result(timeout=60)
            return len(events) if [e.token_id for e in events] == result.token_ids else -1

    run.checks["async tokens"] = asyncio.run(asynchronous())

    source, out = tmp / "in.jsonl", tmp / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"line {i}", "sampling": {"max_tokens": 4}}) + "\n"
                              for i in range(5)))
    for name, args in [("generate", ["generate", "Hi there", "--max-tokens", "4"]),
                       ("batch", ["batch", str(source), "-o", str(out)]),
                       ("status", ["status"]), ("status --json", ["status", "--json"]), ("health", ["health"])]:
        done = tpq(args, env)
        run.outputs[f"tpq {name}"] = done.stdout + done.stderr
        assert done.returncode == 0, f"tpq {name} failed:\n{done.stdout}\n{done.stderr}"
    assert len(out.read_text().splitlines()) == 5

    # kill -9 of rank 0 mid-generation: the group restarts, the supervisor requeues, the jobs resume.
    with Client(url) as client:
        handles = [client.submit(prompt=f"crash {i}", session_id=f"c{i}", max_tokens=200, ignore_eos=True,
                                 temperature=0) for i in range(2)]
        wait_until(lambda: all(run.admin.xlen(keys.token_log(h.id)) >= 5 for h in handles), 120)
        [rank0] = [b for b in read_heartbeats(run.admin, "g0") if b.rank == 0]
        os.kill(rank0.pid, signal.SIGKILL)
        outcomes = collect(handles)
    assert_streams_match_results(outcomes)
    run.checks["resumed attempts"] = sorted(result.attempt for _, result in outcomes.values())


@pytest.fixture(scope="module")
def acl_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir) -> Iterator[AclRun]:
    tmp = tmp_path_factory.mktemp("acl")
    with RedisServer(tmp / "redis", password=ADMIN_PASSWORD) as server:
        admin = server.client()
        acl_setuser(admin, ACL_USER, PASSWORD)
        url = f"redis://{ACL_USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TPQ_")}, **STACK_ENV,
               "TPQ_REDIS_URL": url, "TPQ_DATA_DIR": str(tmp / "data"), "TPQ_MODEL": str(tiny_llama_dir)}
        run = AclRun(url, server, admin, tmp / "stack.log")
        with open(run.log_path, "w") as log:
            up = subprocess.Popen([sys.executable, "-m", "common.cli", "up", "--groups", "1", "--tp", "2",
                                   "--max-num-seqs", "2", "--no-metrics"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_line(run.log_path, "tpq up: ready", up, 300)
            old_env = dict(os.environ)
            os.environ.update({k: v for k, v in env.items() if k.startswith("TPQ_")})  # for in-process clients
            try:
                run_workload(run, env, tmp)
            finally:
                os.environ.clear()
                os.environ.update(old_env)
        finally:
            up.send_signal(signal.SIGTERM)  # a clean stop: groups hand back their jobs, then the supervisor
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
        run.acl_log = admin.execute_command("ACL", "LOG", "128")
        yield run
        admin.close()


@pytest.mark.slow
def test_the_pipeline_runs_as_the_acl_user_without_a_denied_command(acl_run: AclRun) -> None:
    assert acl_run.checks["streamed jobs"] == 10
    assert acl_run.checks["cancelled"] is True
    assert acl_run.checks["async tokens"] == 5
    assert acl_run.checks["resumed attempts"] == [2, 2]
    denied = [(e[b"reason"], e[b"object"], e[b"count"], re.findall(rb" name=(\S*)", e[b"client-info"]))
              for e in map(_pairs, acl_run.acl_log)]
    assert denied == [], f"Redis denied tpqueue commands or keys: {denied}"
    log = acl_run.log_path.read_text(errors="replace")
    assert "NOPERM" not in log and "NOPERM" not in "".join(acl_run.outputs.values())
    assert "tpq up: stopping" in log


def _pairs(entry) -> dict:
    if isinstance(entry, dict):
        return entry
    return dict(zip(entry[::2], entry[1::2]))


@pytest.mark.slow
def test_the_acl_user_can_do_nothing_else(acl_run: AclRun) -> None:
    acl_run.admin.set("other:secret", "x")
    user = connect(acl_run.url, retries=0)
    try:
        assert user.set("tpq:probe", "1") and user.get("rq:nothing") is None  # its own keys: fine
        for attempt in (lambda: user.get("other:secret"), lambda: user.set("app:key", "1"),
                        lambda: user.publish("other-channel", "x"), lambda: user.flushall(),
                        lambda: user.flushdb(), lambda: user.config_get("*"), lambda: user.keys("*"),
                        lambda: user.eval("return 1", 0), lambda: user.execute_command("SCRIPT", "FLUSH"),
                        lambda: user.execute_command("ACL", "LIST"), lambda: user.execute_command("MONITOR"),
                        lambda: user.execute_command("DEBUG", "SLEEP", "0"), lambda: user.shutdown(),
                        lambda: user.client_kill_filter(_id=1), lambda: user.execute_command("SAVE")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        script = user.register_script("return redis.call('GET', KEYS[1])")
        with pytest.raises(redis.exceptions.ResponseError, match="no permissions"):
            script(keys=["other:secret"])  # a script runs with the user's ACL: no key outside rq:* / tpq:*
        assert script(keys=["tpq:probe"]) == b"1"
        sneaky = user.register_script("return redis.call('GET', 'other:secret')")
        with pytest.raises(redis.exceptions.ResponseError, match="can't access|NOPERM|no permissions"):
            sneaky(keys=["tpq:probe"])  # a key the script names itself is checked too
    finally:
        user.delete("tpq:probe")
        user.close()
        acl_run.admin.execute_command("ACL", "LOG", "RESET")


@pytest.mark.slow
def test_no_password_in_any_log_output_or_redis_value(acl_run: AclRun) -> None:
    secrets = {PASSWORD, quote(PASSWORD, safe=""), "S3cret"}
    texts = {"the stack's DEBUG log (tpq up, supervisor, worker group)": acl_run.log_path.read_text(errors="replace"),
             **acl_run.outputs}
    assert len(texts["the stack's DEBUG log (tpq up, supervisor, worker group)"]) > 10_000  # it did log
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"the password appears in {name}"
    assert f"{ACL_USER}:***@" in texts["tpq status"]  # the URL is shown, redacted
    for key, value in dump_tpqueue_keys(acl_run.admin):
        for secret in secrets:
            assert secret.encode() not in value, f"the password is stored in Redis under {key!r}"


def dump_tpqueue_keys(conn: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    """Every rq:* and tpq:* key with its value flattened to bytes (hashes, lists, sets, zsets, streams)."""
    for key in conn.scan_iter(count=1000):
        kind = conn.type(key)
        if kind == b"string":
            value = conn.get(key) or b""
        elif kind == b"hash":
            value = b" ".join(k + b"=" + v for k, v in conn.hgetall(key).items())
        elif kind == b"list":
            value = b" ".join(conn.lrange(key, 0, -1))
        elif kind == b"set":
            value = b" ".join(conn.smembers(key))
        elif kind == b"zset":
            value = b" ".join(m for m, _ in conn.zrange(key, 0, -1, withscores=True))
        elif kind == b"stream":
            value = b" ".join(k + b"=" + v for _, fields in conn.xrange(key) for k, v in fields.items())
        else:
            value = b""
        yield key, value


def test_the_readme_gives_the_same_acl_rules() -> None:
    text = re.sub(r"\s+", " ", README.read_text())
    assert f"ACL SETUSER tpqueue on >YOUR-PASSWORD {ACL_RULES}" in text
