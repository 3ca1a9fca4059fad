"""common.metrics against a real redis-server: the client's Redis counters, the supervisor's /metrics, the server.

No worker runs here, so jobs stay queued: the queue depths, the enqueued
counts and a cancel while queued are exactly known.
"""
from __future__ import annotations

import threading
import time

import pytest

from common.groups import GroupInfo, make_heartbeat, register_group, write_heartbeat
from common.metrics import GroupMetrics, MetricsServer, RedisState, SnapshotCollector, serve_metrics
from common.redis_conn import connect
from common.results import FinishReason, JobResult, Timings, TokenEvent, Usage
from common.settings import get_settings
from producer import Client
from router.metrics import serve_supervisor_metrics
from router.supervisor import Supervisor
from producer.local_stack.embedded_redis import free_port
from tests.metrics_scrape import Scrape, scrape


@pytest.fixture
def settings(redis_url, monkeypatch):
    monkeypatch.setenv("TPQ_REDIS_URL", redis_url)
    monkeypatch.setenv("TPQ_NUM_SHARDS", "4")
    return get_settings(metrics_host="127.0.0.1")


def test_supervisor_metrics_show_what_clients_enqueued_and_cancelled(settings, redis_url):
    conn = connect(redis_url)
    with Client(redis_url) as client:
        sessions = [client.submit(prompt="hi", session_id="alice", max_tokens=2) for _ in range(3)]
        batch = client.submit_batch([{"prompt": f"p{i}"} for i in range(5)])
        again = client.submit(prompt="hi", session_id="alice", request_id=sessions[0].id)  # a known id: not enqueued
        assert not again.created
        assert sessions[1].cancel()  # still queued: the client cancels it itself
    shard_queue = sessions[0].queue_name
    register_group(conn, GroupInfo(group="g0", incarnation="i1", tp=1, model="m", host="h", pid=1,
                                   worker_name="tpq-g0-i1", started_at=time.time()))
    write_heartbeat(conn, make_heartbeat("g0", 0, "i1", step=3), settings.heartbeat_ttl_s)

    supervisor = Supervisor(conn, settings)
    server = serve_supervisor_metrics(free_port(), settings, supervisor, connect(redis_url))
    try:
        standby = scrape(server.port)
        assert standby.value("tpq_supervisor_leader") == 0
        assert standby.labels("tpq_queue_depth") == []  # only the leader reports Redis' state
        supervisor.run_once()
        found = scrape(server.port)
    finally:
        server.close()
        supervisor.release()
    assert found.value("tpq_supervisor_leader") == 1 and found.value("tpq_redis_up") == 1
    assert found.value("tpq_jobs_enqueued_total", queue=shard_queue) == 3
    assert found.value("tpq_jobs_enqueued_total", queue="batch") == 5
    assert found.value("tpq_jobs_cancelled_queued_total", queue=shard_queue) == 1
    assert found.value("tpq_queue_depth", queue=shard_queue) == 2
    assert found.value("tpq_queue_depth", queue="batch") == 5
    assert len(found.labels("tpq_queue_depth")) == 5  # 4 shards and batch, empty ones included
    assert found.value("tpq_group_up", group="g0") == 1
    assert found.value("tpq_group_shards", group="g0") == 4
    assert found.value("tpq_shard_reassignments_total") == 4 and found.value("tpq_shard_map_writes_total") == 1
    assert 0 <= found.value("tpq_heartbeat_age_seconds", group="g0", rank="0") < 5
    assert found.types["tpq_shard_reassignments"] == "counter" and found.types["tpq_queue_depth"] == "gauge"
    conn.close()


def test_a_redis_outage_shows_as_redis_down_not_as_a_failed_scrape(settings):
    supervisor = Supervisor(connect(settings.redis_url), settings)
    supervisor.run_once()
    dead = connect("redis://127.0.0.1:1/0", retries=0)
    server = serve_supervisor_metrics(free_port(), settings, supervisor, dead)
    try:
        found = scrape(server.port)
    finally:
        server.close()
        supervisor.release()
    assert found.value("tpq_redis_up") == 0 and found.value("tpq_supervisor_leader") == 1


