"""A benchmark of the HTTP Batch API at OpenAI's limit: one batch of 50,000 lines, end to end.

    nice -n 10 .venv/bin/python -m bench.batch_scale [--lines 50000] [--pending-passes 8] [--json]

It starts its own redis-server (:class:`producer.local_stack.embedded_redis.RedisServer`),
registers a stand-in worker group (a registration and a heartbeat, as
``tests/gateway/conftest.py`` does) and serves the real gateway app
(:func:`producer.gateway.app.create_app`) with uvicorn on a thread of this
process, then:

1. uploads the file (``POST /v1/files``) and creates the batch
   (``POST /v1/batches``), timing each;
2. waits while the gateway's own batch keeper enqueues every line
   (``TPQ_MAX_QUEUE_DEPTH`` is raised so that all 50,000 jobs can be
   pending at once: the worst case for a keeper pass);
3. with every job enqueued and none finished, times ``--pending-passes``
   keeper passes and counts the Redis commands each sends
   (``INFO commandstats`` deltas, nothing else talking to Redis meanwhile);
4. finishes every job from a child process, as a worker does, and waits
   for the batch to complete, timing the pass that writes the output and
   error files; then downloads the output file and checks that every
   ``custom_id`` is in it once.

Throughout, a thread asks ``GET /v1/batches/{id}`` every 0.2 s (not during
step 3) and records how long each answer took (the keeper shares the
gateway's event loop, so a long pass shows up there), and another samples
this process's RSS (the gateway and the bench's HTTP client; the worker is
a separate process) and Redis's ``used_memory``.

**The results are written by the bench, not by a model.** Running 50,000
completions through a model takes far longer than the keeper's work being
measured, so a child process plays the worker group: it claims the jobs
off the ``batch`` queue and finishes each the way rank 0 of a group does,
through :class:`gpu_worker.serve.batch_worker.BatchWorker` (``claim``,
``start``, ``succeed`` with a :class:`common.results.JobResult`) and
:func:`common.token_log.queue_messages` (the token events and the
:class:`~common.results.StreamEnd`). The keeper therefore sees real rq jobs,
real rq result entries and real token logs; only the text is made up.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn

from common import keys
from common.groups import GroupInfo, make_heartbeat, new_incarnation, register_group, write_heartbeat
from common.results import FinishReason, JobResult, StreamEnd, Timings, TokenEvent, Usage
from common.settings import get_settings
from common.token_log import queue_messages
from producer.gateway import batch_keeper
from producer.gateway.app import create_app
from producer.local_stack.embedded_redis import RedisServer

MODEL = "bench-model"
GROUP = "bench-group"
CHAT = "/v1/chat/completions"
POLL_S = 0.2


# ------------------------------------------------------------------ the stand-in worker (a child process)


def play_worker(url: str, incarnation: str, words: int, claim: int) -> None:
    """Finish every job on the ``batch`` queue as rank 0 does, until the queue stays empty for 5 s."""
    from gpu_worker.serve.batch_worker import BatchWorker

    settings = get_settings(redis_url=url)
    conn = redis.Redis.from_url(url)
    worker = BatchWorker(conn, GROUP, incarnation, [keys.BATCH_QUEUE], job_ttl_s=3600)
    worker.register()
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 5.0:
        claimed = worker.claim([keys.BATCH_QUEUE], claim)
        if not claimed:
            time.sleep(0.05)
            continue
        idle_since = time.monotonic()
        started = [worker.start(c.job, c.queue) for c in claimed if c.job is not None]
        with conn.pipeline(transaction=False) as pipe:
            for s in started:
                events = [TokenEvent(request_id=s.job.id, index=i, token_id=100 + i, text=f" w{i}")
                          for i in range(words)]
                end = StreamEnd(request_id=s.job.id, num_tokens=words, finish_reason=FinishReason.STOP)
                queue_messages(pipe, [*events, end], settings.token_log_maxlen, settings.token_log_ttl_s)
            pipe.execute(raise_on_error=False)
        for s in started:
            result = JobResult(request_id=s.job.id, text="".join(f" w{i}" for i in range(words)),
                               token_ids=list(range(100, 100 + words)), finish_reason=FinishReason.STOP,
                               usage=Usage(prompt_tokens=12, cached_tokens=0, generated_tokens=words),
                               timings=Timings(queue_s=0.0, time_to_first_token_s=0.0, total_s=0.0),
                               group=GROUP, attempt=s.attempt)
            worker.succeed(s.job.id, result.model_dump(mode="json"))
    worker.unregister()


# ------------------------------------------------------------------ measuring


class Probe:
    """What the bench records: keeper passes, GET latencies, RSS and Redis memory samples."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self.phase = "setup"
        self.passes: list[dict[str, Any]] = []
        self.finishes: list[float] = []
        self.gets: dict[str, list[float]] = {}
        self.rss: dict[str, int] = {}
        self.redis_mem: dict[str, int] = {}
        self.count_commands = False
        self.lock = threading.Lock()

    def commands(self) -> dict[str, int]:
        stats = self.conn.info("commandstats")
        return {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items() if name != "cmdstat_info"}

    def sample_memory(self) -> None:
        rss = rss_bytes()
        used = int(self.conn.info("memory")["used_memory"])
        with self.lock:
            self.rss[self.phase] = max(self.rss.get(self.phase, 0), rss)
            self.redis_mem[self.phase] = max(self.redis_mem.get(self.phase, 0), used)

    def instrument(self) -> None:
        """Wrap the keeper's ``run_pass`` (time, commands) and ``_finish`` (time) on the class."""
        probe, run_pass, finish = self, batch_keeper.BatchKeeper.run_pass, batch_keeper.BatchKeeper._finish

        async def timed_pass(keeper: Any) -> None:
            before = probe.commands() if probe.count_commands else None
            t0 = time.perf_counter()
            await run_pass(keeper)
            took = time.perf_counter() - t0
            entry: dict[str, Any] = {"phase": probe.phase, "s": took}
            if before is not None:
                after = probe.commands()
                entry["commands"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
            probe.passes.append(entry)

        async def timed_finish(keeper: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await finish(keeper, *args, **kwargs)
            finally:
                probe.finishes.append(time.perf_counter() - t0)

        batch_keeper.BatchKeeper.run_pass = timed_pass  # type: ignore[method-assign]
        batch_keeper.BatchKeeper._finish = timed_finish  # type: ignore[method-assign]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def background(target: Callable[[], None], stop: threading.Event, every_s: float) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            target()
            stop.wait(every_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def serve(settings: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the gateway did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def input_file(lines: int, max_tokens: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": CHAT,
                               "body": {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                                        "messages": [{"role": "user", "content": f"Summarize item {i} in a line."}]}})
                   + "\n" for i in range(lines)).encode()


def wait(condition: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)
    return value


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"lines": args.lines}
    with RedisServer(Path(tempfile.mkdtemp(prefix="tpq-bench-batch-"))) as server:
        url = server.url
        conn = server.client(socket_timeout=60)
        incarnation = new_incarnation()
        info = GroupInfo(group=GROUP, incarnation=incarnation, tp=1, model=MODEL, host="bench", pid=os.getpid(),
                         worker_name=f"tpq-{GROUP}-{incarnation}", started_at=time.time())
        register_group(conn, info)
        write_heartbeat(conn, make_heartbeat(GROUP, 0, incarnation, step=0), ttl_s=24 * 3600)
        settings = get_settings(redis_url=url, max_queue_depth=max(10_000, 2 * args.lines))
        probe = Probe(conn)
        probe.instrument()
        gateway, thread, base = serve(settings)
        stop = threading.Event()
        background(probe.sample_memory, stop, 0.2)
        http = httpx.Client(base_url=base, timeout=300)
        batch_id = ""
        polling = threading.Event()

        def poll() -> None:
            if batch_id and polling.is_set():
                t0 = time.perf_counter()
                http.get(f"/v1/batches/{batch_id}").raise_for_status()
                with probe.lock:
                    probe.gets.setdefault(probe.phase, []).append(time.perf_counter() - t0)

        background(poll, stop, POLL_S)
        try:
            probe.sample_memory()
            figures["rss_idle_mib"] = rss_bytes() / 2**20
            content = input_file(args.lines, args.max_tokens)
            figures["input_mib"] = len(content) / 2**20
            probe.phase = "upload"
            t0 = time.perf_counter()
            file_id = http.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(content))},
                                data={"purpose": "batch"}).raise_for_status().json()["id"]
            figures["upload_s"] = time.perf_counter() - t0
            probe.phase = "create"
            t0 = time.perf_counter()
            batch = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT,
                                                   "completion_window": "24h"}).raise_for_status().json()
            figures["create_s"] = time.perf_counter() - t0
            assert batch["status"] == "in_progress", batch
            batch_id = batch["id"]
            del content
            probe.phase = "enqueue"
            polling.set()
            t0 = time.perf_counter()
            wait(lambda: int(conn.hget(keys.api_batch(batch_id), "enqueued") or 0) >= args.lines,
                 "every line enqueued", args.timeout_s)
            figures["enqueue_s"] = time.perf_counter() - t0

            polling.clear()
            time.sleep(POLL_S * 2)
            probe.phase = "pending"
            probe.count_commands = True
            first = len(probe.passes)
            wait(lambda: len(probe.passes) >= first + args.pending_passes + 1, "keeper passes", args.timeout_s)
            probe.count_commands = False
            pending = [p for p in probe.passes[first + 1:] if p["phase"] == "pending" and "commands" in p]

            figures["pending_pass_s_p50"] = statistics.median(p["s"] for p in pending)
            figures["pending_pass_s_max"] = max(p["s"] for p in pending)
            totals = [sum(p["commands"].values()) for p in pending]
            figures["pending_pass_commands"] = statistics.median(totals)
            by_name: dict[str, int] = {}
            for p in pending:
                for name, calls in p["commands"].items():
                    by_name[name] = by_name.get(name, 0) + calls
            figures["pending_pass_top"] = {k: v // len(pending) for k, v in
                                           sorted(by_name.items(), key=lambda kv: -kv[1])[:4]}

            probe.phase = "harvest"
            polling.set()
            ctx = multiprocessing.get_context("spawn")
            worker = ctx.Process(target=play_worker, args=(url, incarnation, args.words, args.claim), daemon=True)
            t0 = time.perf_counter()
            worker.start()

            def finished() -> bool:
                fields = conn.hmget(keys.api_batch(batch_id), "completed", "failed")
                return sum(int(v or 0) for v in fields) >= args.lines

            wait(finished, "every line harvested", args.timeout_s)
            figures["harvest_s"] = time.perf_counter() - t0
            probe.phase = "finalize"
            t1 = time.perf_counter()
            done = wait(lambda: (b := http.get(f"/v1/batches/{batch_id}").json())["status"] in
                        ("completed", "failed", "cancelled", "expired") and b, "the batch to complete", args.timeout_s)
            figures["finalize_wait_s"] = time.perf_counter() - t1
            wait(lambda: probe.finishes, "the keeper's _finish to return", 60)  # it returns after the status moved
            figures["finish_s"] = max(probe.finishes)
            figures["status"] = done["status"]
            figures["request_counts"] = done["request_counts"]
            polling.clear()
            probe.phase = "download"
            t0 = time.perf_counter()
            body = http.get(f"/v1/files/{done['output_file_id']}/content").raise_for_status().content
            figures["download_s"] = time.perf_counter() - t0
            figures["output_mib"] = len(body) / 2**20
            ids = [json.loads(line)["custom_id"] for line in body.splitlines()]
            figures["output_lines"] = len(ids)
            figures["output_unique"] = len(set(ids)) == len(ids) == args.lines
            del body, ids
            worker.join(timeout=30)
            probe.sample_memory()
        finally:
            stop.set()
            polling.clear()
            http.close()
            gateway.should_exit = True
            thread.join(timeout=30)
        figures["pass_s_max"] = {phase: max((p["s"] for p in probe.passes if p["phase"] == phase), default=0.0)
                                 for phase in ("enqueue", "pending", "harvest", "finalize")}
        figures["get_ms"] = {phase: {"p50": 1000 * pct(v, 0.5), "p99": 1000 * pct(v, 0.99), "max": 1000 * max(v),
                                     "n": len(v)} for phase, v in probe.gets.items() if v}
        figures["rss_peak_mib"] = {k: v / 2**20 for k, v in probe.rss.items()}
        figures["redis_used_mib"] = {k: v / 2**20 for k, v in probe.redis_mem.items()}
    return figures


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except OSError:
        return platform.processor()


