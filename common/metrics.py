"""Every Prometheus metric tpqueue exports, defined once, and the HTTP server that serves them.

Two kinds of process serve ``/metrics`` (README, "Operating tpqueue"):

- **rank 0 of each worker group**, on ``TPQ_WORKER_METRICS_PORT`` (default
  9461; ``tpq up`` gives group *i* that port + *i*; ``tpq worker
  --metrics-port``). Job lifecycle counters, latency histograms and token
  counters are counted where each event happens, on the job-pump and
  publisher threads (:class:`GroupMetrics`). The engine's state (running and
  waiting sequences, batch size, KV-cache usage, prefix-cache hits) is read
  only when Prometheus scrapes (:data:`GROUP_STATE`): the decode loop never
  does metrics work.
- **the supervisor**, on ``TPQ_SUPERVISOR_METRICS_PORT`` (default 9460;
  ``tpq supervisor --metrics-port``): its recovery counters
  (:data:`SUPERVISOR_STATE`) and, while it holds the supervisor lock, what
  Redis says at scrape time (:data:`REDIS_STATE`): queue depths, jobs
  enqueued and cancelled by clients (``keys.job_counter``), heartbeat ages,
  shards per group.

Port 0 turns a server off. Counters of a process start at zero when it
starts (Prometheus' ``rate``/``increase`` handle the reset); counters kept
in Redis (enqueued, cancelled while queued) survive restarts.
"""
from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import prometheus_client
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common import keys
from common.groups import read_group_records, read_heartbeats, read_shard_map
from common.health import GroupHealth, judge_groups
from common.text import as_text

log = logging.getLogger(__name__)

prometheus_client.disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

# ------------------------------------------------------------------ event metrics (counted where they happen)

QUEUE_TIME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)
END_TO_END_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

JOBS_STARTED = Counter(
    "tpq_jobs_started_total", "Jobs a worker group started through rq (every attempt counts).", ["group"])
JOBS_FINISHED = Counter(
    "tpq_jobs_finished_total",
    "Jobs a worker group completed with a result, by finish reason (stop, length, cancelled, deadline).",
    ["group", "finish_reason"])
JOBS_FAILED = Counter(
    "tpq_jobs_failed_total",
    "Jobs that ended FAILED: refused by a group (bad request, forbidden function, engine refusal), or out of "
    "retries when the supervisor recovered them from a dead group.", ["group"])
JOBS_RETRIED = Counter(
    "tpq_jobs_retried_total",
    "Started jobs put back on their queue, by reason: shutdown (clean stop, no retry used), group_failed "
    "(a rank died; rq Retry), job_error (an unexpected error with this job; rq Retry), supervisor (the group "
    "was declared dead or hung), log_lost (Redis lost the end of the job's token log after it was written; "
    "no retry used).", ["group", "reason"])
JOBS_CANCELLED = Counter(
    "tpq_jobs_cancelled_total",
    "Jobs a worker group ended because their client cancelled them (cancelled while still queued: "
    "tpq_jobs_cancelled_queued_total).", ["group"])
JOBS_EXPIRED = Counter(
    "tpq_jobs_expired_total", "Jobs a worker group ended because their deadline passed.", ["group"])
JOBS_RESUMED = Counter(
    "tpq_jobs_resumed_total", "Jobs that continued from their token log after an earlier attempt died.", ["group"])
QUEUE_TIME = Histogram(
    "tpq_job_queue_time_seconds",
    "Seconds from a job's (re)enqueue to its first engine step, for jobs the engine ran.",
    ["group"], buckets=QUEUE_TIME_BUCKETS_S)
TIME_TO_FIRST_TOKEN = Histogram(
    "tpq_job_time_to_first_token_seconds",
    "Seconds from a job's (re)enqueue to its first sampled token, for jobs that sampled one.",
    ["group"], buckets=TTFT_BUCKETS_S)
