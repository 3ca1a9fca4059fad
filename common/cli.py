"""``tpq``: one command, many subcommands, each living beside the code it drives.

A subcommand's module is imported only when it runs, so client commands
never import torch.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# subcommand -> (module with a ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("gpu_worker.cli.model", "fetch and locate model weights (tpq model fetch)"),
    "local": ("gpu_worker.cli.local", "generate with an in-process engine, no Redis (streams to the terminal)"),
    "worker": ("gpu_worker.cli.worker", "run a tensor-parallel worker group against Redis (restarted when a rank dies)"),
    "demo": ("router.demo_cli", "the pipeline end to end: stack up, a streamed chat, a 100-prompt batch, stop"),
    "up": ("router.up_cli", "run the whole local stack: Redis (embedded unless TPQ_REDIS_URL), supervisor, groups"),
    "generate": ("producer.cli.generate", "submit one prompt through Redis and stream the answer"),
    "chat": ("producer.cli.chat", "a multi-turn chat in the terminal (one session, one worker group)"),
    "batch": ("producer.cli.batch", "run a JSONL file of requests as an offline batch, resumably"),
    "status": ("producer.cli.status", "show groups, ranks, shards, queues and jobs (--json for tools)"),
    "supervisor": ("router.cli", "run the recovery supervisor: shard map, dead and hung groups, rq cleanup"),
}


def usage() -> str:
    lines = ["usage: tpq <command> [options]   (tpq <command> --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"tpq: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    level = os.environ.get("TPQ_LOG_LEVEL", "INFO").upper()  # validated with the other settings later
    logging.basicConfig(level=level if level in LOG_LEVELS else "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rq.worker").setLevel(logging.WARNING)  # tpqueue logs each job's lifecycle itself
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
