"""``tpq batch in.jsonl -o out.jsonl``: run an offline batch through the queues, resumably, with a progress bar.

Each input line is a JSON request: ``{"prompt": ...}`` or ``{"messages":
[...]}``, with optional ``sampling``, ``session_id``, ``request_id``. A line
without a ``request_id`` gets ``<file hash>-<line number>``, so running the
same command again submits nothing that already exists and writes only the
results not yet in the output: ids already in ``out.jsonl`` are skipped, jobs
that finished while the command was away are collected, not re-run.
Each output line is a result (``request_id``, ``text``, ``token_ids``,
``finish_reason``, ``usage``, ``timings``, ``group``) or ``{"request_id",
"error"}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import redis
from tqdm import tqdm

from common.errors import InvalidRequestError, TpqError
from common.redis_conn import redact_url
from common.schemas import parse_request
from producer.cli.common import open_client


def read_requests(path: Path) -> list[dict[str, Any]]:
    """The requests in a JSONL file, each with a stable ``request_id``; a bad line raises, naming it."""
    data = path.read_bytes()
    prefix = "b" + hashlib.sha256(data).hexdigest()[:12]
    requests = []
    for number, line in enumerate(data.decode("utf-8", errors="strict").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{path}:{number}: a request must be a JSON object")
        item.setdefault("request_id", f"{prefix}-{number}")
        try:
            parse_request(item, what=f"request on line {number}")
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{path}:{number}: {exc}") from None
        requests.append(item)
    return requests


def finished_ids(path: Path) -> set[str]:
    """Request ids that already have a line in the output file."""
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            done.add(json.loads(line)["request_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: its job is collected again
    return done


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tpq batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="JSONL file of requests")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL file of results (appended)")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for room in a full queue")
    parser.add_argument("--timeout-s", type=float, default=None, help="give up after this long (default: never)")
    args = parser.parse_args(argv)
    try:
        requests = read_requests(args.input)
        done = finished_ids(args.output)
        todo = [r for r in requests if r["request_id"] not in done]
        client, settings = open_client("batch")
    except (OSError, UnicodeDecodeError, TpqError) as exc:
        print(f"tpq batch: {exc}", file=sys.stderr)
        return 2
    print(f"tpq batch: {len(requests)} requests, {len(requests) - len(todo)} already in {args.output}, "
          f"{len(todo)} to run", file=sys.stderr)
    counts = {"finished": 0, "failed": 0, "tokens": 0}
    started = time.perf_counter()
    try:
        with client, args.output.open("a", encoding="utf-8") as out, \
                tqdm(total=len(requests), initial=len(requests) - len(todo), unit="job", file=sys.stderr) as bar:
            step = settings.max_batch_size
            for first in range(0, len(todo), step):
                batch = client.submit_batch(todo[first:first + step], wait_s=args.wait_s)
                for handle, outcome in batch.results(timeout=args.timeout_s):
                    out.write(json.dumps(_line(handle.id, outcome)) + "\n")
                    out.flush()
                    if isinstance(outcome, TpqError):
                        counts["failed"] += 1
                    else:
                        counts["finished"] += 1
                        counts["tokens"] += outcome.usage.generated_tokens
                    bar.update(1)
    except (TpqError, redis.RedisError) as exc:
        print(f"\ntpq batch: {redact_url(str(exc))}; run the same command again to resume", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(f"tpq batch: {counts['finished']} finished, {counts['failed']} failed; {counts['tokens']} tokens in "
          f"{elapsed:.1f} s ({counts['tokens'] / max(elapsed, 1e-9):.1f} tok/s)", file=sys.stderr)
    return 0 if counts["failed"] == 0 else 1


def _line(job_id: str, outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, TpqError):
        return {"request_id": job_id, "error": str(outcome)}
    return outcome.model_dump(mode="json")
