"""The whole pipeline against the engine alone, measured side by side in one run.

    .venv/bin/python bench/pipeline.py [--tp 1] [--concurrency 32] [--max-tokens 128]

1. Throughput: ``concurrency`` prompts x ``max-tokens`` greedy tokens (EOS
   ignored) through client -> Redis -> group -> stream, against
   ``Engine.generate`` in this process on the same prompts. Target >= 0.9.
   Measured three ways: one thread per stream (sync ``Client``), every
   stream in one event loop (``AsyncClient``), and results only. The engine
   runs before and after the pipeline, and the best of its runs is the
   denominator: the speed of this VM drifts by tens of percent within
   minutes, and a drift can only lower the ratio this way.
2. Token delivery latency: rank 0's sampling time (``TokenEvent.sampled_at``)
   to the client receiving the event, for 4 interactive streams and for all
   streams of the throughput run. Target p50 < 2 ms.
3. Multi-turn: 8 sessions x 6 turns with a long system prompt; client-side
   time to first token of turns 2..6 with the prefix cache on and off.
   Target: >= 3x lower with it on.
4. Enqueue rate of a 10,000-job ``submit_batch`` (no worker running).

Every part runs on an embedded redis-server of its own. Nothing else should
run on the machine meanwhile: CPU contention distorts every figure.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from producer.local_stack.embedded_redis import RedisServer  # noqa: E402
from common.sampling import SamplingParams  # noqa: E402
from common.settings import get_settings  # noqa: E402
from producer import AsyncClient, Client, Session  # noqa: E402
from producer.local_stack.demo_cli import percentile  # noqa: E402
from producer.local_stack.stack import LocalStack, StackOptions  # noqa: E402

REPEATS = 2  # throughput runs per side; the best of each is compared (this VM's noise is about 20%)
SYSTEM = ("You are a patient assistant for engineers who run language model servers. " * 24).strip()


def prompts(n: int) -> list[str]:
    return [f"Write a short story about a robot named Unit {i} who learns to paint." for i in range(n)]


def run_stack(tp: int, extra: list[str], body):
    """Start Redis + supervisor + one group, run ``body(client)``, stop everything; return body's value."""
    with tempfile.TemporaryDirectory(prefix="tpq-bench-") as data:
        os.environ["TPQ_DATA_DIR"] = data
        os.environ.pop("TPQ_REDIS_URL", None)
        settings = get_settings()
        stack = LocalStack(settings, StackOptions(groups=1, tp=tp, worker_args=extra, log_level="WARNING"))
        try:
            stack.start()
            stack.wait_ready()
            with Client(stack.redis_url, settings=settings) as client:
                client.submit(prompt="warm up", max_tokens=4).result(timeout=120)
                return body(client)
        finally:
            stack.stop()


def throughput_requests(n: int, max_tokens: int) -> list[dict]:
    return [{"prompt": p, "session_id": f"tp{i}",
             "sampling": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}
            for i, p in enumerate(prompts(n))]


def pipeline_throughput(client: Client, n: int, max_tokens: int, stream: bool = True) -> dict:
    """Generated tok/s from submit to the last result; with ``stream``, one thread reads each job's stream."""
    received: list[float] = []
    lock = threading.Lock()

    def consume(handle):
        latencies = []
        for event in handle.stream(timeout=600):
            latencies.append(time.time() - event.sampled_at)
        with lock:
            received.extend(latencies)
        return handle.result(timeout=600)

    start = time.perf_counter()
    batch = client.submit_batch(throughput_requests(n, max_tokens))
    if stream:
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(consume, batch))
    else:
        results = [outcome for _, outcome in batch.results(timeout=600)]
    elapsed = time.perf_counter() - start
    tokens = sum(r.usage.generated_tokens for r in results)
    return {"tok_s": tokens / elapsed, "tokens": tokens, "latency_ms": [x * 1000 for x in received]}


def pipeline_throughput_async(client: Client, n: int, max_tokens: int) -> dict:
    """As :func:`pipeline_throughput`, with an :class:`AsyncClient` reading every stream in one event loop."""
    async def run() -> dict:
        received: list[float] = []

        async def consume(handle):
            async for event in handle.stream(timeout=600):
                received.append(time.time() - event.sampled_at)
            return await handle.result(timeout=600)

        async with AsyncClient(client.url, settings=client.settings) as async_client:
            start = time.perf_counter()
            batch = await async_client.submit_batch(throughput_requests(n, max_tokens))
            results = await asyncio.gather(*(consume(handle) for handle in batch))
            elapsed = time.perf_counter() - start
        tokens = sum(r.usage.generated_tokens for r in results)
        return {"tok_s": tokens / elapsed, "tokens": tokens, "latency_ms": [x * 1000 for x in received]}

    return asyncio.run(run())


