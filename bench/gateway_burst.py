"""The gateway's own cost per streamed token, in a burst of concurrent streams, without a model.

    .venv/bin/python bench/gateway_burst.py [--streams 32] [--steps 64] [--step-ms 40] [--rounds 3] [--json]

``bench/gateway.py`` measures the gateway beside a real group, where the
group's decode shares the machine's cores and its step times vary; this
bench isolates the gateway's part of a burst. One embedded Redis, one
``tpq gateway`` process, and a stand-in group registered with a live
heartbeat. The worker's side is played in this process by
``tests.doubles.ProtocolWorker`` (what a worker writes, through rq and
:mod:`common.token_log`; no model runs): it takes the ``--streams`` jobs,
then every ``--step-ms`` writes one token of every job in one pipeline, as
rank 0's publisher writes one decode step. ``--streams`` raw-SSE clients
(plain asyncio sockets, in a child process, so that no HTTP library's
per-chunk cost adds to the gateway's) read them, and the same jobs'
streams are read through :class:`producer.AsyncClient` in another round
(the Python client's reader over the same Redis, for comparison).

Per round it reports, for the tokens of every step: the time from the
step's pipeline write to each stream's receipt (p50 and p99 over every
token and stream: the burst is what makes them differ from a lone
stream's), and the gateway process's CPU time per token (from
``/proc/<pid>/stat``). Records the CPU (``lscpu`` flags) with the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.gateway import cpu, free_port, wait_for_gateway  # noqa: E402
from common import keys  # noqa: E402
from common.groups import GroupInfo, make_heartbeat, new_incarnation, register_group, write_heartbeat  # noqa: E402
from common.results import FinishReason, TokenEvent  # noqa: E402
from common.settings import get_settings  # noqa: E402
from producer import AsyncClient  # noqa: E402
from producer.local_stack.demo_cli import percentile  # noqa: E402
from producer.local_stack.embedded_redis import RedisServer  # noqa: E402
from tests.doubles import ProtocolWorker, Running  # noqa: E402

MODEL = "burst-model"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def register_stand_in_group(url: str) -> None:
    """A registered group with an hour's heartbeat that runs nothing (its jobs wait for the bench)."""
    info = GroupInfo(group="burst", incarnation=new_incarnation(), tp=1, model=MODEL, host="bench",
                     pid=os.getpid(), worker_name="burst-worker", started_at=time.time())
    with redis.Redis.from_url(url) as conn:
        register_group(conn, info)
        write_heartbeat(conn, make_heartbeat("burst", 0, info.incarnation, step=0), ttl_s=3600)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- the readers (run in a child process) ---------------------------------------------------------------------------