def test_the_server_serves_event_metrics_and_collectors_and_stops():
    GroupMetrics("server-test").job_started()
    server = serve_metrics(free_port(), "127.0.0.1", [SnapshotCollector([RedisState.MAP_EPOCH],
                                                                         lambda: [(RedisState.MAP_EPOCH, [], 7)])])
    assert isinstance(server, MetricsServer)
    found = scrape(server.port)
    assert found.value("tpq_jobs_started_total", group="server-test") == 1
    assert found.value("tpq_shard_map_epoch") == 7
    assert found.value("process_cpu_seconds_total") > 0  # the process's own metrics come along
    assert not any(name.endswith("_created") for name in found.samples)
    assert serve_metrics(server.port, "127.0.0.1") is None  # a busy port is logged, never fatal
    server.close()
    again = serve_metrics(server.port, "127.0.0.1")  # closed: the port is free again
    assert again is not None
    again.close()
    assert serve_metrics(0, "127.0.0.1") is None  # 0: off


def test_a_failing_collector_costs_its_own_samples_only():
    def broken():
        raise RuntimeError("engine gone")

    server = serve_metrics(free_port(), "127.0.0.1", [SnapshotCollector([RedisState.MAP_EPOCH], broken)])
    try:
        found = scrape(server.port)
    finally:
        server.close()
    assert "tpq_shard_map_epoch" in found.types and found.labels("tpq_shard_map_epoch") == []


def test_group_metrics_count_each_event():
    group = "unit-events"
    metrics = GroupMetrics(group)
    ran = JobResult(request_id="j", text="", token_ids=[1, 2, 3], finish_reason=FinishReason.LENGTH,
                    usage=Usage(prompt_tokens=10, cached_tokens=4, generated_tokens=3),
                    timings=Timings(queue_s=0.5, time_to_first_token_s=0.75, total_s=2.0), group=group)
    metrics.restarts(2)
    metrics.job_started()
    metrics.job_finished("length", ran, first_token=True)
    metrics.job_finished("cancelled")
    metrics.job_finished("deadline", ran, first_token=False)
    metrics.job_failed()
    metrics.jobs_retried("shutdown", 3)
    events = [TokenEvent(request_id=r, index=i, token_id=1, text="", sampled_at=t)
              for r, i, t in (("a", 0, 1.0), ("b", 0, 1.0), ("a", 1, 1.25), ("a", 2, 1.75), ("b", 1, 2.0))]
    publisher_thread = threading.Thread(target=lambda: (metrics.tokens_published(events[:2], []),
                                                        metrics.tokens_published(events[2:], ["a"])))
    publisher_thread.start()
    publisher_thread.join()
    server = serve_metrics(free_port(), "127.0.0.1")
    try:
        found: Scrape = scrape(server.port)
    finally:
        server.close()
    g = {"group": group}
    assert found.value("tpq_group_restarts_total", **g) == 2
    assert found.value("tpq_jobs_finished_total", **g) == 3
    assert found.value("tpq_jobs_finished_total", finish_reason="deadline", **g) == 1
    assert found.value("tpq_jobs_cancelled_total", **g) == 1 and found.value("tpq_jobs_expired_total", **g) == 1
    assert found.value("tpq_jobs_failed_total", **g) == 1
    assert found.value("tpq_jobs_retried_total", reason="shutdown", **g) == 3
    assert found.value("tpq_job_end_to_end_latency_seconds_count", **g) == 2
    assert found.value("tpq_job_end_to_end_latency_seconds_sum", **g) == 4.0
    assert found.value("tpq_job_time_to_first_token_seconds_count", **g) == 1
    assert found.value("tpq_prompt_tokens_total", **g) == 20 and found.value("tpq_cached_tokens_total", **g) == 8
    assert found.value("tpq_generated_tokens_total", **g) == 5
    assert found.value("tpq_inter_token_latency_seconds_count", **g) == 3  # a: 0.25, 0.5; b: 1.0
    assert found.value("tpq_inter_token_latency_seconds_sum", **g) == pytest.approx(1.75)
    assert found.value("tpq_inter_token_latency_seconds_bucket", le="0.3", **g) == 1
