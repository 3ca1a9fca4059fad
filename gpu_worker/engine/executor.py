"""Runs the model over a worker group's ranks: rank 0 in this process, ranks 1..N-1 in child processes.

Rank 0 broadcasts each step's plan; every rank runs the same forward on its
slice of the weights and KV cache; logits come back to rank 0. When any rank
dies, the others stop within seconds: a collective with a dead peer fails,
and child ranks also exit when their parent process goes away.

A collective that waits longer than the process group's timeout fails too,
so an idle rank 0 (no step for ``KEEPALIVE_S``) sends a keepalive plan from
a thread; without it the other ranks, waiting for the next plan, would give
up on an idle group after a minute. One lock keeps the keepalive out of a
step's collectives.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time

import torch

from common.errors import WorkerGroupError
from common.logs import configure_logging
from gpu_worker.layers.distributed import destroy_group, free_port, init_group, rank_device, threads_per_rank
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec
from gpu_worker.engine.plan import Command, PlanChannel, StepPlan, command_plan, shutdown_plan
from common.heartbeat import HeartbeatSpec, HeartbeatThread

log = logging.getLogger("tpqueue.executor")

PARENT_POLL_S = 0.5
KEEPALIVE_S = 10.0
"""Seconds without a step after which rank 0 sends a keepalive; a sixth of a collective timeout under 60 s."""


class Executor:
    """Starts the group's ranks and runs steps on them."""

    def __init__(self, spec: RunnerSpec, world_size: int, start_timeout_s: float = 120.0,
                 heartbeat: HeartbeatSpec | None = None):
        self.world_size = world_size
        self._heartbeat = heartbeat
        self._children: list[mp.Process] = []
        self._channel = PlanChannel(rank_device(spec.device, 0)) if world_size > 1 else None
        self._closed = False
        self._send_lock = threading.Lock()  # one step's collectives, or one keepalive, at a time
        self._last_sent = time.monotonic()
        self._keepalive_stop = threading.Event()
        self._keepalive_s = min(KEEPALIVE_S, spec.collective_timeout_s / 6)
        torch.set_num_threads(threads_per_rank(world_size))
        init_method = f"tcp://127.0.0.1:{free_port()}"
        pipes = self._start_children(spec, init_method)
        try:
            init_group(0, world_size, init_method, rank_device(spec.device, 0), timeout_s=start_timeout_s)
            self.runner = ModelRunner(spec)
            self._wait_until_ready(pipes, start_timeout_s)
        except BaseException:
            self._kill_children()
            destroy_group()
            raise
        if self._channel is not None:
            threading.Thread(target=self._keep_alive, name="tpq-rank0-keepalive", daemon=True).start()

    @property
    def child_pids(self) -> list[int]:
        return [p.pid for p in self._children]

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """One step on every rank; the float32 logits [seqs, vocab]."""
        try:
            with self._send_lock:
                if self._channel is not None:
                    self._channel.send(plan)
                logits = self.runner.execute(plan)
                self._last_sent = time.monotonic()
                return logits
        except RuntimeError as exc:
            if self.world_size > 1:
                self._fail(f"a collective failed (a rank of the group died?): {exc}")
            raise

    def shutdown(self) -> None:
        if self._closed:
            return
        self._keepalive_stop.set()
        with self._send_lock:
            self._closed = True
            if self._channel is not None and all(p.is_alive() for p in self._children):
                try:
                    self._channel.send(shutdown_plan())
                except RuntimeError:
                    pass
        for p in self._children:
            p.join(timeout=10)
        self._kill_children()
        destroy_group()

    def _keep_alive(self) -> None:
        """Send a keepalive plan whenever no plan went out for a keepalive interval, until shutdown or a failure."""
        while not self._keepalive_stop.wait(self._keepalive_s / 4):
            with self._send_lock:
                if self._closed or time.monotonic() - self._last_sent < self._keepalive_s:
                    continue
                try:
                    self._channel.send(command_plan(Command.KEEPALIVE))
                except RuntimeError as exc:  # a rank is gone: the next step fails and says so
                    log.warning("rank 0: keepalive failed, stopping keepalives: %s", exc)
                    return
                self._last_sent = time.monotonic()

    def _start_children(self, spec: RunnerSpec, init_method: str) -> list:
        ctx = mp.get_context("spawn")
        pipes = []
        for rank in range(1, self.world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            process = ctx.Process(target=run_rank, name=f"tpq-rank{rank}", daemon=True,
                                  args=(rank, self.world_size, init_method, spec, child_end, os.getpid(),
                                        self._heartbeat))
            process.start()
            self._children.append(process)
            pipes.append(parent_end)
        return pipes

    def _wait_until_ready(self, pipes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, (pipe, process) in enumerate(zip(pipes, self._children), start=1):
            while not pipe.poll(0.1):
                if not process.is_alive():
                    raise WorkerGroupError(f"rank {rank} exited (code {process.exitcode}) while starting")
                if time.monotonic() > deadline:
                    raise WorkerGroupError(f"rank {rank} did not start within {timeout_s:.0f} s")
            status, detail = pipe.recv()
            if status != "ready":
                raise WorkerGroupError(f"rank {rank} failed to start: {detail}")

    def _fail(self, reason: str) -> None:
        dead = [i + 1 for i, p in enumerate(self._children) if not p.is_alive()]
        self._closed = True
        self._keepalive_stop.set()
        self._kill_children()
        destroy_group()  # shutdown() will not run again: without this the process could never start a group again
        raise WorkerGroupError(f"worker group failed: {reason}; dead ranks: {dead or 'none seen'}")

    def _kill_children(self) -> None:
        for p in self._children:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


def run_rank(rank: int, world_size: int, init_method: str, spec: RunnerSpec, ready_pipe, parent_pid: int,
             heartbeat: HeartbeatSpec | None = None) -> None:
    """Entry point of ranks 1..N-1: build the runner, then run every plan rank 0 sends.

    With ``heartbeat``, a thread writes this rank's heartbeat (its step count) to Redis.
    """
    configure_logging()  # a spawned process: log like rank 0 (TPQ_LOG_FORMAT, TPQ_LOG_LEVEL are inherited)
    torch.set_num_threads(threads_per_rank(world_size))
    _exit_when_parent_dies(parent_pid)
    try:
        init_group(rank, world_size, init_method, rank_device(spec.device, rank), timeout_s=spec.collective_timeout_s)
        runner = ModelRunner(spec)
    except Exception as exc:  # report any start failure to rank 0, which raises it
        ready_pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    ready_pipe.send(("ready", None))
    channel = PlanChannel(rank_device(spec.device, rank))
    steps = [0]
    if heartbeat is not None:
        HeartbeatThread(heartbeat, rank, step=lambda: steps[0]).start()
    try:
        while (plan := channel.recv()).command is not Command.SHUTDOWN:
            if plan.command is Command.STEP:
                runner.execute(plan)
                steps[0] += 1
    except RuntimeError as exc:
        log.error("rank %d: leaving after a failed collective: %s", rank, exc)
        os._exit(1)
    destroy_group()


def _exit_when_parent_dies(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