INTER_TOKEN_LATENCY = Histogram(
    "tpq_inter_token_latency_seconds", "Seconds between consecutive sampled tokens of one job.",
    ["group"], buckets=INTER_TOKEN_BUCKETS_S)
END_TO_END_LATENCY = Histogram(
    "tpq_job_end_to_end_latency_seconds",
    "Seconds from a job's (re)enqueue to its result, for jobs the engine ran.",
    ["group"], buckets=END_TO_END_BUCKETS_S)
PROMPT_TOKENS = Counter(
    "tpq_prompt_tokens_total", "Prompt tokens of the jobs the engine finished.", ["group"])
CACHED_TOKENS = Counter(
    "tpq_cached_tokens_total", "Prompt tokens served from the prefix cache, of the jobs the engine finished.",
    ["group"])
GENERATED_TOKENS = Counter(
    "tpq_generated_tokens_total", "Tokens sampled and published to their job's stream.", ["group"])
GROUP_RESTARTS = Counter(
    "tpq_group_restarts_total",
    "Times the group's launcher restarted it (a rank died, it hung or was fenced), as the running "
    "incarnation's launcher counted them.", ["group"])

EVENT_METRICS: tuple[Counter | Histogram, ...] = (
    JOBS_STARTED, JOBS_FINISHED, JOBS_FAILED, JOBS_RETRIED, JOBS_CANCELLED, JOBS_EXPIRED, JOBS_RESUMED,
    QUEUE_TIME, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, END_TO_END_LATENCY,
    PROMPT_TOKENS, CACHED_TOKENS, GENERATED_TOKENS, GROUP_RESTARTS,
)


# The OpenAI-compatible gateway's own metrics, in their own registry: only `tpq gateway` serves them (/metrics).
GATEWAY_REGISTRY = CollectorRegistry()
HTTP_REQUESTS = Counter(
    "tpq_http_requests_total", "HTTP requests the gateway answered, by route template and status code.",
    ["route", "status"], registry=GATEWAY_REGISTRY)
HTTP_LATENCY = Histogram(
    "tpq_http_request_duration_seconds",
    "Seconds from an HTTP request's arrival to its response's start (a stream's first byte), by route.",
    ["route"], buckets=TTFT_BUCKETS_S, registry=GATEWAY_REGISTRY)
HTTP_OPEN_STREAMS = Gauge(
    "tpq_http_open_streams", "Server-sent-event streams the gateway is sending now.", registry=GATEWAY_REGISTRY)
HTTP_RATE_LIMITED = Counter(
    "tpq_http_rate_limited_total", "Requests the gateway refused (429) for an API key's rate limit, by the limit "
    "they hit: requests or tokens per minute.", ["limit"], registry=GATEWAY_REGISTRY)


