"""Logging: JSON lines, job lifecycle events, Redis passwords never shown, the tpq global log options."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import main, split_global_options
from common.logs import configure_logging, job_event, redact

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def root_logger():
    """Restore the root logger's handlers and level after a test that configures logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_redact_hides_passwords_of_every_redis_url_in_a_line():
    line = "connect redis://:hunter2@db:6379/0 failed; fallback rediss://user:pa55@h2/1, unix://:pw@/run/r.sock?db=2"
    shown = redact(line)
    assert "hunter2" not in shown and "pa55" not in shown and ":pw@" not in shown
    assert "redis://:***@db:6379/0" in shown and "rediss://user:***@h2/1" in shown
    assert redact("no url here") == "no url here"


def test_json_lines_carry_job_event_fields_and_hide_passwords(root_logger, capsys):
    configure_logging("INFO", "json", force=True)
    log = logging.getLogger("tpq.test")
    job_event(log, "finished", "job-1", queue="gen.3", group="g0", finish_reason="stop", tokens=12)
    log.warning("Redis %s unreachable", "redis://:topsecret@h:6379/0")
    try:
        raise ConnectionError("cannot reach redis://:topsecret@h:6379/0")
    except ConnectionError:
        log.exception("pump failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all("topsecret" not in line for line in lines)
    event, warning, failure = map(json.loads, lines)
    assert event["event"] == "job.finished" and event["job_id"] == "job-1"
    assert (event["queue"], event["group"], event["rank"], event["finish_reason"], event["tokens"]) == (
        "gen.3", "g0", 0, "stop", 12)
    assert event["msg"] == "job job-1 finished: queue=gen.3 group=g0 rank=0 finish_reason=stop tokens=12"
    assert event["level"] == "INFO" and event["logger"] == "tpq.test" and event["pid"] == os.getpid()
    assert warning["msg"] == "Redis redis://:***@h:6379/0 unreachable"
    assert "ConnectionError" in failure["exc"] and "***" in failure["exc"]


def test_text_lines_hide_passwords_too(root_logger, capsys):
    configure_logging("INFO", "text", force=True)
    logging.getLogger("tpq.test").info("using %s", "redis://u:pw123@h/0")
    err = capsys.readouterr().err
    assert "pw123" not in err and "redis://u:***@h/0" in err and " INFO tpq.test: " in err


def test_configure_logging_leaves_a_foreign_handler_alone(root_logger):
    foreign = logging.NullHandler()
    root_logger.addHandler(foreign)
    configure_logging("DEBUG", "json")
    assert foreign in root_logger.handlers and len(root_logger.handlers) == len(set(root_logger.handlers))


def test_global_options_set_the_environment_of_every_process_a_command_starts():
    assert split_global_options(["--log-format", "JSON", "--log-level=debug", "status", "--json"]) == (
        {"TPQ_LOG_FORMAT": "json", "TPQ_LOG_LEVEL": "DEBUG"}, ["status", "--json"])
    assert split_global_options(["status", "--log-format", "json"]) == ({}, ["status", "--log-format", "json"])
    with pytest.raises(ValueError, match="--log-format must be one of text, json"):
        split_global_options(["--log-format", "xml", "status"])
    with pytest.raises(ValueError, match="needs a value"):
        split_global_options(["--log-level"])


def test_bad_global_option_is_a_usage_error(capsys):
    assert main(["--log-format", "yaml", "status"]) == 2
    assert "--log-format must be one of" in capsys.readouterr().err


def test_a_tpq_process_logs_json_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TPQ_")}
    env["TPQ_DATA_DIR"] = str(tmp_path)
    code = ("import logging, sys; from common.cli import main; import common.cli as c; "
            "c.SUBCOMMANDS['probe'] = ('tests.unit.log_probe', ''); sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "--log-format", "json", "probe"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(json.loads(line)["logger"] == "tests.unit.log_probe" for line in lines)
    assert "hunter2" not in done.stderr
