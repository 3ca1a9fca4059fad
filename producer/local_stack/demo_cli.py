"""``tpq demo``: the whole pipeline end to end on this machine, then shut down.

It brings the local stack up (an embedded redis-server unless TPQ_REDIS_URL
is set, the supervisor, one worker group), streams one chat answer, runs a
100-prompt offline batch with a progress bar, prints throughput and latency
percentiles, and stops everything.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from tqdm import tqdm

from common.errors import TpqError
from common.results import JobResult
from common.settings import get_settings
from producer import Client, Session
from producer.local_stack.stack import LocalStack, StackError, StackOptions

QUESTION = "In two sentences, why do language model servers batch requests?"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, by linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tpq demo", description=__doc__)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the group (default 1)")
    parser.add_argument("--prompts", type=int, default=100, help="offline batch size (default 100)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per batch answer (default 32)")
    args = parser.parse_args(argv)
    settings = get_settings()
    stack = LocalStack(settings, StackOptions(groups=1, tp=args.tp, log_level="WARNING"))
    try:
        stack.start()
        print(f"[demo] starting Redis, the supervisor and a worker group (tp={args.tp}) ...", flush=True)
        stack.wait_ready()
        with Client(stack.redis_url, settings=settings) as client:
            chat(client)
            batch(client, args.prompts, args.max_tokens)
    except (StackError, TpqError) as exc:
        print(f"[demo] failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("[demo] stopping the stack ...", flush=True)
        stack.stop()
    return 0


def chat(client: Client) -> None:
    session = Session(client, session_id="demo-chat")
    print(f"\n[demo] chat, streamed token by token\nuser> {QUESTION}\nmodel> ", end="", flush=True)
    handle = session.send(QUESTION, max_tokens=96, temperature=0)
    for event in handle.stream(timeout=120):
        print(event.text, end="", flush=True)
    session.complete(handle, timeout=120)
    result = handle.result(timeout=120)
    print(f"\n[demo] {result.usage.generated_tokens} tokens from group {result.group}; first token after "
          f"{result.timings.time_to_first_token_s * 1000:.0f} ms\n")


def batch(client: Client, count: int, max_tokens: int) -> None:
    requests = [{"prompt": f"Here is one interesting fact about the number {i}:",
                 "sampling": {"max_tokens": max_tokens, "temperature": 0.7, "seed": i}} for i in range(count)]
    print(f"[demo] offline batch: {count} prompts x {max_tokens} tokens", flush=True)
    started = time.perf_counter()
    handle = client.submit_batch(requests)
    results: list[JobResult] = []
    failed = 0
    with tqdm(total=count, unit="job") as bar:
        for _job, outcome in handle.results(timeout=600):
            if isinstance(outcome, JobResult):
                results.append(outcome)
            else:
                failed += 1
            bar.update(1)
    elapsed = time.perf_counter() - started
    tokens = sum(r.usage.generated_tokens for r in results)
    ttft = [r.timings.time_to_first_token_s * 1000 for r in results]
    total = [r.timings.total_s * 1000 for r in results]
    print(f"[demo] {len(results)} finished, {failed} failed in {elapsed:.1f} s: "
          f"{tokens / elapsed:.1f} generated tok/s, {len(results) / elapsed:.2f} jobs/s")
    for name, values in (("time to first token", ttft), ("end-to-end latency", total)):
        print(f"[demo] {name:>20} ms: p50 {percentile(values, 50):8.0f}  p90 {percentile(values, 90):8.0f}  "
              f"p99 {percentile(values, 99):8.0f}  (mean {statistics.fmean(values):.0f})")
