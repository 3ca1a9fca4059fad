"""What the client commands share: finding Redis, sampling options, and error exits."""
from __future__ import annotations

import argparse
from typing import Any

from common.settings import Settings, get_settings
from producer.local_stack.stack_info import redis_url_for
from producer.client import Client


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens to generate at most (default 256, or TPQ_MAX_TOKENS_LIMIT if lower)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)


def sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keywords of ``Client.submit`` that the command line set."""
    options = {"temperature": args.temperature}
    for name in ("max_tokens", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def open_client(command: str) -> tuple[Client, Settings]:
    """A client of ``TPQ_REDIS_URL``, else of the running ``tpq up`` stack (clear error when neither)."""
    settings = get_settings()
    return Client(redis_url_for(settings, command), settings=settings), settings
