"""``tpq health --gateway URL``: a container health check that asks the gateway's own ``/health``."""
from __future__ import annotations

import socket

from producer.cli import health
from tests.gateway.conftest import register_fake_group, wait_for


def test_a_gateway_with_a_live_group_is_healthy_and_one_without_is_not(start_gateway, redis_url, capsys):
    gateway = start_gateway()
    assert health.main(["--gateway", gateway.url]) == 1
    line = capsys.readouterr().out
    assert line.startswith(f"FAIL: gateway {gateway.url} answers 503:") and "group" in line
    register_fake_group(redis_url)
    # the gateway reads the groups at most once a second (DEPLOYMENT_TTL_S): wait until it sees this one
    wait_for(lambda: health.main(["--gateway", gateway.url + "/"]) == 0, "the gateway to see the group", 10)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"OK: gateway {gateway.url}/ serves (1 group(s))"


def test_an_unreachable_gateway_fails_with_the_reason(capsys):
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        assert health.main(["--gateway", url, "--timeout-s", "2"]) == 1
    line = capsys.readouterr().out
    assert line.startswith(f"FAIL: gateway {url} cannot be reached:"), line
