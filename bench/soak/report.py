"""The soak's report: the table of figures it prints at the end, then where each defective job stands in Redis."""
from __future__ import annotations

import argparse
import collections
import re

from bench.soak.chaos import Chaos
from bench.soak.checks import Findings
from bench.soak.workload import Clients, Outcome, Spec
from common import keys
from common.text import as_optional_text, as_text
from common.token_log import position_of, read_log
from producer.local_stack.demo_cli import percentile
from router.rq_maintenance import started_registry


def report(args: argparse.Namespace, specs: list[Spec], clients: Clients, chaos: Chaos, conn, elapsed_s: float,
           found: Findings) -> None:
    """Print the soak's table of figures, then the defective, lost and unsettled jobs as Redis holds them."""
    _table(args, specs, clients, chaos, elapsed_s, found)
    _jobs(conn, clients.outcomes, found)


def _table(args: argparse.Namespace, specs: list[Spec], clients: Clients, chaos: Chaos, elapsed_s: float,
           found: Findings) -> None:
    """The table of figures: jobs and their fate, the checks' findings, the faults and the recovery times."""
    outcomes, lossy, counts = clients.outcomes, found.lossy, found.counts
    by_state = collections.Counter(o.state for o in outcomes.values())
    finished = [o for o in outcomes.values() if o.state == "finished"]
    failures = collections.Counter(f"{o.state}: {reason_of(o.error)}" for o in outcomes.values()
                                   if o.state not in ("finished", "lost"))
    attempts = collections.Counter((o.final or o.result).attempt for o in finished)
    kinds = collections.Counter(f.kind for f in chaos.faults)
    sessions = sum(s.session_id is not None for s in specs)
    streamed = sum(o.spec.stream and not o.spec.http for o in finished)

    def split(figure: str) -> str:
        lossy_part = counts[f"{figure}_lossy"]
        return f"{counts[figure]} {figure.removeprefix('http_')}" + (f" ({lossy_part} lossy)" if lossy_part else "")

    def lossy_of(items: list[Outcome]) -> str:
        n = sum(o.spec.job_id in lossy for o in items)
        return f" ({n} lossy)" if n else ""

    print(f"\nchaos soak: {len(specs)} jobs ({sessions} session jobs, {sum(s.stream for s in specs)} of them "
          f"streamed; {len(specs) - sessions} session-less in batches of {args.batch_size}), {args.groups} group(s) "
          f"x tp={args.tp}, tiny Llama, a fault every ~{args.interval_s:g} s after recovery, {elapsed_s / 60:.1f} min")
    if any(f.lost_s for f in chaos.faults):
        print(f"'lossy': a Redis SIGKILL whose AOF was cut back {args.aof_lost_s:g} s (what a machine crash with "
              "appendfsync everysec loses) fell within the job's life")
    print("| figure | value |")
    print("|---|---|")
    print(f"| submitted | {len(outcomes)} |")
    print(f"| completed | {by_state['finished']} |")
    print(f"| failed | {len(specs) - by_state['finished'] - by_state['lost']}"
          f"{'' if not failures else ': ' + '; '.join(f'{n} x {r!r}' for r, n in failures.most_common())} |")
    print(f"| lost (no terminal state {args.grace_s:g} s after the chaos stopped) | {len(found.lost)} |")
    print(f"| live streams checked against the result their client got | {streamed}: {split('duplicated')}, "
          f"{split('missing')}, {split('differing')} tokens |")
    if args.http:
        _http_rows(args, outcomes, finished, split)
    print(f"| results that changed after their client got them (ran again) | {len(found.changed)}"
          f"{lossy_of(found.changed)} |")
    print(f"| token logs checked against the final results | {len(finished) - len(found.forgotten)}: "
          f"{len(found.log_defects)} with a gap or difference{lossy_of(found.log_defects)} |")
    print(f"| completed jobs Redis then forgot entirely (job and log), their client holding the result | "
          f"{len(found.forgotten)}{lossy_of(found.forgotten)} |")
    print(f"| completed jobs queued or running again 120 s after the soak | {len(found.unsettled)}"
          f"{lossy_of([outcomes[i] for i in found.unsettled])} |")
    print(f"| jobs submitted again by their client (Redis lost them) | "
          f"{sum(bool(o.resubmitted) for o in outcomes.values())} |")
    print(f"| faults | {len(chaos.faults)}: " + ", ".join(f"{k} {kinds[k]}" for k in chaos.kinds) + " |")
    for kind in chaos.kinds:
        mine = [f for f in chaos.faults if f.kind == kind]
        if not mine:
            continue
        ready = [f.ready_s for f in mine if f.ready_s is not None]
        wedged = sum(f.ready_s is None for f in mine)
        print(f"| {kind}: whole again, p50 / max | {describe(ready)}{f'; {wedged} never (wedged)' if wedged else ''} |")
        print(f"| {kind}: next token of an interrupted job, p50 / max | "
              f"{describe([f.next_token_s for f in mine if f.next_token_s is not None])} |")
    print(f"| attempts of completed jobs | " + ", ".join(f"{k}: {attempts[k]}" for k in sorted(attempts)) + " |")
    print(f"| client calls retried (Redis unreachable) | {clients.redis_retries} |")
    if chaos.skipped:
        print("faults skipped: " + ", ".join(f"{k} {n}" for k, n in chaos.skipped.items()))