async def _raw_stream(host: str, port: int, job_id: str, max_tokens: int, received: dict) -> None:
    """POST one streamed completion with ``request_id`` = ``job_id``; record each token event's arrival."""
    body = json.dumps({"model": MODEL, "prompt": "burst", "max_tokens": max_tokens, "stream": True,
                       "request_id": job_id}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        while size := int((await reader.readline()).strip(), 16):  # chunked: a size line, the data, CRLF
            now = time.time()
            for event in (await reader.readexactly(size + 2)).split(b"\n\n"):
                if event.startswith(b"id: ") and b'"text":"' in event and b'"finish_reason":null' in event:
                    received[(job_id, int(event[4:event.index(b"\n")]))] = now
    finally:
        writer.close()


async def _client_stream(client: AsyncClient, job_id: str, max_tokens: int, received: dict) -> None:
    """Submit one job with id ``job_id`` through the Python client and record each token event's arrival."""
    handle = await client.submit("burst", max_tokens=max_tokens, request_id=job_id)
    async for event in handle.stream():
        received[(job_id, event.index)] = time.time()


def read_streams(mode: str, url: str, redis_url: str, job_ids: list[str], max_tokens: int, out) -> None:
    """The child process: read every job's stream (``raw`` over the gateway, or ``client``); send the arrivals."""
    async def main() -> dict:
        received: dict = {}
        if mode == "raw":
            host, port = url.removeprefix("http://").rsplit(":", 1)
            await asyncio.gather(*(_raw_stream(host, int(port), j, max_tokens, received) for j in job_ids))
        else:
            async with AsyncClient(settings=get_settings(redis_url=redis_url)) as client:
                await asyncio.gather(*(_client_stream(client, j, max_tokens, received) for j in job_ids))
        return received

    out.send(asyncio.run(main()))


def wait_subscribed(conn: redis.Redis, job_ids: list[str], timeout_s: float = 60.0) -> None:
    """Until every job's token channel has a subscriber (the reader's SUBSCRIBE took effect)."""
    channels = [keys.token_channel(j) for j in job_ids]
    deadline = time.monotonic() + timeout_s
    while not all(count for _, count in conn.pubsub_numsub(*channels)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {len(job_ids)} streams did not all subscribe within {timeout_s:g} s")
        time.sleep(0.01)


# -- one round ------------------------------------------------------------------------------------------------------

def write_steps(worker: ProtocolWorker, running: list[Running], steps: int, step_s: float) -> dict[int, float]:
    """Every ``step_s``: one token of every job in one pipeline; when each step was written."""
    written: dict[int, float] = {}
    for step in range(steps):
        written[step] = time.time()
        events = [TokenEvent(request_id=r.id, index=step, token_id=100 + step, text=f" t{step}",
                             sampled_at=written[step]) for r in running]
        worker.write(events)
        for r, event in zip(running, events):
            r.tokens.append(event)
        time.sleep(step_s)
    for r in running:
        worker.succeed(r, FinishReason.LENGTH)
    return written


def run_round(mode: str, args: argparse.Namespace, redis_url: str, gateway_url: str, gateway_pid: int,
              round_no: int) -> dict:
    job_ids = [f"burst-{mode}-{round_no}-{i}" for i in range(args.streams)]
    worker = ProtocolWorker(redis_url, name=f"burst-{mode}-{round_no}")
    try:
        parent, child = multiprocessing.Pipe()
        reader = multiprocessing.get_context("spawn").Process(
            target=read_streams, args=(mode, gateway_url, redis_url, job_ids, args.steps, child))
        reader.start()
        queues = [*keys.shard_queue_names(get_settings(redis_url=redis_url).num_shards), keys.BATCH_QUEUE]
        running = [worker.take(queues, timeout=60) for _ in job_ids]
        wait_subscribed(worker.conn, job_ids)
        cpu_before = cpu_seconds(gateway_pid)
        written = write_steps(worker, running, args.steps, args.step_ms / 1000)
        received = parent.recv()
        cpu_used = cpu_seconds(gateway_pid) - cpu_before
        reader.join(timeout=30)
    finally:
        worker.close()
    latencies = [(received[(r.id, s)] - written[s]) * 1000 for r in running for s in written if (r.id, s) in received]
    return {"mode": mode, "tokens": len(latencies), "expected": args.streams * args.steps,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "gateway_cpu_us_per_token": cpu_used / max(1, len(latencies)) * 1e6}


def report(figures: dict) -> str:
    lines = [f"CPU: {figures['cpu']}",
             f"{figures['streams']} streams x {figures['steps']} steps, one pipeline of {figures['streams']} "
             f"tokens every {figures['step_ms']:g} ms",
             "| round | reader | tokens | step written -> received p50 / p99 ms | gateway CPU us/token |",
             "|---|---|---|---|---|"]
    for i, r in enumerate(figures["rounds"]):
        cpu_cell = f"{r['gateway_cpu_us_per_token']:.0f}" if r["mode"] == "raw" else "-"
        lines.append(f"| {i // 2 + 1} | {r['mode']} | {r['tokens']}/{r['expected']} | "
                     f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {cpu_cell} |")
    best = figures["best"]
    lines.append(f"best round each: gateway (raw SSE) p50 {best['raw_p50_ms']:.2f} ms, Python client p50 "
                 f"{best['client_p50_ms']:.2f} ms: added by the gateway p50 {best['added_p50_ms']:.2f} ms; "
                 f"gateway CPU {best['cpu_us_per_token']:.0f} us/token")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="tokens per stream")
    parser.add_argument("--step-ms", type=float, default=40.0, help="milliseconds between two steps' writes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each reader, alternating")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    with RedisServer() as server:
        register_stand_in_group(server.url)
        port = free_port()
        env = {**os.environ, "TPQ_REDIS_URL": server.url}
        gateway = subprocess.Popen([str(Path(sys.executable).parent / "tpq"), "gateway", "--port", str(port)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(wait_for_gateway(url))
            rounds = [run_round(mode, args, server.url, url, gateway.pid, i)
                      for i in range(args.rounds) for mode in ("raw", "client")]
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    raw = [r for r in rounds if r["mode"] == "raw"]
    client = [r for r in rounds if r["mode"] == "client"]
    best_raw, best_client = min(raw, key=lambda r: r["p50_ms"]), min(client, key=lambda r: r["p50_ms"])
    figures = {"cpu": cpu(), "streams": args.streams, "steps": args.steps, "step_ms": args.step_ms, "rounds": rounds,
               "best": {"raw_p50_ms": best_raw["p50_ms"], "client_p50_ms": best_client["p50_ms"],
                        "added_p50_ms": best_raw["p50_ms"] - best_client["p50_ms"],
                        "cpu_us_per_token": min(r["gateway_cpu_us_per_token"] for r in raw)}}
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0 if all(r["tokens"] == r["expected"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