class GroupMetrics:
    """The event metrics of one worker group (label ``group``), for its rank 0's threads.

    Each method is one event; all are cheap (a lock-protected add).
    :meth:`tokens_published` keeps per-job state and must be called from one
    thread only (the publisher).
    """

    def __init__(self, group: str) -> None:
        self.group = group
        self._last_token_at: dict[str, float] = {}

    def restarts(self, count: int) -> None:
        """The launcher had restarted this group ``count`` times when it started this incarnation."""
        GROUP_RESTARTS.labels(self.group).inc(count)

    def job_started(self) -> None:
        JOBS_STARTED.labels(self.group).inc()

    def job_resumed(self) -> None:
        JOBS_RESUMED.labels(self.group).inc()

    def job_failed(self, count: int = 1) -> None:
        JOBS_FAILED.labels(self.group).inc(count)

    def jobs_retried(self, reason: str, count: int = 1) -> None:
        JOBS_RETRIED.labels(self.group, reason).inc(count)

    def job_finished(self, finish_reason: str, ran: Any = None, *, first_token: bool = False) -> None:
        """A job completed with ``finish_reason``. ``ran``: its result when the engine ran it (has
        ``usage`` and ``timings``); ``first_token``: whether the engine sampled a token for it."""
        JOBS_FINISHED.labels(self.group, finish_reason).inc()
        if finish_reason == "cancelled":
            JOBS_CANCELLED.labels(self.group).inc()
        elif finish_reason == "deadline":
            JOBS_EXPIRED.labels(self.group).inc()
        if ran is None:
            return
        QUEUE_TIME.labels(self.group).observe(ran.timings.queue_s)
        END_TO_END_LATENCY.labels(self.group).observe(ran.timings.total_s)
        if first_token:
            TIME_TO_FIRST_TOKEN.labels(self.group).observe(ran.timings.time_to_first_token_s)
        PROMPT_TOKENS.labels(self.group).inc(ran.usage.prompt_tokens)
        CACHED_TOKENS.labels(self.group).inc(ran.usage.cached_tokens)

    def tokens_published(self, events: Iterable[Any], ended: Iterable[str]) -> None:
        """Token ``events`` (``request_id``, ``sampled_at``) reached Redis; jobs ``ended`` stream no more."""
        count = 0
        gaps = []
        for event in events:
            count += 1
            if event.sampled_at is None:
                continue
            last = self._last_token_at.get(event.request_id)
            if last is not None:
                gaps.append(max(0.0, event.sampled_at - last))
            self._last_token_at[event.request_id] = event.sampled_at
        for request_id in ended:
            self._last_token_at.pop(request_id, None)
        if count:
            GENERATED_TOKENS.labels(self.group).inc(count)
        histogram = INTER_TOKEN_LATENCY.labels(self.group)
        for gap in gaps:
            histogram.observe(gap)


# ------------------------------------------------------------------ state metrics (read at scrape time)


@dataclass(frozen=True)
class MetricSpec:
    """A metric whose value a collector reads when Prometheus scrapes."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...] = ()

    def family(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


def _gauge(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "gauge", help_text, labels)


def _counter(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "counter", help_text, labels)


class GroupState:
    """Rank 0's scrape-time metrics (label ``group``), read from the engine by ``gpu_worker.serve.metrics``."""

    INFO = _gauge("tpq_group_info", "1 for the running incarnation of a group, with its facts as labels.",
                  "group", "incarnation", "model", "tp")
    IN_FLIGHT = _gauge("tpq_jobs_in_flight", "Jobs the group's engine holds now.", "group")
    RUNNING = _gauge("tpq_running_sequences", "Sequences in the engine's running batch.", "group")
    WAITING = _gauge("tpq_waiting_sequences", "Sequences waiting for KV-cache room or a batch slot.", "group")
    BATCH_SIZE = _gauge("tpq_batch_size", "Sequences in the engine's latest step.", "group")
    STEPS = _counter("tpq_engine_steps_total", "Engine steps (one forward pass on every rank each).", "group")
    SCHEDULED = _counter("tpq_engine_scheduled_sequences_total",
                         "Sequences summed over engine steps (divide its rate by the steps' for the mean batch).",
                         "group")
    COMPUTED_TOKENS = _counter("tpq_engine_computed_tokens_total",
                               "Tokens run through the model (prefill chunks and decodes).", "group")
    KV_USAGE = _gauge("tpq_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by sequences (0..1).", "group")
    KV_BLOCKS = _gauge("tpq_kv_cache_blocks", "KV-cache blocks per rank.", "group")
    PREFIX_QUERIED = _counter("tpq_prefix_cache_queried_tokens_total",
                              "Prompt tokens looked up in the prefix cache.", "group")
    PREFIX_HITS = _counter("tpq_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache.", "group")
    PREFIX_HIT_RATIO = _gauge("tpq_prefix_cache_hit_ratio",
                              "Prefix-cache hits over lookups, in tokens, since the group started (0..1).", "group")
    PREEMPTIONS = _counter("tpq_preemptions_total", "Sequences preempted for lack of KV-cache room.", "group")

    ALL = (INFO, IN_FLIGHT, RUNNING, WAITING, BATCH_SIZE, STEPS, SCHEDULED, COMPUTED_TOKENS, KV_USAGE, KV_BLOCKS,
           PREFIX_QUERIED, PREFIX_HITS, PREFIX_HIT_RATIO, PREEMPTIONS)


