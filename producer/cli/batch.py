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

A file of OpenAI Batch API lines (``{"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions", "body": {...}}``, told apart by
its first line) is checked as the gateway's ``POST /v1/batches`` checks it
(every bad line is named before anything runs; the body's ``model`` is not
checked against the groups) and written in OpenAI's output format: one
``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`` line per request, failed ones included; ids already in the
output are skipped the same way.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from tqdm import tqdm

from common.errors import InvalidRequestError, TpqError
from common.redis_conn import redact_url
from common.schemas import parse_request
from producer.cli.common import open_client
from producer.client import Client
from producer.gateway.batch_lines import BatchLine, is_openai_line, output_line, parse_lines
from producer.gateway.records import now_s

MAX_ERRORS_SHOWN = 20
"""Bad lines of an OpenAI batch file named in the error (the rest are counted)."""


@dataclass(frozen=True)
class Unit:
    """One input line as run: the key its output line is found by, its jobs, and how to render their outcomes."""

    key: str
    requests: list[Any]
    render: Callable[[list[Any]], tuple[dict[str, Any], bool]]  # outcomes in job order -> (output line, failed)

    @property
    def job_ids(self) -> list[str]:
        return [r["request_id"] if isinstance(r, dict) else r.request_id for r in self.requests]


def _file_prefix(data: bytes) -> str:
    return "b" + hashlib.sha256(data).hexdigest()[:12]


def is_openai_file(path: Path) -> bool:
    """Whether the file's first non-blank line is an OpenAI batch line (else: tpq's own format)."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return is_openai_line(json.loads(raw))
                except ValueError:
                    return False
    return False


def read_openai_lines(path: Path) -> list[tuple[BatchLine, str]]:
    """The checked lines of an OpenAI batch file, each with its base job id; every bad line raises, named."""
    data = path.read_bytes()
    lines, errors = parse_lines(data, None)
    if errors:
        shown = "; ".join(f"{path}:{e.line}: {e.message}" if e.line else f"{path}: {e.message}"
                          for e in errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise InvalidRequestError(f"{len(errors)} bad lines: {shown}{more}")
    prefix = _file_prefix(data)
    return [(line, f"{prefix}-{line.number}") for line in lines]


def read_lines(path: Path) -> tuple[bool, list[Any]]:
    """Whether the file is in OpenAI's format, and its checked lines (as ``read_openai_lines``/``read_requests``)."""
    if is_openai_file(path):
        return True, read_openai_lines(path)
    return False, read_requests(path)


def to_units(openai_format: bool, lines: list[Any], client: Client) -> list[Unit]:
    """The lines :func:`read_lines` read, as :class:`Unit` s; OpenAI's lines are built into jobs by ``client``."""
    if not openai_format:
        return [Unit(r["request_id"], [r], lambda outcomes, rid=r["request_id"]: (
            _line(rid, outcomes[0]), isinstance(outcomes[0], TpqError))) for r in lines]
    units = []
    for line, base in lines:
        requests = line.requests(client.build_request, base)
        units.append(Unit(line.custom_id, requests,  # type: ignore[arg-type]
                          lambda outcomes, line=line, base=base: output_line(line, base, now_s(), outcomes)))
    return units


def read_requests(path: Path) -> list[dict[str, Any]]:
    """The requests in a JSONL file, each with a stable ``request_id``; a bad line raises, naming it."""
    data = path.read_bytes()
    prefix = _file_prefix(data)
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
    """Request ids (``custom_id`` s for OpenAI's format) that already have a line in the output file."""
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
            done.add(item["custom_id"] if "custom_id" in item else item["request_id"])
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
        openai_format, lines = read_lines(args.input)
        done = finished_ids(args.output)
        client, settings = open_client("batch")
    except (OSError, UnicodeDecodeError, TpqError) as exc:
        print(f"tpq batch: {exc}", file=sys.stderr)
        return 2
    try:
        units = to_units(openai_format, lines, client)
    except TpqError as exc:
        client.close()
        print(f"tpq batch: {exc}", file=sys.stderr)
        return 2
    todo = [u for u in units if u.key not in done]
    print(f"tpq batch: {len(units)} requests, {len(units) - len(todo)} already in {args.output}, "
          f"{len(todo)} to run", file=sys.stderr)
    counts = {"finished": 0, "failed": 0, "tokens": 0}
    started = time.perf_counter()
    try:
        with client, args.output.open("a", encoding="utf-8") as out, \
                tqdm(total=len(units), initial=len(units) - len(todo), unit="job", file=sys.stderr) as bar:
            for chunk in _chunks(todo, settings.max_batch_size):
                batch = client.submit_batch([r for unit in chunk for r in unit.requests], wait_s=args.wait_s)
                for unit, outcomes in _unit_outcomes(chunk, batch.results(timeout=args.timeout_s)):
                    line, failed = unit.render(outcomes)
                    out.write(json.dumps(line) + "\n")
                    out.flush()
                    counts["failed" if failed else "finished"] += 1
                    counts["tokens"] += sum(o.usage.generated_tokens for o in outcomes if not isinstance(o, TpqError))
                    bar.update(1)
    except (TpqError, redis.RedisError) as exc:
        print(f"\ntpq batch: {redact_url(str(exc))}; run the same command again to resume", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(f"tpq batch: {counts['finished']} finished, {counts['failed']} failed; {counts['tokens']} tokens in "
          f"{elapsed:.1f} s ({counts['tokens'] / max(elapsed, 1e-9):.1f} tok/s)", file=sys.stderr)
    return 0 if counts["failed"] == 0 else 1


def _chunks(units: list[Unit], most_jobs: int) -> list[list[Unit]]:
    """``units`` in order, grouped so that no group has more than ``most_jobs`` jobs (or a unit alone)."""
    chunks: list[list[Unit]] = []
    jobs = 0
    for unit in units:
        if not chunks or jobs + len(unit.requests) > most_jobs:
            chunks.append([])
            jobs = 0
        chunks[-1].append(unit)
        jobs += len(unit.requests)
    return chunks


def _unit_outcomes(units: list[Unit], results: Any) -> Any:
    """``(unit, outcomes in job order)`` for each unit, as soon as its last job's outcome is in."""
    unit_of = {job_id: unit for unit in units for job_id in unit.job_ids}
    got: dict[str, Any] = {}
    for handle, outcome in results:
        got[handle.id] = outcome
        unit = unit_of[handle.id]
        if all(job_id in got for job_id in unit.job_ids):
            yield unit, [got.pop(job_id) for job_id in unit.job_ids]


def _line(job_id: str, outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, TpqError):
        return {"request_id": job_id, "error": str(outcome)}
    return outcome.model_dump(mode="json")
