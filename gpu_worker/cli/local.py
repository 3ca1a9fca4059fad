"""``tpq local "PROMPT"``: chat with the model in this process (no Redis), streaming the answer."""
from __future__ import annotations

import argparse
import sys
import time

from pydantic import ValidationError

from common.errors import TpqError
from common.sampling import SamplingParams
from gpu_worker.engine.engine_config import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpq local", description=__doc__)
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--system", default=None, help="a system message (default: the model's own)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, not as a chat")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValidationError as exc:
        parser.exit(2, f"tpq local: bad sampling options:\n{exc}\n")
    prompt = args.prompt if args.raw else (
        ([{"role": "system", "content": args.system}] if args.system else [])
        + [{"role": "user", "content": args.prompt}])
    from gpu_worker.llm import Engine  # imports torch: only now

    try:
        with Engine(args.model, tp=args.tp, dtype=args.dtype) as engine:
            start = time.perf_counter()
            if args.stream:
                count = 0
                for event in engine.stream(prompt, sampling):
                    print(event.text, end="", flush=True)
                    count += 1
                    reason = event.finish_reason
            else:
                [result] = engine.generate(prompt, sampling)
                print(result.text, end="")
                count, reason = result.usage.generated_tokens, result.finish_reason
            elapsed = time.perf_counter() - start
    except (TpqError, ValidationError) as exc:
        parser.exit(1, f"tpq local: {exc}\n")
    print(f"\n[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tok/s, finish: {reason.value}]",
          file=sys.stderr)
    return 0
