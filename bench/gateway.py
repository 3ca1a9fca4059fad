"""The OpenAI-compatible gateway against the Python client, measured side by side in one run.

    .venv/bin/python bench/gateway.py [--model smollm2-135m-instruct] [--streams 32] [--max-tokens 64] [--quick]

One stack (embedded Redis, the supervisor, one group, the gateway as its own
process, as ``tpq up`` runs them) serves every part:

1. Throughput: ``--streams`` concurrent chat streams of ``--max-tokens``
   greedy tokens (EOS ignored) through the gateway (``openai.AsyncOpenAI``)
   and the same prompts through ``producer.AsyncClient`` (``submit`` +
   ``stream``), alternating A, B, A, B, ... for ``--rounds`` rounds so that
   the machine's drift falls on both; the ratio of their best rounds'
   tok/s. Target >= 0.95.
2. Time to first token added by the gateway: for the first token of every
   stream of part 1, the time it reached the client minus the time rank 0
   sampled it (``TokenEvent.sampled_at``; for a gateway stream read back
   from the job's token log), through the gateway and through the client;
   the difference of their p50 and of their p99; the same for a third
   round of the same streams read as raw SSE over plain asyncio sockets
   (no SDK, no httpx: the gateway's own part, apart from what the SDK and
   httpx spend on every chunk of 32 streams in the clients' one process);
   and the same for ``--alone`` streams run one at a time (no burst of 32
   first tokens to queue behind). Target: p50 <= 3 ms.
3. Peak RSS of the gateway process (``VmHWM``) with ``--open-streams`` open
   streams (opened against a busy group, counted by the gateway's own
   ``tpq_http_open_streams``), and its RSS before.
4. Requests/s the gateway admits: ``--admit-requests`` non-streamed
   completions of ``max_tokens: 1`` from 64 concurrent clients, and the
   same through the Python client (the group bounds both).

Records the CPU (``lscpu`` model and SIMD flags) with the figures. Nothing
else should run on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402

from common.settings import get_settings  # noqa: E402
from producer import AsyncClient  # noqa: E402
from producer.local_stack.demo_cli import percentile  # noqa: E402
from producer.local_stack.stack import LocalStack, StackOptions  # noqa: E402

ADMIT_CONCURRENCY = 64


def cpu() -> str:
    """The CPU model and its SIMD flags that matter to the kernels (from lscpu)."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = [f for f in fields.get("Flags", "").split() if f.startswith(("avx2", "avx512", "amx"))]
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} CPUs, flags: {' '.join(flags) or 'none'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a short story about a robot named Unit {i} who learns to paint."}]


async def through_gateway(sdk: openai.AsyncOpenAI, model: str, n: int, max_tokens: int) -> dict:
    """``n`` concurrent streams through the gateway: tokens, seconds, each stream's id and first-token time."""

    async def one(i: int) -> tuple[str, float | None, int]:
        first, count, cid = None, 0, ""
        stream = await sdk.chat.completions.create(model=model, messages=prompt(i), max_tokens=max_tokens,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            cid = chunk.id
            if chunk.choices and chunk.choices[0].delta.content is not None and chunk.choices[0].delta.content:
                first = first if first is not None else time.time()
                count += 1
        return cid, first, count

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(n)))
    return {"seconds": time.perf_counter() - start, "streams": done}


