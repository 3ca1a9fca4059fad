"""Metrics, status, health and logs of a real stack: a known set of jobs, then /metrics must count exactly that.

The stack is real (test redis-server, `tpq supervisor`, a `tpq worker` group
on a tiny model) and logs JSON; the jobs are seven that finish, one the
engine refuses (its prompt exceeds the model's context: FAILED) and one
cancelled while it streams. Every counter and histogram count is compared
with what the jobs' results say happened.
"""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import redis

from common import keys
from common.errors import JobFailed
from common.metrics import metric_types
from producer import Client
from producer.cli import health as health_cli
from producer.cli import status as status_cli
from producer.local_stack.embedded_redis import free_port
from tests.metrics_scrape import Scrape, scrape

RESULT_TIMEOUT_S = 240
MAX_TOKENS = 6


def scrape_until(port: int, ready, timeout_s: float = 20.0) -> Scrape:
    """Scrape until ``ready(scrape)``: a job's result is visible a moment before its counters move."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = scrape(port)
        if ready(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.slow
def test_metrics_status_health_and_logs_count_what_happened(start_stack, redis_url, tiny_llama_dir, monkeypatch,
                                                            capfd):
    supervisor_port, worker_port = free_port(), free_port()
    monkeypatch.setenv("TPQ_SUPERVISOR_METRICS_PORT", str(supervisor_port))
    monkeypatch.setenv("TPQ_WORKER_METRICS_PORT", str(worker_port))
    monkeypatch.setenv("TPQ_LOG_FORMAT", "json")
    stack = start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    assert stack.metrics_ports == {"supervisor": supervisor_port, "g0": worker_port}
    conn = redis.Redis.from_url(redis_url)

    with Client(redis_url) as client:
        finishing = [client.submit(prompt=f"count to {i}", session_id=f"s{i}", temperature=0, max_tokens=MAX_TOKENS)
                     for i in range(4)]
        finishing += list(client.submit_batch([{"prompt": f"batch {i}", "sampling": {"temperature": 0,
                                                                                      "max_tokens": MAX_TOKENS}}
                                               for i in range(3)]))
        too_long = client.submit(prompt="tell me more " * 300, temperature=0, max_tokens=4)
        cancelled = client.submit(prompt="a long story", session_id="c", temperature=0, max_tokens=400,
                                  ignore_eos=True)
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while conn.xlen(keys.token_log(cancelled.id)) < 2:  # it runs: cancel it mid-stream
            assert time.monotonic() < deadline, "the job to cancel never streamed"
            time.sleep(0.02)
        assert cancelled.cancel()
        handles = [*finishing, cancelled]
        results = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
        with pytest.raises(JobFailed, match="context"):
            too_long.result(timeout=RESULT_TIMEOUT_S)
    reasons = Counter(r.finish_reason.value for r in results)
    assert reasons["cancelled"] == 1 and sum(reasons.values()) == 8
    generated = [r.usage.generated_tokens for r in results]
    assert 0 < generated[-1] < 400

    # rank 0 of g0: every job event once, histograms observed once per job the engine ran
    worker = scrape_until(worker_port, lambda s: s.value("tpq_jobs_finished_total") == 8
                          and s.value("tpq_jobs_failed_total") == 1)
    g = {"group": "g0"}
    assert worker.value("tpq_jobs_started_total", **g) == 9
    for reason, count in reasons.items():
        assert worker.value("tpq_jobs_finished_total", finish_reason=reason, **g) == count, reason
    assert worker.value("tpq_jobs_failed_total", **g) == 1
    assert worker.value("tpq_jobs_cancelled_total", **g) == 1
    assert worker.value("tpq_jobs_expired_total", **g) == 0
    assert worker.value("tpq_jobs_retried_total", **g) == 0 and worker.value("tpq_jobs_resumed_total", **g) == 0
    assert worker.value("tpq_job_queue_time_seconds_count", **g) == 8
    assert worker.value("tpq_job_queue_time_seconds_sum", **g) == pytest.approx(sum(r.timings.queue_s for r in results))
    assert worker.value("tpq_job_end_to_end_latency_seconds_count", **g) == 8
    assert worker.value("tpq_job_end_to_end_latency_seconds_sum", **g) == pytest.approx(
        sum(r.timings.total_s for r in results))
    assert worker.value("tpq_job_time_to_first_token_seconds_count", **g) == sum(1 for n in generated if n)
    assert worker.value("tpq_job_time_to_first_token_seconds_sum", **g) == pytest.approx(
        sum(r.timings.time_to_first_token_s for r in results if r.usage.generated_tokens))
    assert worker.value("tpq_inter_token_latency_seconds_count", **g) == sum(max(0, n - 1) for n in generated)
    assert worker.value("tpq_generated_tokens_total", **g) == sum(generated)
    assert worker.value("tpq_prompt_tokens_total", **g) == sum(r.usage.prompt_tokens for r in results)
    assert worker.value("tpq_cached_tokens_total", **g) == sum(r.usage.cached_tokens for r in results)
    assert worker.value("tpq_group_restarts_total", **g) == 0
    assert worker.value("tpq_group_info", model=str(tiny_llama_dir), tp="1", **g) == 1
    assert worker.value("tpq_engine_steps_total", **g) >= max(generated)
    assert worker.value("tpq_engine_scheduled_sequences_total", **g) >= sum(generated)
    assert worker.value("tpq_prefix_cache_queried_tokens_total", **g) >= sum(r.usage.prompt_tokens for r in results)
    assert (worker.value("tpq_running_sequences", **g), worker.value("tpq_waiting_sequences", **g)) == (0, 0)
    assert worker.value("tpq_jobs_in_flight", **g) == 0
    assert 0 <= worker.value("tpq_kv_cache_usage_ratio", **g) <= 1
    assert 0 <= worker.value("tpq_prefix_cache_hit_ratio", **g) <= 1

    # the supervisor: what clients counted in Redis, queue depths, heartbeats, the shard map
    supervisor = scrape(supervisor_port)
    assert supervisor.value("tpq_supervisor_leader") == 1 and supervisor.value("tpq_redis_up") == 1
    all_handles = [*handles, too_long]
    for queue, count in Counter(h.queue_name for h in all_handles).items():
        assert supervisor.value("tpq_jobs_enqueued_total", queue=queue) == count, queue
    assert supervisor.value("tpq_jobs_enqueued_total") == len(all_handles)
    assert supervisor.value("tpq_jobs_cancelled_queued_total") == 0
    assert len(supervisor.labels("tpq_queue_depth")) == 17 and supervisor.value("tpq_queue_depth") == 0
    assert supervisor.value("tpq_group_up", **g) == 1 and supervisor.value("tpq_group_shards", **g) == 16
    assert 0 <= supervisor.value("tpq_heartbeat_age_seconds", rank="0", **g) < 1.5
    assert supervisor.value("tpq_shard_map_writes_total") == 1
    assert supervisor.value("tpq_shard_reassignments_total") == 16
    assert supervisor.value("tpq_groups_declared_dead_total") == 0

    # every metric the code defines is exported by one of the two
    exported = {name.removesuffix("_total") for name in (*worker.types, *supervisor.types)}
    assert {name.removesuffix("_total") for name in metric_types()} <= exported

    logged = capfd.readouterr().err  # the stack's processes log to this test's stderr
    assert status_cli.main(["--json"]) == 0
    out, err = capfd.readouterr()
    logged += err
    [group] = json.loads(out)["groups"]
    assert (group["health"], group["metrics_port"], group["shards"]) == ("live", worker_port, 16)
    assert group["steps_per_s"] >= 0 and group["tokens_per_s"] >= 0  # from a heartbeat of up to 0.25 s ago
    assert health_cli.main([]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("OK: group g0 live, supervisor active")

    # logs: one JSON line per job event, with job id, queue, group and rank
    stack.stop()
    logged += err + capfd.readouterr().err
    lines = [line for line in logged.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    events: dict[str, list[str]] = {}
    for entry in entries:
        if entry.get("event", "").startswith("job."):
            assert (entry["group"], entry["rank"]) == ("g0", 0) and entry["queue"], entry
            events.setdefault(entry["job_id"], []).append(entry["event"])
    for handle in finishing:
        assert events[handle.id] == ["job.claimed", "job.started", "job.finished"], handle.id
    assert events[cancelled.id] == ["job.claimed", "job.started", "job.cancelled"]
    assert events[too_long.id] == ["job.claimed", "job.started", "job.failed"]
