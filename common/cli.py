"""``tpq``: one command, many subcommands, each living beside the code it drives.

A subcommand's module is imported only when it runs, so client commands
never import torch. Options before the command apply to every tpq process
it starts: ``--log-format json`` (or ``TPQ_LOG_FORMAT=json``) makes each of
them log one JSON object per line, ``--log-level`` sets ``TPQ_LOG_LEVEL``.
The supervisor and client commands run with unpickling disabled
(:mod:`common.pickle_guard`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from common.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from common.pickle_guard import disable_pickle

# subcommand -> (module with a ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("gpu_worker.cli.model", "fetch and locate model weights (tpq model fetch)"),
    "local": ("gpu_worker.cli.local", "generate with an in-process engine, no Redis (streams to the terminal)"),
    "worker": ("gpu_worker.cli.worker", "run a tensor-parallel worker group against Redis (restarted when a rank dies)"),
    "demo": ("producer.local_stack.demo_cli", "the pipeline end to end: stack up, a streamed chat, a 100-prompt batch, stop"),
    "up": ("producer.local_stack.up_cli", "run the whole local stack: Redis (embedded unless TPQ_REDIS_URL), supervisor, groups"),
    "generate": ("producer.cli.generate", "submit one prompt through Redis and stream the answer"),
    "chat": ("producer.cli.chat", "a multi-turn chat in the terminal (one session, one worker group)"),
    "batch": ("producer.cli.batch", "run a JSONL file of requests as an offline batch, resumably"),
    "status": ("producer.cli.status", "show groups, ranks, shards, queues and jobs (--json for tools)"),
    "supervisor": ("router.cli", "run the recovery supervisor: shard map, dead and hung groups, rq cleanup"),
    "health": ("producer.cli.health", "check the deployment (or one group): exit 0 when healthy, 1 with the reason"),
    "gateway": ("producer.gateway.cli", "serve the OpenAI-compatible HTTP API (chat, completions, streams) on Redis"),
    "keys": ("producer.cli.keys", "the gateway's API keys and their rate limits: create (shown once), list, revoke"),
}

# Commands that read Redis and need no pickle themselves: unpickling is disabled before they run.
# (`worker` spawns ranks that unpickle their start-up handshake: its rank 0 disables pickle after that.)
PICKLE_FREE_COMMANDS = frozenset({"supervisor", "up", "demo", "generate", "chat", "batch", "status", "health",
                                  "gateway", "keys"})

# Commands that run the engine (or start processes that do): they need `pip install 'tpqueue[worker]'`.
WORKER_COMMANDS = frozenset({"model", "local", "worker", "up", "demo"})
WORKER_EXTRA_MODULE = "torch"

# global option -> (environment variable it sets for this process and its children, valid values)
GLOBAL_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "--log-format": ("TPQ_LOG_FORMAT", LOG_FORMATS),
    "--log-level": ("TPQ_LOG_LEVEL", LOG_LEVELS),
}


def usage() -> str:
    lines = ["usage: tpq [--log-format text|json] [--log-level LEVEL] <command> [options]",
             "       (tpq <command> --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def split_global_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``({env var: value}, rest)`` for the global options at the front of ``argv``; ValueError if bad."""
    found: dict[str, str] = {}
    rest = list(argv)
    while rest and rest[0].split("=", 1)[0] in GLOBAL_OPTIONS:
        option, sep, value = rest.pop(0).partition("=")
        if not sep:
            if not rest:
                raise ValueError(f"{option} needs a value")
            value = rest.pop(0)
        env_var, choices = GLOBAL_OPTIONS[option]
        value = value.upper() if env_var == "TPQ_LOG_LEVEL" else value.lower()
        if value not in choices:
            raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
        found[env_var] = value
    return found, rest


def has_worker_extra() -> bool:
    """Whether the worker's dependencies are installed (the ``worker`` extra), without importing them."""
    try:
        return importlib.util.find_spec(WORKER_EXTRA_MODULE) is not None
    except (ImportError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        env, argv = split_global_options(argv)
    except ValueError as exc:
        print(f"tpq: {exc}\n\n{usage()}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"tpq: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command in WORKER_COMMANDS and not has_worker_extra():
        print(f"tpq {command}: this command runs the model, which needs the worker's dependencies (torch, "
              "transformers, ...): pip install 'tpqueue[worker]' (from a checkout: pip install '.[worker]')",
              file=sys.stderr)
        return 2
    os.environ.update(env)  # the processes this command starts (groups, ranks, supervisor) log the same way
    configure_logging()
    if command in PICKLE_FREE_COMMANDS:
        disable_pickle()
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
