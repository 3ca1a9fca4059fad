"""``tpq gateway``: the OpenAI-compatible HTTP gateway on its own (FastAPI served by uvicorn).

It is stateless (all state in Redis), so several replicas can run behind a
load balancer. While no API key exists (``tpq keys create NAME`` makes one)
anyone who reaches the port may submit jobs, so it listens on a non-loopback
address only once a key exists, or when ``--allow-anonymous`` (or
``TPQ_HTTP_ALLOW_ANONYMOUS=1``) accepts that. Started on a public address
without it, it keeps requiring a key even if every key is revoked later.
"""
from __future__ import annotations

import argparse
import sys

from common.errors import TpqError
from common.redis_conn import connect, redact_url
from common.settings import Settings, get_settings
from producer.gateway.auth import any_keys, is_loopback
from producer.local_stack.stack_info import redis_url_for

__all__ = ["build_parser", "check_host", "is_loopback", "main", "serve"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tpq gateway`` argument parser."""
    parser = argparse.ArgumentParser(prog="tpq gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="address to listen on (default: TPQ_HTTP_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: TPQ_HTTP_PORT, 8000)")
    parser.add_argument("--allow-anonymous", action="store_true", default=None,
                        help="listen on a non-loopback address even while no API key exists (default: "
                             "TPQ_HTTP_ALLOW_ANONYMOUS, off)")
    return parser


def needs_keys(host: str, allow_anonymous: bool) -> bool:
    """Whether listening on ``host`` needs an API key to exist: a non-loopback address, not allowed anonymously."""
    return not is_loopback(host) and not allow_anonymous


def check_host(host: str, allow_anonymous: bool, keys_exist: bool) -> None:
    """Raise :class:`ValueError` for a non-loopback ``host`` while no key exists, unless anonymous access is allowed."""
    if not needs_keys(host, allow_anonymous) or keys_exist:
        return
    raise ValueError(
        f"refusing to listen on {host}: no API key exists yet, so anyone who can reach this address could submit "
        "jobs. Create a key first (tpq keys create NAME; every /v1 request then needs it), or pass "
        "--allow-anonymous (TPQ_HTTP_ALLOW_ANONYMOUS=1) to accept that; or listen on 127.0.0.1."
    )


def serve(settings: Settings, host: str, port: int, redis_url: str) -> None:
    """Run the gateway until SIGINT or SIGTERM."""
    import uvicorn

    from producer.gateway.app import create_app

    uvicorn.run(create_app(settings, redis_url), host=host, port=port, log_level=settings.log_level.value.lower(),
                log_config=None, timeout_graceful_shutdown=5)


def main(argv: list[str]) -> int:
    """Entry point of ``tpq gateway``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        settings = get_settings()
        host = args.host if args.host is not None else settings.http_host
        port = args.port if args.port is not None else settings.http_port
        allow = args.allow_anonymous if args.allow_anonymous is not None else settings.http_allow_anonymous
        url = redis_url_for(settings, "gateway")
        with connect(url, check=True, retries=1) as conn:
            check_host(host, allow, keys_exist=needs_keys(host, allow) and any_keys(conn))
        settings = settings.model_copy(update={"http_host": host, "http_allow_anonymous": allow})
    except (TpqError, ValueError) as exc:
        print(f"tpq gateway: {exc}", file=sys.stderr)
        return 2
    print(f"tpq gateway: http://{host}:{port}/v1 on Redis {redact_url(url)}", flush=True)
    serve(settings, host, port, url)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
