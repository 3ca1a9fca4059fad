"""``tpq supervisor``: run the recovery supervisor against the Redis in ``TPQ_REDIS_URL``.

Runs passes until Ctrl-C or SIGTERM, then releases the supervisor lock so a
standby takes over at once. A second supervisor started against the same
Redis waits as a standby. ``--once`` runs a single pass and prints what it did.
Serves Prometheus metrics on ``--metrics-port`` (default
TPQ_SUPERVISOR_METRICS_PORT, 9460; 0 turns them off).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from common.errors import TpqError
from common.metrics import port_arg
from common.redis_conn import connect, redact_url
from common.settings import get_settings
from router.metrics import serve_supervisor_metrics
from router.supervisor import DEFAULT_INTERVAL_S, PassResult, Supervisor

log = logging.getLogger(__name__)

NO_REDIS_URL = (
    "tpq supervisor: TPQ_REDIS_URL is not set. Set it to the Redis the workers use "
    "(e.g. export TPQ_REDIS_URL=redis://localhost:6379/0), or run `tpq up`, which starts Redis, "
    "a supervisor and a worker group together."
)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``tpq supervisor`` argument parser."""
    parser = argparse.ArgumentParser(prog="tpq supervisor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval-s", type=_positive_float, default=DEFAULT_INTERVAL_S,
                        help=f"seconds between passes (default {DEFAULT_INTERVAL_S})")
    parser.add_argument("--once", action="store_true", help="run one pass, print what it did, and exit")
    parser.add_argument("--metrics-port", type=port_arg, default=None,
                        help="port of the Prometheus /metrics; 0 turns it off "
                             "(default: TPQ_SUPERVISOR_METRICS_PORT, 9460)")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``tpq supervisor``; returns the exit status (0 ok, 1 runtime error, 2 usage or config)."""
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except TpqError as exc:
        print(f"tpq supervisor: {exc}", file=sys.stderr)
        return 2
    if settings.redis_url is None:
        print(NO_REDIS_URL, file=sys.stderr)
        return 2
    try:
        conn = connect(settings.redis_url, client_name="tpq-supervisor", check=True)
    except TpqError as exc:
        print(f"tpq supervisor: {exc}", file=sys.stderr)
        return 1
    supervisor = Supervisor(conn, settings, interval_s=args.interval_s)
    try:
        if args.once:
            return _run_once(supervisor)
        log.info("supervisor %s watching %s every %.2f s (%d shards)", supervisor.owner_id,
                 redact_url(settings.redis_url), args.interval_s, settings.num_shards)
        port = settings.supervisor_metrics_port if args.metrics_port is None else args.metrics_port
        metrics_conn = connect(settings.redis_url, client_name="tpq-supervisor-metrics")
        metrics = serve_supervisor_metrics(port, settings, supervisor, metrics_conn)
        stop = threading.Event()
        try:
            with _stop_on_signals(stop):
                supervisor.run(stop)
        finally:
            if metrics is not None:
                metrics.close()
            metrics_conn.close()
        log.info("supervisor %s stopped", supervisor.owner_id)
        return 0
    finally:
        conn.close()


def _run_once(supervisor: Supervisor) -> int:
    try:
        result = supervisor.run_once()
    finally:
        supervisor.release()
    print(describe_pass(result))
    return 0


def describe_pass(result: PassResult) -> str:
    """A short human summary of one pass."""
    if not result.leader:
        return "standby: another supervisor holds the lock; did nothing"
    if result.settling:
        return f"waiting: {result.settling}"
    lines = [f"live groups: {', '.join(result.live) or 'none'}"]
    lines += [f"declared dead: {group}: {reason}" for group, reason in result.declared.items()]
    if result.epoch is not None:
        lines.append(f"shard map written at epoch {result.epoch}: {len(result.moved)} shard(s) moved")
    if result.requeued or result.failed:
        lines.append(f"jobs requeued: {len(result.requeued)}, failed: {len(result.failed)}")
    if result.expired:
        lines.append(f"expired started jobs handed to rq's cleanup: {result.expired}")
    return "\n".join(lines)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM set ``stop`` (the handlers only set the flag)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping after this pass", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
