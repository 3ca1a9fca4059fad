"""``tpq chat --session ID``: a multi-turn chat in the terminal; every turn goes to the session's group."""
from __future__ import annotations

import argparse
import sys

import redis

from common.errors import TpqError
from common.redis_conn import redact_url
from producer.cli.common import add_sampling_options, open_client, sampling_from
from producer.session import Session

QUIT = {"/quit", "/exit"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tpq chat", description=__doc__)
    parser.add_argument("--session", default=None, help="session id (default: a new one, printed)")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    add_sampling_options(parser)
    args = parser.parse_args(argv)
    try:
        client, _ = open_client("chat")
    except (TpqError, redis.RedisError) as exc:
        print(f"tpq chat: {redact_url(str(exc))}", file=sys.stderr)
        return 1
    with client:
        session = Session(client, session_id=args.session, system=args.system)
        print(f"session {session.session_id}; /quit or Ctrl-D to leave", file=sys.stderr)
        while True:
            try:
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if text in QUIT:
                return 0
            if not text:
                continue
            try:
                handle = session.send(text, **sampling_from(args))
                print("model> ", end="", flush=True)
                for event in handle.stream(timeout=args.timeout_s):
                    print(event.text, end="", flush=True)
                print()
                session.complete(handle, timeout=args.timeout_s)
            except (TpqError, redis.RedisError) as exc:
                print(f"\ntpq chat: {redact_url(str(exc))}", file=sys.stderr)
