"""The chaos soak's command line, ``python -m bench.soak``: its flags, the stack it starts and the run.

The run starts the stack, then the client threads and the chaos thread;
stops the chaos once every job is submitted; waits for the jobs; then
checks them and prints the report. Run from the repository root; ``--help``
describes the soak.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

import bench.soak
from bench.soak.chaos import DEFAULT_FAULTS, FAULTS, Chaos
from bench.soak.checks import find, settle
from bench.soak.gateways import Gateways
from bench.soak.http_clients import HttpJobs
from bench.soak.report import report
from bench.soak.workload import Clients, Clock, make_specs, work_units
from common.redis_conn import connect
from common.settings import get_settings
from producer import Client
from producer.local_stack.embedded_redis import RedisServer
from producer.local_stack.stack import LocalStack, StackOptions

SOAK_ENV = {  # fast failure detection, as in the fault tests (tests/conftest.py FAST_ENV)
    "TPQ_HEARTBEAT_INTERVAL_S": "0.25",
    "TPQ_HEARTBEAT_TTL_S": "1.5",
    "TPQ_HANG_TIMEOUT_S": "10",
    "TPQ_NUM_SHARDS": "16",
    "TPQ_SUPERVISOR_METRICS_PORT": "0",
    "TPQ_WORKER_METRICS_PORT": "0",
}


def parse_args() -> argparse.Namespace:
    """The soak's flags, with ``kinds``: the faults it injects (``--faults``, ``--redis-sigkill``, ``--tp``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=bench.soak.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--groups", type=int, default=1, choices=(1, 2))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between a recovery and the next fault")
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--redis-sigkill", action="store_true",
                        help="also SIGKILL Redis, then drop the AOF's last --aof-lost-s of writes")
    parser.add_argument("--aof-lost-s", type=float, default=1.0,
                        help="what a SIGKILL drops from the AOF: a machine crash with appendfsync everysec loses "
                             "about 1 s (a killed process alone loses nothing it wrote); 0 keeps the file whole")
    parser.add_argument("--clients", type=int, default=12, help="client threads, each with one unit of work at a time")
    parser.add_argument("--batch-size", type=int, default=8, help="session-less jobs per submit_batch")
    parser.add_argument("--session-fraction", type=float, default=0.7)
    parser.add_argument("--stream-fraction", type=float, default=0.5, help="of the session jobs")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--grace-s", type=float, default=300.0, help="time the jobs have after the chaos stops")
    parser.add_argument("--recovery-timeout-s", type=float, default=120.0,
                        help="a part not back within this is reported wedged")
    parser.add_argument("--http", action="store_true",
                        help="also run --gateways gateway replicas, send --http-fraction of the session jobs through "
                             "them, and kill them among the faults (gateway-kill)")
    parser.add_argument("--gateways", type=int, default=2, help="gateway replicas with --http")
    parser.add_argument("--http-fraction", type=float, default=0.5, help="of the session jobs, with --http")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-file", default=None, help="the stack's logs (default: a file in /tmp, printed)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    args.kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    if unknown := set(args.kinds) - set(FAULTS):
        parser.error(f"unknown fault(s) {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}")
    if args.redis_sigkill and "redis-kill" not in args.kinds:
        args.kinds.append("redis-kill")
    if args.http and "gateway-kill" not in args.kinds:
        args.kinds.append("gateway-kill")
    if "gateway-kill" in args.kinds and not args.http:
        parser.error("the gateway-kill fault needs --http (the gateway replicas)")
    if args.tp < 2 and "rank" in args.kinds:
        args.kinds.remove("rank")  # no non-zero rank to kill
    return args


def redirect_stderr(path: str) -> None:
    """The stack's processes inherit fd 2: point it at ``path``; this process's ``sys.stderr`` stays where it was."""
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def main() -> int:
    """Start Redis and the stack on a tiny random Llama in a temporary directory, run the soak, stop them."""
    args = parse_args()
    rng = random.Random(args.seed)
    log_file = args.log_file or f"/tmp/tpq-soak-{os.getpid()}.log"
    print(f"stack logs: {log_file}", flush=True)
    redirect_stderr(log_file)
    logging.basicConfig(filename=log_file, level=logging.WARNING,
                        format="%(asctime)s soak %(levelname)s %(name)s: %(message)s")
    from tests.checkpoints import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="tpq-soak-") as tmp:
        os.environ.update(SOAK_ENV, TPQ_DATA_DIR=str(Path(tmp) / "data"))
        model = write_tiny_llama(Path(tmp) / "model")
        server = RedisServer(Path(tmp) / "redis").start()
        os.environ["TPQ_REDIS_URL"] = server.url
        settings = get_settings()
        stack = LocalStack(settings, StackOptions(
            groups=args.groups, tp=args.tp, log_level=args.log_level, metrics=False,
            worker_args=["--model", str(model), "--kv-cache-gb", "0.05"]))
        gateways = Gateways(server.url, args.gateways, args.log_level) if args.http else None
        try:
            stack.start()
            stack.wait_ready(timeout_s=300)
            if gateways is not None:
                gateways.start().wait_healthy()
            with Client(server.url, settings=settings) as client:
                return run(args, rng, stack, server, client, gateways)
        finally:
            if gateways is not None:
                gateways.stop()
            stack.stop()
            server.close()


def run(args: argparse.Namespace, rng: random.Random, stack: LocalStack, server: RedisServer, client: Client,
        gateways: Gateways | None) -> int:
    """The soak on a started stack: 0 when no job was lost and every defect is explained by a lossy crash."""
    specs = make_specs(args.jobs, rng, args)
    clock = Clock(args.grace_s)
    http = HttpJobs(gateways, served_model(gateways), clock.over) if gateways is not None else None
    clients = Clients(client, work_units(specs, args.batch_size), args.clients, clock, http)
    chaos = Chaos(stack, server, args.kinds, args.interval_s, args.recovery_timeout_s, rng, args.aof_lost_s,
                  gateways, http)
    started = time.monotonic()
    print(f"soak: {len(specs)} jobs, {args.clients} client threads, faults: {', '.join(args.kinds)}", flush=True)
    clients.start()
    chaos.start()
    while not clients.all_submitted.wait(10):
        print(f"  {time.monotonic() - started:.0f} s: {clients.done()} of {len(specs)} jobs ended, "
              f"{len(chaos.faults)} faults", flush=True)
    print(f"  {time.monotonic() - started:.0f} s: every job submitted; stopping the chaos", flush=True)
    chaos.stop()
    clock.chaos_stopped()
    clients.join()
    elapsed = time.monotonic() - started
    conn = connect(server.url)
    try:
        unsettled = settle(client, conn, clients.outcomes, timeout_s=120)
        found = find(clients.outcomes, chaos.faults, conn, unsettled)
        report(args, specs, clients, chaos, conn, elapsed, found)
        return 0 if found.clean else 1
    finally:
        conn.close()


def served_model(gateways: Gateways) -> str:
    """The one model the stack's groups serve, as the gateway names it (``GET /v1/models``)."""
    models = [m["id"] for m in httpx.get(f"{gateways.url(0)}/v1/models", timeout=10).json()["data"]]
    if len(models) != 1:
        raise RuntimeError(f"expected the gateway to serve one model, it serves {models}")
    return models[0]


if __name__ == "__main__":
    sys.exit(main())