class SupervisorState:
    """The supervisor's scrape-time metrics: its own counters."""

    LEADER = _gauge("tpq_supervisor_leader", "1 while this supervisor holds the supervisor lock.")
    DECLARED = _counter("tpq_groups_declared_dead_total",
                        "Group incarnations the supervisor fenced, by verdict (dead, hung).", "verdict")
    REASSIGNMENTS = _counter("tpq_shard_reassignments_total",
                             "Shards whose owning group changed in a shard map this supervisor wrote.")
    MAP_WRITES = _counter("tpq_shard_map_writes_total", "Shard maps this supervisor wrote (epoch bumps).")
    EXPIRED_STARTED = _counter("tpq_expired_started_jobs_total",
                               "Started jobs past their rq heartbeat TTL handed to rq's cleanup (requeued or failed).")

    ALL = (LEADER, DECLARED, REASSIGNMENTS, MAP_WRITES, EXPIRED_STARTED)


class RedisState:
    """What Redis says, read at scrape time by the supervisor that holds the lock (:func:`redis_state_samples`)."""

    UP = _gauge("tpq_redis_up", "1 when the last scrape could read Redis, else 0.")
    QUEUE_DEPTH = _gauge("tpq_queue_depth", "Jobs waiting in a queue (gen.<shard> or batch).", "queue")
    ENQUEUED = _counter("tpq_jobs_enqueued_total", "Jobs clients enqueued, counted in Redis by the client.", "queue")
    CANCELLED_QUEUED = _counter("tpq_jobs_cancelled_queued_total",
                                "Jobs clients cancelled while still queued, counted in Redis by the client.", "queue")
    HEARTBEAT_AGE = _gauge("tpq_heartbeat_age_seconds", "Seconds since a rank's latest heartbeat.", "group", "rank")
    GROUP_UP = _gauge("tpq_group_up",
                      "1 when every rank of the group's registered incarnation heartbeats and it is neither "
                      "fenced nor hung (as tpq health judges), else 0.", "group")
    GROUP_SHARDS = _gauge("tpq_group_shards", "Session shards a group owns in the shard map.", "group")
    MAP_EPOCH = _gauge("tpq_shard_map_epoch", "The shard map's epoch (bumped on every change).")

    ALL = (UP, QUEUE_DEPTH, ENQUEUED, CANCELLED_QUEUED, HEARTBEAT_AGE, GROUP_UP, GROUP_SHARDS, MAP_EPOCH)


Sample = tuple[MetricSpec, Sequence[str], float]


class SnapshotCollector:
    """A prometheus_client collector: at each scrape, the samples ``read()`` returns, under ``specs``.

    A failing ``read`` is logged and yields no samples (the scrape itself
    still succeeds, with every other metric).
    """

    def __init__(self, specs: Iterable[MetricSpec], read: Callable[[], Iterable[Sample]]) -> None:
        self.specs = tuple(specs)
        self._read = read

    def describe(self) -> list[Metric]:
        return [spec.family() for spec in self.specs]

    def collect(self) -> list[Metric]:
        families = {spec.name: spec.family() for spec in self.specs}
        try:
            samples = list(self._read())
        except Exception:  # noqa: BLE001 - a metrics read must never break the scrape
            log.warning("reading metrics for %s failed", ", ".join(families), exc_info=True)
            samples = []
        for spec, labels, value in samples:
            families[spec.name].add_metric([str(v) for v in labels], float(value))
        return list(families.values())


