"""``tpq keys``: the gateway's API keys (create, list, revoke) in Redis.

``tpq keys create NAME [--rpm N] [--tpm N] [--priority interactive|batch]``
prints the new key once, on stdout (the note about it goes to stderr, so
``KEY=$(tpq keys create ci)`` works); Redis keeps only its SHA-256 digest.
``tpq keys list`` shows names, display prefixes, limits and creation times,
never a key. ``tpq keys revoke NAME`` deletes a key; gateways refuse it at
once. While no key exists the gateway's ``/v1`` routes are open.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from common.errors import TpqError
from common.redis_conn import connect, redact_url
from common.settings import get_settings
from producer.gateway.auth import PRIORITIES, ApiKey, create_key, list_keys, revoke_key
from producer.local_stack.stack_info import redis_url_for


def build_parser() -> argparse.ArgumentParser:
    """The ``tpq keys`` argument parser."""
    parser = argparse.ArgumentParser(prog="tpq keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=None,
                        help="Redis to use (default: TPQ_REDIS_URL, else the running `tpq up` stack's)")
    commands = parser.add_subparsers(dest="action", required=True, metavar="{create,list,revoke}")
    create = commands.add_parser("create", help="make a key and print it (once)")
    create.add_argument("name", help="a unique name: 1-64 letters, digits, '_', '.', '-'")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute at most (default: no limit)")
    create.add_argument("--tpm", type=int, default=None,
                        help="tokens per minute at most, prompt and completion (default: no limit)")
    create.add_argument("--priority", choices=PRIORITIES, default="interactive",
                        help="the highest priority the key's requests run at (batch: always batch)")
    listing = commands.add_parser("list", help="the keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true", help="one JSON object per key, per line")
    revoke = commands.add_parser("revoke", help="delete a key; gateways refuse it from then on")
    revoke.add_argument("name")
    return parser


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(records: list[ApiKey]) -> str:
    """``tpq keys list``'s table."""
    if not records:
        return "no API keys: the gateway's /v1 routes are open (tpq keys create NAME makes one)"
    rows = [("NAME", "KEY", "RPM", "TPM", "PRIORITY", "CREATED")]
    rows += [(r.name, f"{r.prefix}...", _limit(r.rpm), _limit(r.tpm), r.priority,
              time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def as_json(record: ApiKey) -> str:
    """One key's record as a JSON line (no key, no digest)."""
    return json.dumps({"name": record.name, "prefix": record.prefix, "created": record.created,
                       "rpm": record.rpm, "tpm": record.tpm, "priority": record.priority})


def main(argv: list[str]) -> int:
    """Entry point of ``tpq keys``."""
    args = build_parser().parse_args(argv)
    try:
        url = args.redis_url or redis_url_for(get_settings(), "keys")
        with connect(url, check=True, retries=1, client_name="tpq-keys") as conn:
            if args.action == "create":
                key, record = create_key(conn, args.name, rpm=args.rpm, tpm=args.tpm, priority=args.priority)
                print(f"tpq keys: created {record.name!r} (rpm {_limit(record.rpm)}, tpm {_limit(record.tpm)}, "
                      f"priority {record.priority}) on Redis {redact_url(url)}. The key follows; it is not "
                      "stored and cannot be shown again:", file=sys.stderr)
                print(key, flush=True)
            elif args.action == "list":
                records = list_keys(conn)
                print("\n".join(as_json(r) for r in records) if args.json else render(records))
            else:
                record = revoke_key(conn, args.name)
                left = list_keys(conn)
                print(f"tpq keys: revoked {record.name!r} ({record.prefix}...)")
                if not left:
                    print("tpq keys: no key is left: gateways on loopback (or --allow-anonymous) are open again; "
                          "one started on a public address without --allow-anonymous refuses every /v1 "
                          "request until a key exists", file=sys.stderr)
    except TpqError as exc:
        print(f"tpq keys: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
