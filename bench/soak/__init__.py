"""Chaos soak (issue 4): N jobs through the whole stack while a chaos thread keeps breaking it.

    .venv/bin/python -m bench.soak --jobs 200                    # a few minutes
    .venv/bin/python -m bench.soak --groups 2 --redis-sigkill    # the full run: 2,000 jobs (bench/RESULTS.md)
    .venv/bin/python -m bench.soak --http                        # a share of the jobs through 2 gateway replicas

The stack is the real one, every part its own process: an embedded
redis-server (AOF on, ``appendfsync everysec``), ``tpq supervisor`` (restarted
by the stack when it dies) and ``--groups`` worker groups of ``--tp`` ranks
(restarted by their launchers) on a tiny random Llama, with fast failure
detection (heartbeats every 0.25 s, TTL 1.5 s). The processes' logs go to
``--log-file``.

Client threads submit the jobs, a few at a time each: session jobs one by
one (``--stream-fraction`` of them read through ``JobHandle.stream()`` while
they run, the rest through ``result()``) and session-less jobs in small
``submit_batch`` batches (``BatchHandle.results()``). A client that finds
Redis unreachable retries with the same request id, as any client would.

With ``--http``, ``--gateways`` ``tpq gateway`` replicas (their own
processes, restarted when they exit) also serve the stack, and
``--http-fraction`` of the session jobs go through them as
``POST /v1/completions`` from HTTP clients, streamed or not as the others:
a client whose replica fails moves to the other one, a stream resuming
with ``Last-Event-ID`` (:mod:`bench.soak.http_clients`). ``gateway-kill``
(kill -9 of a replica) joins the faults.

The chaos thread waits ``--interval-s`` (+-50%) after the stack has recovered
from its previous fault, then picks one of: kill -9 of a random non-zero
rank, kill -9 of rank 0, kill -9 of the supervisor, a Redis restart
(SIGTERM: Redis writes its AOF and exits) and, with ``--redis-sigkill``, a
Redis SIGKILL (the AOF's last second of writes may be lost). It stops once
every job is submitted; the jobs then have ``--grace-s`` to end.

Printed at the end: jobs submitted, completed, failed (with their reasons),
lost (no terminal state within the grace time), duplicated or missing
tokens at the clients (every live stream against its job's result, and
every finished job's token log against its result), the faults and the
recovery times: from each fault to the stack being whole again (a group: a
new incarnation heartbeating on every rank and owning shards again; the
supervisor: a new one holding the lock; Redis: answering, every group
live), and from each fault to the next token a client received of a job the
fault interrupted (sampled after the fault). Timings on a shared 2-core
machine are noisy: read them as orders of magnitude.
"""