def redis_state_samples(conn: redis.Redis, num_shards: int, heartbeat_ttl_s: float,
                        hang_after_s: float) -> list[Sample]:
    """Queue depths, client job counters, heartbeat ages, group health and shards, as read from Redis now."""
    queue_names = keys.shard_queue_names(num_shards) + [keys.BATCH_QUEUE]
    with conn.pipeline(transaction=False) as pipe:
        for name in queue_names:
            pipe.llen(keys.rq_queue_key(name))
        pipe.hgetall(keys.job_counter("enqueued"))
        pipe.hgetall(keys.job_counter("cancelled"))
        *depths, enqueued, cancelled = pipe.execute()
    samples: list[Sample] = [(RedisState.QUEUE_DEPTH, [name], depth) for name, depth in zip(queue_names, depths)]
    for spec, counts in ((RedisState.ENQUEUED, enqueued), (RedisState.CANCELLED_QUEUED, cancelled)):
        samples += [(spec, [as_text(queue)], int(count)) for queue, count in sorted(counts.items())]
    now = time.time()
    beats = read_heartbeats(conn)
    samples += [(RedisState.HEARTBEAT_AGE, [b.group, str(b.rank)], max(0.0, now - b.ts)) for b in beats]
    verdicts = judge_groups(read_group_records(conn), now=now, heartbeat_ttl_s=heartbeat_ttl_s,
                            hang_after_s=hang_after_s)
    epoch, shard_map = read_shard_map(conn)
    for name, verdict in verdicts.items():
        samples.append((RedisState.GROUP_UP, [name], 1 if verdict.health is GroupHealth.LIVE else 0))
        samples.append((RedisState.GROUP_SHARDS, [name], sum(1 for g in shard_map.values() if g == name)))
    samples.append((RedisState.MAP_EPOCH, [], epoch))
    return samples


# ------------------------------------------------------------------ the server


class _ProcessEvents:
    """Collects prometheus_client's default registry: the event metrics above and the process's own."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return prometheus_client.REGISTRY.collect()


class MetricsServer:
    """``/metrics`` over HTTP on a daemon thread (prometheus_client's server); :meth:`close` stops it."""

    def __init__(self, port: int, host: str, collectors: Iterable[Any] = ()) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ProcessEvents())
        for collector in collectors:
            self.registry.register(collector)
        self._server, self._thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, self._server.server_port
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int, host: str, collectors: Iterable[Any] = (), *,
                  what: str = "metrics") -> MetricsServer | None:
    """Serve the process's metrics plus ``collectors`` on ``host:port``; None when ``port`` is 0.

    A port that cannot be bound is logged and also gives None: a busy
    metrics port must never stop a worker group or the supervisor.
    """
    if not port:
        log.info("%s: metrics off (port 0)", what)
        return None
    try:
        server = MetricsServer(port, host, collectors)
    except OSError as exc:
        log.error("%s: cannot serve metrics on %s:%d (%s); running without /metrics", what, host, port, exc)
        return None
    log.info("%s: Prometheus metrics on %s", what, server.url)
    return server


def port_arg(text: str) -> int:
    """argparse ``type`` of a ``--metrics-port`` option: 0 (off) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0 turns metrics off), got {port}")
    return port


def metric_types() -> dict[str, str]:
    """Every tpqueue metric's name and Prometheus type (``counter``, ``gauge``, ``histogram``)."""
    types = {}
    for metric in EVENT_METRICS:
        [family] = metric.describe()
        types[family.name + ("_total" if family.type == "counter" else "")] = family.type
    for spec in (*GroupState.ALL, *SupervisorState.ALL, *RedisState.ALL):
        types[spec.name] = spec.kind
    return types


def sample_names() -> set[str]:
    """Every series name a PromQL query can use on tpqueue's metrics (histograms' ``_bucket``, ``_sum``, ``_count``)."""
    names = set()
    for name, kind in metric_types().items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names
