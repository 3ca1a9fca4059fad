"""``tpq generate "PROMPT"``: submit one chat turn through Redis and stream the answer to the terminal."""
from __future__ import annotations

import argparse
import sys
import time

import redis

from common.errors import TpqError
from common.redis_conn import redact_url
from producer.cli.common import add_sampling_options, open_client, sampling_from


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpq generate", description=__doc__)
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--session", default=None, help="session id: keeps a conversation on one worker group")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, not as a chat")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up waiting after this long")
    add_sampling_options(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    handle = None
    try:
        client, _ = open_client("generate")
        with client:
            if args.raw:
                handle = client.submit(prompt=args.prompt, session_id=args.session, **sampling_from(args))
            else:
                messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": args.prompt}]
                handle = client.submit(messages=messages, session_id=args.session, **sampling_from(args))
            started = time.perf_counter()
            for event in handle.stream(timeout=args.timeout_s):
                print(event.text, end="", flush=True)
            result = handle.result(timeout=args.timeout_s)
    except (TpqError, redis.RedisError) as exc:
        print(f"\ntpq generate: {redact_url(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if handle is not None:
            handle.cancel()
        print("\ntpq generate: cancelled", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    print(f"\n[{result.finish_reason.value}; {result.usage.generated_tokens} tokens in {elapsed:.2f} s; "
          f"first token after {result.timings.time_to_first_token_s * 1000:.0f} ms; group {result.group}]",
          file=sys.stderr)
    return 0
