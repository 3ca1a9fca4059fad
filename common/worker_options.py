"""The engine options of ``tpq worker``, which ``tpq up`` takes too and passes on to each group it starts.

One table, so the two commands cannot drift apart: :func:`add_engine_options`
puts them on a parser (``tpq up`` with no defaults, so that only what the
user gave is passed on), :func:`engine_argv` turns the parsed values back
into ``tpq worker`` arguments. Torch-free: ``tpq up`` runs in the client's
install.
"""
from __future__ import annotations

import argparse
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
QUANTIZATIONS = ("int8", "q4")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


# (flag, argparse keyword arguments, default of ``tpq worker``)
ENGINE_OPTIONS: list[tuple[str, dict[str, Any], Any]] = [
    ("--model", {"help": "model name or path (default: TPQ_MODEL)"}, None),
    ("--dtype", {"choices": DTYPES, "help": "weights' and activations' dtype (default float32)"}, "float32"),
    ("--device", {"choices": DEVICES, "help": "default: cuda when available"}, None),
    ("--quantization", {"choices": QUANTIZATIONS,
                        "help": "weight format: int8 = per-channel int8 weights, q4 = the GGUF file's "
                        "4-bit blocks (default: the dtype's)"}, None),
    ("--max-num-seqs", {"type": _positive_int, "help": "sequences decoded together at most (default 64)"}, 64),
    ("--kv-cache-gb", {"type": _positive_float, "help": "KV-cache memory per rank (default 1.0)"}, 1.0),
    ("--kv-cache-dtype", {"choices": ("auto", "fp8"), "help": "KV-cache storage: auto = the dtype, fp8 = e4m3 "
                          "(twice bf16's tokens in the same memory)"}, "auto"),
    ("--no-prefix-caching", {"action": "store_true", "help": "turn the prefix cache off"}, False),
    ("--enforce-eager", {"action": "store_true", "help": "run decode eagerly, compiling nothing at start "
                         "(the default for now; see EngineConfig.enforce_eager)"}, False),
]


def add_engine_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    """Add the engine options; ``with_defaults=False`` leaves every unset one None (``tpq up``)."""
    for flag, kwargs, default in ENGINE_OPTIONS:
        parser.add_argument(flag, default=default if with_defaults else None, **kwargs)


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The ``tpq worker`` arguments for the engine options set in ``args`` (those left None are not passed)."""
    argv: list[str] = []
    for flag, kwargs, _ in ENGINE_OPTIONS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is None or value is False:
            continue
        argv += [flag] if kwargs.get("action") == "store_true" else [flag, str(value)]
    return argv
