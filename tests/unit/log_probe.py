"""A stand-in tpq subcommand for tests/unit/test_logs.py: logs a few lines through the tpq CLI's setup."""
import logging
import os

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    assert os.environ["TPQ_LOG_FORMAT"] == "json"  # passed on to the processes a command starts
    log.info("probe started")
    log.warning("Redis at %s", "redis://:hunter2@localhost:6379/0")
    return 0
