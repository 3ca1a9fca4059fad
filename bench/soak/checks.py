"""The soak's checks: lost jobs, duplicated or missing tokens, token log gaps, results that changed.

Once the clients are done, :func:`settle` waits for the jobs a crash made
run again and reads each finished job's result as Redis holds it; then
:func:`find` checks every finished job's live stream (if it streamed)
against the result its client got, and its token log against the result
Redis holds. A defect does not count against the stack when a crash that
lost writes (a Redis SIGKILL whose AOF was cut back) fell within the job's
life: such a job is 'lossy'.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from bench.soak.chaos import Fault
from bench.soak.workload import Outcome
from common import keys
from common.errors import TpqError
from common.results import JobResult, StreamEnd, TokenEvent
from common.text import as_optional_text
from common.token_log import read_log
from producer import Client


@dataclass
class Findings:
    """What the checks found over every job; each of :attr:`defects` is a job id and what is wrong with it."""

    lossy: set[str]  # jobs whose life a crash that lost writes fell within
    lost: list[Outcome]  # no terminal state within the grace time
    unsettled: list[str]  # completed jobs still queued or running again after the settle wait
    counts: collections.Counter[str] = field(default_factory=collections.Counter)  # live stream tokens
    changed: list[Outcome] = field(default_factory=list)  # results that changed after their client got them
    log_defects: list[Outcome] = field(default_factory=list)  # token logs with a gap or difference
    forgotten: list[Outcome] = field(default_factory=list)  # completed jobs Redis then lost entirely
    defects: list[tuple[str, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No job lost; every defect and every job running again explained by a crash that lost writes."""
        return (not self.lost and all(job_id in self.lossy for job_id, _ in self.defects)
                and all(job_id in self.lossy for job_id in self.unsettled))


def find(outcomes: dict[str, Outcome], faults: list[Fault], conn, unsettled: list[str]) -> Findings:
    """Every check over the jobs' ``outcomes``; also sets each fault's :attr:`Fault.next_token_s`."""
    finished = [o for o in outcomes.values() if o.state == "finished"]
    found = Findings(lossy={o.spec.job_id for o in outcomes.values() if exposed(o, faults)},
                     lost=[o for o in outcomes.values() if o.state == "lost"], unsettled=unsettled)
    for o in (o for o in finished if o.spec.stream or o.spec.http):
        d, m, x = check_http(o) if o.spec.http else check_stream(o)
        prefix = "http_" if o.spec.http else ""
        found.counts.update({f"{prefix}duplicated": d, f"{prefix}missing": m, f"{prefix}differing": x})
        if o.spec.job_id in found.lossy:
            found.counts.update({f"{prefix}duplicated_lossy": d, f"{prefix}missing_lossy": m,
                                 f"{prefix}differing_lossy": x})
        if d or m or x or o.stream_error:
            what = "HTTP " + ("stream" if o.spec.stream else "answer") if o.spec.http else "live stream"
            found.defects.append((o.spec.job_id, f"{what}: {d} duplicated, {m} missing, {x} differing tokens "
                                                 f"{o.stream_error}"))
    found.changed = [o for o in finished if o.final is not None and o.final.token_ids != o.result.token_ids]
    for o in found.changed:
        found.defects.append((o.spec.job_id, f"the result changed after its client got it: attempt "
                                             f"{o.result.attempt} -> {o.final.attempt}"))
    for o in finished:
        if o.final is None and not conn.exists(keys.rq_job_key(o.spec.job_id)):
            found.forgotten.append(o)  # no job, no log: Redis lost its whole life after the client saw it
            if o.spec.job_id not in found.lossy:
                found.defects.append((o.spec.job_id, "Redis no longer knows the job, yet no crash lost writes"))
            continue
        why = check_log(conn, o.spec.job_id, o.final or o.result)
        if why:
            found.log_defects.append(o)
            found.defects.append((o.spec.job_id, f"token log: {why}"))
    next_tokens(faults, outcomes)
    return found


def next_tokens(faults: list[Fault], outcomes: dict[str, Outcome]) -> None:
    """Each fault's time to the next token a client received of a job it interrupted, sampled after it.

    A gateway kill interrupts HTTP clients, whose events carry no sampling
    time: for it, the next event received after it.
    """
    for fault in faults:
        http = fault.kind == "gateway-kill"
        received = [recv for job_id in fault.interrupted if job_id in outcomes
                    for _i, _t, _x, sampled, recv in outcomes[job_id].events
                    if (recv if http else sampled) > fault.at_wall]
        if received:
            fault.next_token_s = min(received) - fault.at_wall