def _http_rows(args: argparse.Namespace, outcomes: dict[str, Outcome], finished: list[Outcome], split) -> None:
    """The table's rows for the jobs that went through the gateway replicas."""
    http = [o for o in outcomes.values() if o.spec.http]
    answers = [o.http for o in http if o.http is not None]
    moved = [a for a in answers if a.failovers]
    checked = [o for o in finished if o.spec.http]
    print(f"| jobs through the {args.gateways} gateway replicas (POST /v1/completions) | {len(http)}: "
          f"{sum(o.spec.stream for o in http)} streamed |")
    print(f"| HTTP clients moved to the other replica | {len(moved)} jobs, {sum(a.failovers for a in moved)} times; "
          f"{sum(a.resumes for a in answers)} streams resumed with Last-Event-ID, "
          f"{sum(a.posts - 1 for a in answers)} requests posted again |")
    print(f"| HTTP answers checked against their job's result | {len(checked)} "
          f"({sum(o.spec.stream for o in checked)} streams): {split('http_duplicated')}, {split('http_missing')}, "
          f"{split('http_differing')} |")


def _jobs(conn, outcomes: dict[str, Outcome], found: Findings) -> None:
    """The first defective, lost and unsettled jobs, each with where it stands in Redis now."""
    for job_id, what in sorted(found.defects, key=lambda d: d[0] in found.lossy)[:30]:
        o = outcomes[job_id]
        print(f"  defect{' (lossy)' if job_id in found.lossy else ''}: {job_id} {o.spec.sampling}: {what}; now: "
              f"{describe_job(conn, job_id)}")
    for o in found.lost[:20]:
        print(f"  lost: {o.spec.job_id}: {describe_job(conn, o.spec.job_id)}")
    for job_id in found.unsettled[:20]:
        print(f"  running again: {job_id}: {describe_job(conn, job_id)}")


def reason_of(error: str) -> str:
    """A failure message with job ids, incarnations and numbers taken out, so equal causes count together."""
    text = re.sub(r"[0-9a-f]{12}", "<incarnation>", error)
    text = re.sub(r"soak-\d+-\d+", "<job>", text)
    text = re.sub(r"pid \d+", "pid <n>", text)
    return text[:300]


def describe(values: list[float]) -> str:
    """``values``' median and maximum in seconds, and how many there are."""
    if not values:
        return "n=0"
    return f"{percentile(values, 50):.1f} / {max(values):.1f} s (n={len(values)})"


def describe_job(conn, job_id: str) -> str:
    """Where a job stands in Redis: its rq hash, queue, group claim lists, started registry and token log."""
    status, origin, attempts, retries = (as_optional_text(v) for v in conn.hmget(
        keys.rq_job_key(job_id), ["status", "origin", keys.JOB_ATTEMPTS_FIELD, "retries_left"]))
    places = []
    if origin and conn.lpos(keys.rq_queue_key(origin), job_id) is not None:
        places.append(f"in queue {origin}")
    for group in conn.smembers(keys.groups_set()):
        if conn.lpos(keys.claimed_jobs(as_text(group)), job_id) is not None:
            places.append(f"claimed by {as_text(group)}")
    if origin and any(True for _ in conn.zscan_iter(started_registry(conn, origin).key, match=f"{job_id}:*")):
        places.append("in the started registry")
    messages = read_log(conn, job_id)
    return (f"status {status}, origin {origin}, started {attempts} times, retries left {retries}, "
            f"{', '.join(places) or 'in no queue, claim list or registry'}; token log: {len(messages)} messages, "
            f"last at {position_of(messages[-1]) if messages else '-'}")
