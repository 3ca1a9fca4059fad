"""``tpq worker``: run one tensor-parallel worker group against Redis, restarting it when a rank dies."""
from __future__ import annotations

import argparse
import re
import sys
import threading

from common.errors import TpqError
from common.groups import hostname
from common.metrics import port_arg
from common.settings import get_settings
from common.worker_options import add_engine_options



def default_group_name() -> str:
    """This host's name, made a valid group name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", hostname())[:64] or "group"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpq worker", description=__doc__)
    parser.add_argument("--group", default=None, help="group name, unique per deployment (default: the host name)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: TPQ_TP, 1)")
    add_engine_options(parser, with_defaults=True)
    parser.add_argument("--no-restart", action="store_true", help="exit when the group fails instead of restarting")
    parser.add_argument("--metrics-port", type=port_arg, default=None,
                        help="port of rank 0's Prometheus /metrics; 0 turns it off (default: TPQ_WORKER_METRICS_PORT, "
                             "9461)")
    parser.add_argument("--rank0", action="store_true", help=argparse.SUPPRESS)  # the launcher's child
    parser.add_argument("--restarts", type=int, default=0, help=argparse.SUPPRESS)  # the launcher's count so far
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's ready pipe
    return parser


def engine_options(args: argparse.Namespace, settings) -> dict:
    """The EngineConfig fields the command line asks for."""
    options = {"model": args.model or settings.model, "tp": args.tp or settings.tp, "dtype": args.dtype,
               "max_num_seqs": args.max_num_seqs, "kv_cache_gb": args.kv_cache_gb,
               "kv_cache_dtype": args.kv_cache_dtype,
               "enable_prefix_caching": not args.no_prefix_caching}
    if args.device:
        options["device"] = args.device
    if args.quantization:
        options["quantization"] = args.quantization
    if args.enforce_eager:
        options["enforce_eager"] = True
    return options


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except TpqError as exc:
        parser.exit(2, f"tpq worker: {exc}\n")
    if settings.redis_url is None:
        parser.exit(2, "tpq worker: set TPQ_REDIS_URL to the Redis the group serves (or run `tpq up`, which "
                       "starts Redis, a supervisor and groups together)\n")
    group = args.group or default_group_name()
    try:
        from common.keys import validate_group_name

        validate_group_name(group)
    except TpqError as exc:
        parser.exit(2, f"tpq worker: --group: {exc}\n")
    stop = threading.Event()
    if args.rank0:
        from gpu_worker.serve.group import GroupOptions, install_stop_signals, serve

        install_stop_signals(stop)
        port = settings.worker_metrics_port if args.metrics_port is None else args.metrics_port
        options = GroupOptions(group, engine_options(args, settings), metrics_port=port, restarts=args.restarts,
                               ready_fd=args.ready_fd)
        return serve(settings, settings.redis_url, options, stop)
    from gpu_worker.serve.group import install_stop_signals
    from gpu_worker.serve.launcher import GroupLauncher

    install_stop_signals(stop)
    command = [sys.executable, "-m", "common.cli", "worker", *argv, "--group", group, "--rank0"]
    launcher = GroupLauncher(command, group, restarts_option="--restarts", ready_option="--ready-fd")
    return launcher.run(stop, restart=not args.no_restart)
