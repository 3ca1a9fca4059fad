"""``tpq demo``: the whole pipeline end to end on this machine, then shut down.

It brings the local stack up (an embedded redis-server unless TPQ_REDIS_URL
is set, the supervisor, one worker group, the OpenAI-compatible gateway),
streams one chat answer through the Python client, one through the
``openai`` SDK and the gateway, makes one ``curl`` call, runs a 100-prompt
offline batch with a progress bar, prints throughput and latency
percentiles, and stops everything.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tqdm import tqdm

from common.errors import TpqError
from common.results import JobResult
from common.settings import get_settings
from producer import Client, Session
from producer.local_stack.embedded_redis import free_port
from producer.local_stack.stack import LocalStack, StackError, StackOptions

QUESTION = "In two sentences, why do language model servers batch requests?"
HTTP_QUESTION = "Name three uses of a message queue, in one sentence."
GATEWAY_READY_S = 60.0


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
    stack = LocalStack(settings, StackOptions(groups=1, tp=args.tp, log_level="WARNING", http_port=free_port()))
    try:
        stack.start()
        print(f"[demo] starting Redis, the supervisor and a worker group (tp={args.tp}) ...", flush=True)
        stack.wait_ready()
        with Client(stack.redis_url, settings=settings) as client:
            chat(client)
            over_http(stack)
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


def over_http(stack: LocalStack) -> None:
    """The same model through the gateway: a streamed answer with the ``openai`` SDK, then one ``curl`` call."""
    base_url = wait_for_gateway(stack)
    try:
        import openai  # the dev extra brings it (make demo installs it); the gateway itself does not need it
    except ImportError:
        print("[demo] the openai package is not installed (pip install openai): skipping its part\n")
    else:
        for name in ("httpx", "httpx2"):  # the SDK's HTTP client logs every request at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        sdk = openai.OpenAI(base_url=base_url, api_key="none")
        sdk_model = sdk.models.list().data[0].id
        print(f"[demo] the same through the gateway at {base_url}, with the openai SDK (model {sdk_model!r})\n"
              f"user> {HTTP_QUESTION}\nmodel> ", end="", flush=True)
        for chunk in sdk.chat.completions.create(model=sdk_model, messages=[{"role": "user", "content": HTTP_QUESTION}],
                                                 max_tokens=64, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print("\n")
    with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
        model = json.loads(response.read())["data"][0]["id"]
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    command = ["curl", "-sS", f"{base_url}/completions", "-H", "Content-Type: application/json",
               "-d", json.dumps(body)]
    print("[demo] " + " ".join(command[:3]) + " -H 'Content-Type: application/json' -d '" + command[-1] + "'")
    if shutil.which("curl") is None:
        print("[demo] curl is not installed: skipping the call\n")
        return
    reply = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout)
    print(f"[demo] -> {reply['choices'][0]['text']!r} ({reply['usage']['completion_tokens']} tokens, "
          f"finish_reason {reply['choices'][0]['finish_reason']!r})\n")


def wait_for_gateway(stack: LocalStack) -> str:
    """The gateway's base URL once its ``/health`` answers 200; :class:`StackError` if it does not in time."""
    deadline = time.monotonic() + GATEWAY_READY_S
    while True:
        base_url = stack.gateway_url
        if base_url is None:
            raise StackError(f"the gateway on port {stack.options.http_port} exited (port taken?)")
        try:
            with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5) as response:
                if response.status == 200:
                    return base_url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise StackError(f"the gateway at {base_url} did not answer /health within {GATEWAY_READY_S:.0f} s")
        time.sleep(0.2)


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