async def through_gateway_raw(url: str, model: str, n: int, max_tokens: int) -> dict:
    """The same streams read as raw SSE over plain asyncio sockets: each stream's id and first-token time.

    What a first token costs in the gateway itself: this reader spends a
    few microseconds a chunk, where httpx (and the SDK on top) spend enough
    in this one process that 32 first chunks at once wait behind each other
    here (httpx alone: about 2 ms p50, 14 ms p90 of it, on a 2-core VM).
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)

    async def one(i: int) -> tuple[str, float | None, int]:
        first, count, cid = None, 0, ""
        body = json.dumps({"model": model, "messages": prompt(i), "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "ignore_eos": True}).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
            while size := int((await reader.readline()).strip(), 16):  # chunked: a size line, the data, CRLF
                for event in (await reader.readexactly(size + 2)).split(b"\n\n"):
                    if b'"content":"' not in event or b'"content":""' in event:
                        continue  # not a text delta (the role delta's content is empty)
                    if first is None:
                        first, cid = time.time(), json.loads(event.split(b"data: ", 1)[1])["id"]
                    count += 1
        finally:
            writer.close()
        return cid, first, count

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(n)))
    return {"seconds": time.perf_counter() - start, "streams": done}


async def through_client(client: AsyncClient, n: int, max_tokens: int) -> dict:
    """The same streams through the Python client: tokens, seconds, first-token delivery latencies."""

    async def one(i: int) -> tuple[float, int]:
        handle = await client.submit(messages=prompt(i), max_tokens=max_tokens, temperature=0, ignore_eos=True)
        first, count = None, 0
        async for event in handle.stream(timeout=600):
            if first is None:
                first = time.time() - event.sampled_at
            count += 1
        return first, count

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(n)))
    return {"seconds": time.perf_counter() - start, "first_latency": [f for f, _ in done],
            "tokens": sum(c for _, c in done)}


async def first_sampled_at(client: AsyncClient, completion_id: str) -> float:
    """When rank 0 sampled the first token of a finished completion (its token log, replayed)."""
    handle = await client.job(completion_id)
    stream = handle.stream(timeout=60)
    try:
        return (await stream.__anext__()).sampled_at
    finally:
        await stream.aclose()


async def open_streams_metric(http: httpx.AsyncClient, url: str) -> float:
    for line in (await http.get(f"{url}/metrics")).text.splitlines():
        if line.startswith("tpq_http_open_streams "):
            return float(line.split()[1])
    return 0.0


def rss_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid``, KiB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status) if k in ("VmRSS", "VmHWM")}


async def hold_open_streams(url: str, model: str, n: int, gateway_pid: int) -> dict:
    """Open ``n`` streams (long answers), wait until the gateway counts them all open, read its RSS, close them."""
    before = rss_kib(gateway_pid)
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as http:
        started = asyncio.Event()
        count = [0]

        async def one(i: int) -> None:
            body = {"model": model, "messages": prompt(i), "max_tokens": 2048, "stream": True, "ignore_eos": True}
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                count[0] += 1
                if count[0] == n:
                    started.set()
                async for _ in response.aiter_bytes():
                    await asyncio.sleep(3600)  # hold the stream open, reading nothing more

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        await asyncio.wait_for(started.wait(), 300)
        deadline = time.monotonic() + 60
        while (open_now := await open_streams_metric(http, url)) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        held = rss_kib(gateway_pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"open": open_now, "rss_before_mib": before["VmRSS"] / 1024, "peak_rss_mib": held["VmHWM"] / 1024}


async def admit_rate(url: str, model: str, n: int) -> float:
    """Non-streamed completions of one token from :data:`ADMIT_CONCURRENCY` clients: requests/s."""
    limits = httpx.Limits(max_connections=ADMIT_CONCURRENCY + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as http:
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                body = {"model": model, "prompt": f"Count {i}:", "max_tokens": 1, "temperature": 0}
                response = await http.post(f"{url}/v1/completions", json=body)
                assert response.status_code == 200, response.text

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(ADMIT_CONCURRENCY)))
        return n / (time.perf_counter() - start)


async def wait_for_gateway(url: str, timeout_s: float = 120.0) -> None:
    """Until the gateway answers ``/health`` with 200 (it starts beside the group)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while True:
            try:
                if (await http.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway at {url} did not become healthy within {timeout_s:g} s")
            await asyncio.sleep(0.2)


async def client_rate(client: AsyncClient, n: int) -> float:
    """The same one-token completions through the Python client (``submit`` + ``result``): requests/s."""
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            handle = await client.submit(f"Count {i}:", max_tokens=1, temperature=0)
            await handle.result(timeout=600)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(ADMIT_CONCURRENCY)))
    return n / (time.perf_counter() - start)


async def measure(stack: LocalStack, args: argparse.Namespace) -> dict:
    base = stack.gateway_url
    assert base is not None, "the stack's gateway is not running"
    url = base.removesuffix("/v1")
    await wait_for_gateway(url)
    sdk = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600,
                             http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=256)))
    model = (await sdk.models.list()).data[0].id
    async with AsyncClient(stack.redis_url, get_settings(redis_url=stack.redis_url)) as client:
        await (await client.submit("warm up", max_tokens=4)).result(timeout=300)
        gateway_runs, client_runs, raw_runs = [], [], []
        for _ in range(args.rounds):
            gateway_runs.append(await through_gateway(sdk, model, args.streams, args.max_tokens))
            client_runs.append(await through_client(client, args.streams, args.max_tokens))
            raw_runs.append(await through_gateway_raw(url, model, args.streams, args.max_tokens))
        alone_gateway, alone_client = [], []  # one stream at a time: the gateway's own cost, no burst to queue in
        for i in range(args.alone):
            run = await through_gateway(sdk, model, 1, 8)
            [(cid, first, _)] = run["streams"]
            alone_gateway.append(first - await first_sampled_at(client, cid))
            alone_client.extend((await through_client(client, 1, 8))["first_latency"])
        gateway_latency = []
        for run in gateway_runs:
            for cid, first, _ in run["streams"]:
                gateway_latency.append(first - await first_sampled_at(client, cid))
        raw_latency = []
        for run in raw_runs:
            for cid, first, _ in run["streams"]:
                raw_latency.append(first - await first_sampled_at(client, cid))
        client_latency = [x for run in client_runs for x in run["first_latency"]]
        client_admitted = await client_rate(client, args.admit_requests)
    gw_tok_s = max(sum(c for _, _, c in r["streams"]) / r["seconds"] for r in gateway_runs)
    cl_tok_s = max(r["tokens"] / r["seconds"] for r in client_runs)
    held = await hold_open_streams(url, model, args.open_streams, stack.gateway.pid)
    admitted = await admit_rate(url, model, args.admit_requests)
    await sdk.close()
    ms = 1000.0
    return {
        "cpu": cpu(), "model": model, "streams": args.streams, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "gateway_tok_s": gw_tok_s, "client_tok_s": cl_tok_s, "ratio": gw_tok_s / cl_tok_s,
        "ttft_gateway_p50_ms": percentile(gateway_latency, 50) * ms,
        "ttft_client_p50_ms": percentile(client_latency, 50) * ms,
        "ttft_added_p50_ms": (percentile(gateway_latency, 50) - percentile(client_latency, 50)) * ms,
        "ttft_added_p99_ms": (percentile(gateway_latency, 99) - percentile(client_latency, 99)) * ms,
        "raw_tok_s": max(sum(c for _, _, c in r["streams"]) / r["seconds"] for r in raw_runs),
        "ttft_raw_p50_ms": percentile(raw_latency, 50) * ms,
        "ttft_raw_added_p50_ms": (percentile(raw_latency, 50) - percentile(client_latency, 50)) * ms,
        "ttft_raw_added_p99_ms": (percentile(raw_latency, 99) - percentile(client_latency, 99)) * ms,
        "alone": args.alone,
        "alone_added_p50_ms": (percentile(alone_gateway, 50) - percentile(alone_client, 50)) * ms,
        "alone_added_p99_ms": (percentile(alone_gateway, 99) - percentile(alone_client, 99)) * ms,
        "alone_gateway_p50_ms": percentile(alone_gateway, 50) * ms,
        "alone_client_p50_ms": percentile(alone_client, 50) * ms,
        "open_streams": held["open"], "gateway_rss_before_mib": held["rss_before_mib"],
        "gateway_peak_rss_mib": held["peak_rss_mib"], "admitted_per_s": admitted,
        "client_admitted_per_s": client_admitted,
        "admit_requests": args.admit_requests,
    }