def interactive_latency(client: Client, streams: int = 4, max_tokens: int = 64) -> list[float]:
    def consume(i):
        handle = client.submit(prompt=f"Tell me about the color number {i}.", session_id=f"lat{i}",
                               temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [(time.time() - e.sampled_at) * 1000 for e in handle.stream(timeout=300)]

    with ThreadPoolExecutor(max_workers=streams) as pool:
        return [x for chunk in pool.map(consume, range(streams)) for x in chunk]


def multi_turn(client: Client, sessions: int = 8, turns: int = 6) -> list[float]:
    """Client-side TTFT (ms) of turns 2.. of every session."""
    def converse(i):
        session = Session(client, session_id=f"mt-{i}", system=SYSTEM)
        ttfts = []
        for turn in range(turns):
            sent = time.perf_counter()
            handle = session.send(f"Session {i}, question {turn}: name one reason to batch requests.",
                                  temperature=0, max_tokens=16)
            stream = iter(handle.stream(timeout=300))
            next(stream)
            first = time.perf_counter() - sent
            for _ in stream:
                pass
            session.complete(handle, timeout=300)
            if turn > 0:
                ttfts.append(first * 1000)
        return ttfts

    with ThreadPoolExecutor(max_workers=sessions) as pool:
        return [x for chunk in pool.map(converse, range(sessions)) for x in chunk]


def engine_throughput(tp: int, n: int, max_tokens: int) -> list[float]:
    from gpu_worker.llm import Engine

    runs = []
    with Engine("smollm2-135m-instruct", tp=tp) as engine:
        engine.generate("warm up", SamplingParams(max_tokens=4))
        for _ in range(REPEATS):
            start = time.perf_counter()
            results = engine.generate(prompts(n), SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                 ignore_eos=True))
            runs.append(sum(r.usage.generated_tokens for r in results) / (time.perf_counter() - start))
    return runs


def enqueue_rate(count: int = 10_000) -> float:
    with RedisServer() as server:
        with Client(server.url) as client:
            requests = [{"prompt": f"offline prompt {i}", "sampling": {"max_tokens": 16}} for i in range(count)]
            start = time.perf_counter()
            client.submit_batch(requests)
            return count / (time.perf_counter() - start)


def summary(values: list[float]) -> str:
    return (f"p50 {percentile(values, 50):.2f}  p99 {percentile(values, 99):.2f}  "
            f"(n={len(values)}, mean {statistics.fmean(values):.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    print("enqueue rate ...", flush=True)
    rate = enqueue_rate()
    print("engine in process (before the pipeline) ...", flush=True)
    engine_runs = engine_throughput(args.tp, args.concurrency, args.max_tokens)
    print("pipeline (prefix cache on) ...", flush=True)
    on = run_stack(args.tp, [], lambda c: ([pipeline_throughput(c, args.concurrency, args.max_tokens)
                                            for _ in range(REPEATS)],
                                           [pipeline_throughput(c, args.concurrency, args.max_tokens, stream=False)
                                            for _ in range(REPEATS)],
                                           [pipeline_throughput_async(c, args.concurrency, args.max_tokens)
                                            for _ in range(REPEATS)],
                                           interactive_latency(c), multi_turn(c)))
    print("pipeline (prefix cache off) ...", flush=True)
    off_turns = run_stack(args.tp, ["--no-prefix-caching"], multi_turn)
    print("engine in process (after the pipeline) ...", flush=True)
    engine_runs += engine_throughput(args.tp, args.concurrency, args.max_tokens)

    throughput_runs, quiet_runs, async_runs, interactive, on_turns = on
    throughput = max(throughput_runs, key=lambda run: run["tok_s"])
    quiet = max(run["tok_s"] for run in quiet_runs)
    async_best = max(async_runs, key=lambda run: run["tok_s"])
    engine_tok_s = max(engine_runs)
    print(f"\ntpqueue pipeline vs engine, SmolLM2-135M fp32, tp={args.tp}, "
          f"{args.concurrency} concurrent x {args.max_tokens} tokens")
    print(f"| figure | engine in process | through the pipeline | ratio | target |")
    print(f"|---|---:|---:|---:|---|")
    print(f"| generated tok/s (engine: best of {2 * REPEATS}, before and after; pipeline: best of {REPEATS}) | {engine_tok_s:.1f} | {throughput['tok_s']:.1f} | "
          f"{throughput['tok_s'] / engine_tok_s:.2f} | >= 0.9 |")
    print(f"| generated tok/s, {args.concurrency} streams read by one asyncio client (best of {REPEATS}) | "
          f"{engine_tok_s:.1f} | {async_best['tok_s']:.1f} | {async_best['tok_s'] / engine_tok_s:.2f} | >= 0.9 |")
    print(f"| generated tok/s, results only, no stream readers (best of {REPEATS}) | {engine_tok_s:.1f} | "
          f"{quiet:.1f} | {quiet / engine_tok_s:.2f} | |")
    print(f"| TTFT of turns 2-6, ms (p50) | cache off {percentile(off_turns, 50):.0f} | cache on "
          f"{percentile(on_turns, 50):.0f} | {percentile(off_turns, 50) / percentile(on_turns, 50):.1f}x | >= 3x |")
    print(f"\ntoken delivery latency, rank 0 sampled -> client received (ms):")
    print(f"  4 interactive streams:        {summary(interactive)}")
    print(f"  {args.concurrency} streams of the throughput run: {summary(throughput['latency_ms'])}")
    print(f"  {args.concurrency} streams, asyncio client:     {summary(async_best['latency_ms'])}")
    pipeline_runs = ", ".join(f"{run['tok_s']:.1f}" for run in throughput_runs)
    engine_list = ", ".join(f"{x:.1f}" for x in engine_runs)
    async_list = ", ".join(f"{run['tok_s']:.1f}" for run in async_runs)
    print(f"throughput runs, tok/s: engine (before, after) {engine_list}; pipeline {pipeline_runs}; asyncio client {async_list}")
    print(f"multi-turn TTFT ms, cache on:  {summary(on_turns)}")
    print(f"multi-turn TTFT ms, cache off: {summary(off_turns)}")
    print(f"enqueue rate, 10,000-job submit_batch: {rate:,.0f} jobs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
