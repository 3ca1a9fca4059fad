"""Rank 0's /metrics: the process's event metrics plus the engine's state, read only when Prometheus scrapes.

The scrape runs on the HTTP server's thread and reads plain attributes of
the engine, the engine loop and the job pump (ints and lengths, safe to
read across threads); the decode loop does no metrics work at all.
"""
from __future__ import annotations

from typing import Any

from common.metrics import GroupState, MetricsServer, Sample, SnapshotCollector, serve_metrics
from gpu_worker.engine.llm_engine import LLMEngine


def engine_samples(group: str, incarnation: str, engine: LLMEngine, in_flight: Any) -> list[Sample]:
    """The :class:`GroupState` samples of ``engine`` now; ``in_flight()``: jobs the group holds."""
    stats, blocks = engine.stats, engine.block_manager
    queried, hits = blocks.prefix_queries, blocks.prefix_hits
    g = [group]
    return [
        (GroupState.INFO, [group, incarnation, str(engine.config.model), str(engine.config.tp)], 1),
        (GroupState.IN_FLIGHT, g, in_flight()),
        (GroupState.RUNNING, g, engine.num_running),
        (GroupState.WAITING, g, engine.num_waiting),
        (GroupState.BATCH_SIZE, g, stats.last_batch_size),
        (GroupState.STEPS, g, stats.steps),
        (GroupState.SCHEDULED, g, stats.scheduled_seqs),
        (GroupState.COMPUTED_TOKENS, g, stats.computed_tokens),
        (GroupState.KV_USAGE, g, blocks.usage),
        (GroupState.KV_BLOCKS, g, blocks.num_blocks),
        (GroupState.PREFIX_QUERIED, g, queried),
        (GroupState.PREFIX_HITS, g, hits),
        (GroupState.PREFIX_HIT_RATIO, g, hits / queried if queried else 0.0),
        (GroupState.PREEMPTIONS, g, engine.scheduler.num_preemptions),
    ]


def serve_group_metrics(port: int, host: str, group: str, incarnation: str, engine: LLMEngine,
                        in_flight: Any) -> MetricsServer | None:
    """Serve rank 0's metrics on ``host:port`` (None when off or the port is taken; see ``serve_metrics``)."""
    collector = SnapshotCollector(GroupState.ALL, lambda: engine_samples(group, incarnation, engine, in_flight))
    return serve_metrics(port, host, [collector], what=f"group {group}")