def report(figures: dict) -> str:
    f = figures
    return "\n".join([
        f"CPU: {f['cpu']}; model {f['model']}",
        f"1. {f['streams']} streams x {f['max_tokens']} tokens, best of {f['rounds']} alternating rounds:",
        f"   gateway (AsyncOpenAI) {f['gateway_tok_s']:.1f} tok/s, Python client {f['client_tok_s']:.1f} tok/s: "
        f"ratio {f['ratio']:.3f} (target >= 0.95)",
        f"2. first token, sampled -> received: gateway p50 {f['ttft_gateway_p50_ms']:.2f} ms, client p50 "
        f"{f['ttft_client_p50_ms']:.2f} ms; added by the gateway p50 {f['ttft_added_p50_ms']:.2f} ms "
        f"(target <= 3), p99 {f['ttft_added_p99_ms']:.2f} ms",
        f"   the same streams read as raw SSE (plain sockets, no SDK or httpx; {f['raw_tok_s']:.1f} tok/s): gateway "
        f"p50 {f['ttft_raw_p50_ms']:.2f} ms; added p50 {f['ttft_raw_added_p50_ms']:.2f} ms, p99 "
        f"{f['ttft_raw_added_p99_ms']:.2f} ms (the gateway's own part; the rest is the clients' HTTP stack)",
        f"   one stream at a time ({f['alone']} each): gateway p50 {f['alone_gateway_p50_ms']:.2f} ms, client p50 "
        f"{f['alone_client_p50_ms']:.2f} ms; added by the gateway p50 {f['alone_added_p50_ms']:.2f} ms, "
        f"p99 {f['alone_added_p99_ms']:.2f} ms",
        f"3. gateway RSS {f['gateway_rss_before_mib']:.0f} MiB idle, peak {f['gateway_peak_rss_mib']:.0f} MiB with "
        f"{f['open_streams']:.0f} open streams",
        f"4. one-token requests ({f['admit_requests']}, {ADMIT_CONCURRENCY} concurrent clients): gateway "
        f"{f['admitted_per_s']:.0f}/s, Python client {f['client_admitted_per_s']:.0f}/s (the group's own ceiling "
        "bounds both; the gateway's is its share of the difference)",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tpq worker --model (default: TPQ_MODEL, SmolLM2-135M)")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alone", type=int, default=20, help="streams run one at a time through each, for part 2")
    parser.add_argument("--open-streams", type=int, default=500)
    parser.add_argument("--admit-requests", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small numbers: checks that every part runs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.max_tokens, args.rounds, args.open_streams, args.admit_requests, args.alone = 4, 8, 1, 20, 40, 3
    with tempfile.TemporaryDirectory(prefix="tpq-bench-gw-") as data:
        os.environ.update({"TPQ_DATA_DIR": data, "TPQ_HTTP_DISCONNECT_GRACE_S": "0",
                           "TPQ_SUPERVISOR_METRICS_PORT": "0", "TPQ_WORKER_METRICS_PORT": "0"})
        os.environ.pop("TPQ_REDIS_URL", None)
        worker_args = ["--model", args.model] if args.model else []
        stack = LocalStack(get_settings(), StackOptions(groups=1, tp=1, worker_args=worker_args, log_level="WARNING",
                                                        metrics=False, http_port=free_port()))
        try:
            stack.start()
            stack.wait_ready()
            figures = asyncio.run(measure(stack, args))
        finally:
            stack.stop()
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
