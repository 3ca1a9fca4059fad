"""``tpq up``: the whole local stack in one command (Redis, the supervisor, worker groups); Ctrl-C stops it."""
from __future__ import annotations

import argparse
import signal
import threading

from common.errors import TpqError
from common.redis_conn import redact_url
from common.settings import get_settings
from common.worker_options import add_engine_options, engine_argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpq up", description=__doc__)
    parser.add_argument("--groups", type=int, default=1, help="worker groups to run (default 1)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per group (default: TPQ_TP, 1)")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0, help="how long groups may take to load")
    parser.add_argument("--no-metrics", action="store_true",
                        help="serve no Prometheus /metrics (default: the supervisor on TPQ_SUPERVISOR_METRICS_PORT, "
                             "9460, group i on TPQ_WORKER_METRICS_PORT + i, 9461 + i)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="port of the OpenAI-compatible gateway (default: TPQ_HTTP_PORT, 8000; 0: none)")
    add_engine_options(parser.add_argument_group("engine options, passed on to every group's tpq worker"),
                       with_defaults=False)
    return parser


def worker_args(args: argparse.Namespace) -> list[str]:
    """The ``tpq worker`` options ``tpq up`` passes on to each group."""
    return engine_argv(args)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.groups < 1:
        parser.error("--groups must be at least 1")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        parser.error(f"--http-port must be in 0..65535 (0: no gateway), got {args.http_port}")
    try:
        settings = get_settings()
    except TpqError as exc:
        parser.exit(2, f"tpq up: {exc}\n")
    from producer.local_stack.stack import LocalStack, StackError, StackOptions

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(settings, StackOptions(groups=args.groups, tp=args.tp or settings.tp,
                                              worker_args=worker_args(args), metrics=not args.no_metrics,
                                              http_port=settings.http_port if args.http_port is None else args.http_port))
    try:
        stack.start()
        print(f"tpq up: waiting for {args.groups} group(s) to load the model ...", flush=True)
        if not stack.wait_ready(args.ready_timeout_s, stop):
            return 130
        print(f"tpq up: ready. Redis {redact_url(stack.redis_url)}; groups {', '.join(stack.group_names)}.\n"
              "  try: tpq generate \"Why is the sky blue?\" --session me   (Ctrl-C here stops everything)",
              flush=True)
        if stack.gateway_url is not None:
            print(f"  OpenAI API: {stack.gateway_url} (e.g. openai.OpenAI(base_url=..., api_key='none'))", flush=True)
        elif stack.options.http_port:
            print(f"tpq up: the gateway on port {stack.options.http_port} exited (port taken?); running without it",
                  flush=True)
        served = {name: port for name, port in stack.metrics_ports.items() if port}
        if served:
            print("  metrics: " + ", ".join(f"{name} http://localhost:{port}/metrics" for name, port in served.items()),
                  flush=True)
        stop.wait()
    except (StackError, TpqError) as exc:
        print(f"tpq up: {exc}", flush=True)
        return 1
    finally:
        print("tpq up: stopping ...", flush=True)
        stack.stop()
    return 0
