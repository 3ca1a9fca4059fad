"""``tpq gateway``'s options: loopback only unless anonymous access is allowed (no API keys yet)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.gateway.cli import check_host, is_loopback

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.com", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_public_address_needs_allow_anonymous() -> None:
    check_host("127.0.0.1", allow_anonymous=False)
    check_host("0.0.0.0", allow_anonymous=True)
    with pytest.raises(ValueError, match="no API keys yet.*--allow-anonymous"):
        check_host("0.0.0.0", allow_anonymous=False)


def test_tpq_gateway_refuses_a_public_address_before_touching_redis() -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TPQ_")},
           "TPQ_REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing listens there: the refusal must come first
    done = subprocess.run([sys.executable, "-m", "common.cli", "gateway", "--host", "0.0.0.0"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr and "later step" in done.stderr
    bad_port = subprocess.run([sys.executable, "-m", "common.cli", "gateway", "--port", "70000"], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
    assert bad_port.returncode == 2 and "--port must be in 1..65535" in bad_port.stderr
