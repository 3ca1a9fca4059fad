"""docker-compose.yml, deploy/prometheus.yml and the Grafana provisioning, checked by reading them.

There is no Docker engine in CI, so these tests do what `docker compose
config` and a first start would catch: every tpqueue service runs a real
`tpq` subcommand whose own argparse parser accepts its options, its TPQ_*
environment is valid tpqueue settings, Prometheus scrapes every component
on the port it serves, and every Grafana panel queries metrics the code
exports (and every metric the issue asks for is on the dashboard).
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from common.cli import SUBCOMMANDS
from common.metrics import metric_types, sample_names
from common.settings import get_settings, valid_env_vars

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"REDIS_PASSWORD": "0123abcd", "GRAFANA_ADMIN_PASSWORD": "s3cret"}
_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (``${X}``, ``${X:-default}``, ``${X-default}``, ``${X:?error}``, ``$$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        found = env.get(name)
        unset = found is None or (found == "" and op is not None and op.startswith(":"))
        if op is None:
            return found or ""
        if op.endswith("-"):
            return arg if unset else found
        if unset:
            raise KeyError(f"{name}: {arg}")
        return found

    return _VAR.sub(one, value)


def load_compose(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), env)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(dict(SECRETS))


def tpq_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image", "").startswith("tpqueue")}


def parse_tpq(argv: list[str]):
    """Parse ``tpq <command> <options>`` with the command's own parser; fails the test on a bad option."""
    assert argv[0] == "tpq", argv
    assert argv[1] in SUBCOMMANDS, f"{argv[1]!r} is not a tpq subcommand"
    parser = importlib.import_module(SUBCOMMANDS[argv[1]][0]).build_parser()
    try:
        return parser.parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"tpq {argv[1]} refuses the options {argv[2:]}")


def test_required_secrets_must_come_from_the_environment():
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        load_compose({"GRAFANA_ADMIN_PASSWORD": "x"})
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        load_compose({"REDIS_PASSWORD": "x"})
    raw = (ROOT / "docker-compose.yml").read_text()
    assert SECRETS["REDIS_PASSWORD"] not in raw


def test_every_tpqueue_service_runs_a_real_tpq_command_with_valid_options_and_settings(compose, monkeypatch):
    services = tpq_services(compose)
    assert set(services) == {"supervisor", "worker", "gateway"}
    commands = {name: service["command"] for name, service in services.items()}
    for name, service in services.items():
        parse_tpq(service["command"])
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD"
        parse_tpq(check[1:])
        environment = service["environment"]
        unknown = {k for k in environment if k.upper().startswith("TPQ_")} - set(valid_env_vars())
        assert not unknown, f"{name}: unknown settings {unknown}"
        for key in [k for k in os.environ if k.upper().startswith("TPQ_")]:
            monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, str(value))
        settings = get_settings()  # every value valid, together
        assert settings.redis_url == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        assert settings.metrics_host == "0.0.0.0"
    worker = parse_tpq(commands["worker"])
    assert "--tp" in commands["worker"] and worker.tp == 1 and worker.device == "cuda"
    assert commands["supervisor"][:2] == ["tpq", "supervisor"]


def test_the_gateway_listens_where_its_port_is_published_and_checks_its_own_health(compose):
    gateway = compose["services"]["gateway"]
    args = parse_tpq(gateway["command"])
    assert args.host == "0.0.0.0"  # inside the container; the host publishes it on loopback only
    [published] = gateway["ports"]
    host_ip, host_port, container_port = published.split(":")
    assert (host_ip, host_port, int(container_port)) == ("127.0.0.1", "8000", args.port)
    check = parse_tpq(gateway["healthcheck"]["test"][1:])
    assert check.gateway == f"http://127.0.0.1:{args.port}"
    # a gateway on 0.0.0.0 without keys must be allowed to start, or `docker compose up` fails at once
    assert gateway["environment"]["TPQ_HTTP_ALLOW_ANONYMOUS"] == "1"
    assert gateway["environment"]["TPQ_REDIS_URL"] == compose["services"]["supervisor"]["environment"]["TPQ_REDIS_URL"]


def test_the_worker_reserves_nvidia_gpus_and_redis_keeps_an_aof_behind_a_password(compose):
    services = compose["services"]
    [device] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["worker"]["shm_size"]  # NCCL needs more than Docker's 64 MB /dev/shm
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "requirepass" in redis_command
    assert "$REDIS_PASSWORD" in redis_command  # read in the container from its environment ($$ in the file)
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in tpq_services(compose):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_prometheus_scrapes_every_tpqueue_component_on_its_metrics_port(compose):
    services = compose["services"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    scraped: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            scraped |= {(name, int(dns["port"])) for name in dns["names"]}
    for name, service in tpq_services(compose).items():
        args = parse_tpq(service["command"])
        env = service["environment"]
        if name == "gateway":  # its metrics are on its HTTP port (GET /metrics)
            port = args.port
        else:
            default = env["TPQ_SUPERVISOR_METRICS_PORT"] if name == "supervisor" else env["TPQ_WORKER_METRICS_PORT"]
            port = args.metrics_port if args.metrics_port is not None else int(default)
        assert port and (name, port) in scraped, f"Prometheus does not scrape {name}:{port}"


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    for source in mounts:
        assert (ROOT / source).exists(), source
    provisioning = ROOT / "deploy/grafana/provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards/tpqueue.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/tpqueue.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == datasource["uid"]


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/tpqueue.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def test_every_grafana_query_names_only_metrics_the_code_exports():
    exported = sample_names()
    queries = dashboard_queries()
    assert len(queries) > 20
    for title, expr in queries:
        names = set(re.findall(r"\btpq_[a-z0-9_]+", expr))
        assert names, f"{title}: {expr} queries no tpqueue metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported"


def test_the_dashboard_shows_every_metric_the_operators_asked_for():
    shown = {name for _, expr in dashboard_queries() for name in re.findall(r"\btpq_[a-z0-9_]+", expr)}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in shown}
    wanted = {
        "tpq_queue_depth", "tpq_jobs_enqueued_total", "tpq_jobs_started_total", "tpq_jobs_finished_total",
        "tpq_jobs_failed_total", "tpq_jobs_retried_total", "tpq_jobs_cancelled_total",
        "tpq_jobs_cancelled_queued_total", "tpq_jobs_expired_total", "tpq_job_queue_time_seconds",
        "tpq_job_time_to_first_token_seconds", "tpq_inter_token_latency_seconds",
        "tpq_job_end_to_end_latency_seconds", "tpq_prompt_tokens_total", "tpq_cached_tokens_total",
        "tpq_generated_tokens_total", "tpq_running_sequences", "tpq_waiting_sequences", "tpq_batch_size",
        "tpq_kv_cache_usage_ratio", "tpq_prefix_cache_hit_tokens_total", "tpq_heartbeat_age_seconds",
        "tpq_group_restarts_total", "tpq_shard_reassignments_total",
    }
    assert wanted <= set(metric_types())
    assert wanted <= shown, sorted(wanted - shown)
