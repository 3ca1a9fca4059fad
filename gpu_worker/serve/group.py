"""Rank 0 of a worker group: the engine, its ranks, and the threads that connect it to Redis.

Threads of the rank-0 process, each with one job and (for Redis) its own connection:

- main: :class:`EngineLoop` (the decode loop; no Redis);
- ``tpq-publisher``: the text of each step's tokens (detokenizing, stop strings), then token events and end
  records to Redis, one pipeline per step;
- ``tpq-job-pump``: claims, admits, cancels and finishes jobs through rq;
- ``tpq-heartbeat-0``: rank 0's heartbeat (ranks 1.. run their own, in their processes).

:func:`serve` returns an exit code the launcher acts on: 0 after a clean
stop (SIGINT/SIGTERM: running jobs go back to the front of their queues
without using up a retry), :data:`EXIT_GROUP_FAILED` when a rank died (jobs
retried through rq), :data:`EXIT_FENCED` when the supervisor fenced this
incarnation.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from common.errors import WorkerGroupError
from common.groups import GroupInfo, hostname, new_incarnation, register_group, unregister_group
from common.metrics import GroupMetrics
from common.pickle_guard import disable_pickle
from common.redis_conn import connect
from common.results import FinishReason
from common.settings import Settings
from gpu_worker.engine.engine_config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.text_stage import TextStage
from gpu_worker.serve.engine_loop import Abort, EngineLoop
from common.heartbeat import HeartbeatSpec, HeartbeatThread
from gpu_worker.serve.job_pump import Fenced, JobPump, ShutdownMode
from gpu_worker.serve.metrics import serve_group_metrics
from gpu_worker.serve.publisher import Publisher
from gpu_worker.serve.vocab_publish import publish_vocabulary

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_GROUP_FAILED = 1
EXIT_FENCED = 3
STUCK_EXIT_S = 10.0  # how long the decode loop may take to notice a stop once the job pump has ended


@dataclass(frozen=True)
class GroupOptions:
    """What one worker group runs: its name, its engine's options, where rank 0 serves /metrics (0: off)
    and how often its launcher has restarted it."""

    group: str
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields (model, tp, dtype, ...)
    metrics_port: int = 0
    restarts: int = 0
    ready_fd: int | None = None  # a pipe to the launcher: one byte once the group serves


def serve(settings: Settings, redis_url: str, options: GroupOptions, stop: threading.Event | None = None) -> int:
    """Run one incarnation of the group until ``stop`` is set, a rank dies, or it is fenced."""
    stop = stop or threading.Event()
    incarnation = new_incarnation()
    config = EngineConfig(**options.engine)
    heartbeat = HeartbeatSpec(redis_url, options.group, incarnation,
                              settings.heartbeat_interval_s, settings.heartbeat_ttl_s)
    log.info("group %s (incarnation %s): starting %d rank(s) of %s", options.group, incarnation, config.tp,
             config.model)
    engine = LLMEngine(config, heartbeat=heartbeat)
    disable_pickle()  # after the ranks started (their start-up handshake unpickles); no job can bring pickle
    publisher = pump = beat = metrics = None
    code = EXIT_OK
    loop_done = threading.Event()
    conn = connect(redis_url, client_name=f"tpq-group-{options.group}")
    try:
        publisher = Publisher(redis_url, settings.token_log_maxlen, settings.token_log_ttl_s,
                              on_written=lambda report: pump.on_written(report),
                              metrics=GroupMetrics(options.group),
                              texts=TextStage(engine.tokenizer, engine.eos_token_ids),
                              stop_request=lambda request_id: loop.submit(Abort(request_id, FinishReason.STOP)),
                              on_failed=stop.set)
        loop = EngineLoop(engine, report=publisher.put)
        pump = JobPump(settings, redis_url, options.group, incarnation, loop, engine.tokenizer,
                       max_in_flight=config.max_num_seqs)
        beat = HeartbeatThread(heartbeat, 0, step=lambda: loop.steps, in_flight=lambda: len(pump.running),
                               tokens=lambda: engine.stats.generated_tokens,
                               load=lambda: (engine.num_running, engine.num_waiting))
        beat.beat()
        GroupMetrics(options.group).restarts(options.restarts)
        metrics = serve_group_metrics(options.metrics_port, settings.metrics_host, options.group, incarnation,
                                      engine, in_flight=lambda: len(pump.running))
        publish_vocabulary(conn, str(config.model), engine.tokenizer)  # before the gateway can see the model
        register_group(conn, GroupInfo(
            group=options.group, incarnation=incarnation, tp=config.tp, model=str(config.model), host=hostname(),
            pid=os.getpid(), worker_name=pump.worker.name, started_at=time.time(),
            metrics_port=metrics.port if metrics is not None else None,
        ))
        beat.start()
        publisher.start()
        pump.start()
        _stop_when_thread_ends(pump, stop, loop_done)
        log.info("group %s ready: worker %s", options.group, pump.worker.name)
        _tell_launcher_ready(options.ready_fd)
        loop.run(stop)
        if isinstance(pump.error, Fenced):
            code = EXIT_FENCED
        elif pump.error is not None or publisher.error is not None:
            code = EXIT_GROUP_FAILED
    except WorkerGroupError as exc:
        log.error("group %s failed: %s", options.group, exc)
        code = EXIT_GROUP_FAILED
    finally:
        loop_done.set()
        if publisher is not None and publisher.is_alive():
            publisher.close()  # write what the engine produced, so finished jobs complete
        if pump is not None and pump.is_alive():
            pump.stop(ShutdownMode.REQUEUE if code == EXIT_OK else ShutdownMode.RETRY)
        if beat is not None:
            beat.stop()
        if code != EXIT_FENCED:
            unregister_group(conn, options.group, incarnation, config.tp)
        if metrics is not None:
            metrics.close()
        conn.close()
        engine.shutdown()
    log.info("group %s (incarnation %s) stopped with exit code %d", options.group, incarnation, code)
    return code


def _tell_launcher_ready(fd: int | None) -> None:
    """Write the launcher's ready byte (its back-off starts over), if it gave a pipe."""
    if fd is None:
        return
    try:
        os.write(fd, b"1")
        os.close(fd)
    except OSError as exc:  # the launcher is gone: nothing to tell
        log.debug("could not tell the launcher the group is ready: %s", exc)


def install_stop_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` (a clean stop: jobs go back to their queues)."""
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _stop_when_thread_ends(pump: JobPump, stop: threading.Event, loop_done: threading.Event) -> None:
    """When the job pump ends on its own (fenced, or Redis gone), stop the decode loop; if the loop is
    stuck in a collective with a hung rank and cannot notice, exit the process: the launcher then kills
    every rank of the group and starts it again."""
    def watch() -> None:
        pump.join()
        stop.set()
        if loop_done.wait(STUCK_EXIT_S):
            return
        code = EXIT_FENCED if isinstance(pump.error, Fenced) else EXIT_GROUP_FAILED
        log.error("the decode loop did not stop within %.0f s of the job pump ending (a rank is hung?); "
                  "exiting with code %d so the launcher restarts the group", STUCK_EXIT_S, code)
        os._exit(code)

    threading.Thread(target=watch, name="watch-job-pump", daemon=True).start()