def table(f: dict[str, Any]) -> str:
    rows = [
        ("lines / input file", f"{f['lines']:,} / {f['input_mib']:.1f} MiB"),
        ("upload (POST /v1/files)", f"{f['upload_s']:.2f} s"),
        ("create (POST /v1/batches)", f"{f['create_s']:.2f} s"),
        ("enqueue every line (keeper)", f"{f['enqueue_s']:.1f} s"),
        ("keeper pass, all pending: p50 / max", f"{f['pending_pass_s_p50'] * 1000:.0f} / "
                                               f"{f['pending_pass_s_max'] * 1000:.0f} ms"),
        ("Redis commands per pending pass", f"{f['pending_pass_commands']:,.0f} "
                                           f"({', '.join(f'{k} {v:,}' for k, v in f['pending_pass_top'].items())})"),
        ("harvest every line (worker running)", f"{f['harvest_s']:.1f} s"),
        ("write output + error files (_finish)", f"{f['finish_s']:.2f} s"),
        ("last line harvested -> completed", f"{f['finalize_wait_s']:.2f} s"),
        ("download output file", f"{f['download_s']:.2f} s ({f['output_mib']:.1f} MiB)"),
        ("output lines, each custom_id once", f"{f['output_lines']:,}, {f['output_unique']}"),
        ("longest keeper pass by phase", ", ".join(f"{k} {v:.2f} s" for k, v in f["pass_s_max"].items())),
        ("GET /v1/batches/{id} p50 / max", ", ".join(f"{k} {v['p50']:.0f}/{v['max']:.0f} ms"
                                                     for k, v in f["get_ms"].items())),
        ("process RSS idle / peak", f"{f['rss_idle_mib']:.0f} / {max(f['rss_peak_mib'].values()):.0f} MiB"),
        ("Redis used_memory peak", f"{max(f['redis_used_mib'].values()):.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--pending-passes", type=int, default=8, help="keeper passes measured with all jobs pending")
    parser.add_argument("--words", type=int, default=16, help="tokens in each made-up answer")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--claim", type=int, default=256, help="jobs the stand-in worker claims at once")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--json", action="store_true", help="also print the figures as one line of JSON")
    args = parser.parse_args(argv)
    figures = run(args)
    figures["cpu"] = cpu_model()
    print(f"HTTP Batch API, {args.lines:,} lines ({figures['cpu']}, Python {platform.python_version()})")
    print(table(figures))
    if args.json:
        print(json.dumps(figures, separators=(",", ":")))


if __name__ == "__main__":
    main()
