"""``tpq model fetch [NAME]``: download and convert a model once, print where it is."""
from __future__ import annotations

import argparse

from common.errors import TpqError
from gpu_worker.engine.engine_config import DEFAULT_MODEL
from gpu_worker.weights.model_store import resolve_model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tpq model", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="fetch and convert a model into the cache (no-op when present)")
    fetch.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"registered name, model directory or .gguf file (default {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    try:
        print(resolve_model(args.model))
    except TpqError as exc:
        parser.exit(1, f"tpq model: {exc}\n")
    return 0