def check_stream(outcome: Outcome) -> tuple[int, int, int]:
    """(duplicated, missing, differing) tokens of a live stream against the result its client got."""
    tokens = outcome.result.token_ids
    seen = collections.Counter(index for index, *_ in outcome.events)
    duplicated = sum(count - 1 for count in seen.values())
    missing = sum(1 for i in range(len(tokens)) if i not in seen) + sum(1 for i in seen if i >= len(tokens))
    first = {}
    for index, token_id, *_ in outcome.events:
        first.setdefault(index, token_id)
    differing = sum(1 for i, token_id in first.items() if i < len(tokens) and tokens[i] != token_id)
    text = "".join(x for _i, _t, x, *_ in sorted(outcome.events, key=lambda e: e[0]))
    return duplicated, missing, differing + (text != outcome.result.text and not (duplicated or missing))


def check_http(outcome: Outcome) -> tuple[int, int, int]:
    """(duplicated, missing, differing) tokens of what an HTTP client received against its job's result.

    A stream's text events carry the index of their last token as their id
    (an event covers the tokens after the previous event's, the empty-text
    ones among them), the finish event that of the job's last token: a
    duplicated token is an event whose id is not past the one before it, a
    missing one a token no event covers. Differing: the joined text is not
    the result's, or the usage or finish reason disagrees with it. A
    non-streamed answer: its text and usage against the result.
    """
    answer, tokens = outcome.http, outcome.result.token_ids
    reported = (answer.completion_tokens == len(tokens) and answer.finish_reason == outcome.result.finish_reason.value)
    if not outcome.spec.stream:
        return 0, 0, int(answer.text != outcome.result.text or not reported)
    covered, duplicated, last = set(), 0, -1
    for event_id, *_ in answer.events + ([(answer.end_id,)] if answer.end_id is not None else []):
        if event_id <= last and event_id != answer.end_id:
            duplicated += 1
        covered.update(range(last + 1, event_id + 1))
        last = max(last, event_id)
    missing = sum(1 for i in range(len(tokens)) if i not in covered) + sum(1 for i in covered if i >= len(tokens))
    return duplicated, missing, int(answer.text != outcome.result.text or not reported)


def check_log(conn, job_id: str, result: JobResult) -> str:
    """'' if the job's token log is ``result``, token for token, with no gap and an end record; else what differs."""
    messages = read_log(conn, job_id)
    tokens = [m for m in messages if isinstance(m, TokenEvent)]
    ends = [m for m in messages if isinstance(m, StreamEnd)]
    indices = [t.index for t in tokens]
    if indices != list(range(len(indices))):
        holes = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        return f"gap at token(s) {holes[:5]}"
    logged = [t.token_id for t in tokens]
    if logged != result.token_ids:
        first = next((i for i, (a, b) in enumerate(zip(logged, result.token_ids)) if a != b),
                     min(len(logged), len(result.token_ids)))
        return f"{len(logged)} logged tokens differ from the result's {len(result.token_ids)} from index {first}"
    if len(ends) != 1 or ends[0].num_tokens != len(tokens):
        return "no end record" if not ends else f"end record at {ends[0].num_tokens}, {len(tokens)} tokens"
    return ""


def exposed(outcome: Outcome, faults: list[Fault]) -> bool:
    """Whether a crash that lost writes (a SIGKILL whose AOF was cut back) fell within the job's life."""
    return any(f.lost_s and outcome.submitted_at <= f.at_wall
               and (outcome.ended_at is None or outcome.ended_at >= f.at_wall - f.lost_s) for f in faults)


def settle(client: Client, conn, outcomes: dict[str, Outcome], timeout_s: float) -> list[str]:
    """The finished jobs still queued or running again after a wait of up to ``timeout_s``; sets their ``final``.

    A crash that lost a job's completion runs it again: wait until no job the
    client saw end is queued or running again, then read each finished job's
    result as Redis holds it into :attr:`Outcome.final`.
    """
    ids = [o.spec.job_id for o in outcomes.values() if o.state == "finished"]
    deadline = time.monotonic() + timeout_s
    while True:
        with conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.rq_job_key(job_id), "status")
            statuses = [as_optional_text(status) for status in pipe.execute()]
        busy = [job_id for job_id, status in zip(ids, statuses) if status in ("queued", "started")]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(1)
    for job_id in ids:
        try:
            outcomes[job_id].final = client.job(job_id).result(timeout=1)
        except TpqError:
            pass
    return busy

