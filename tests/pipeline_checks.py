"""Checks shared by the tests that run the whole pipeline: every stream against its result."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from common.results import JobResult, TokenEvent

RESULT_TIMEOUT_S = 240


def collect(handles, timeout: float = RESULT_TIMEOUT_S) -> dict[str, tuple[list[TokenEvent], JobResult]]:
    """Every handle's streamed events and result, read concurrently (one thread per stream)."""
    def one(handle):
        events = list(handle.stream(timeout=timeout))
        return handle.id, (events, handle.result(timeout=timeout))

    with ThreadPoolExecutor(max_workers=min(32, len(handles))) as pool:
        return dict(pool.map(one, handles))


def assert_streams_match_results(outcomes: dict[str, tuple[list[TokenEvent], JobResult]]) -> None:
    """Each stream is gap- and duplicate-free and equals its job's result, token for token."""
    for job_id, (events, result) in outcomes.items():
        assert [e.index for e in events] == list(range(len(events))), f"{job_id}: gap or duplicate in the stream"
        assert [e.token_id for e in events] == result.token_ids, f"{job_id}: streamed tokens differ from the result"
        assert "".join(e.text for e in events) == result.text, f"{job_id}: streamed text differs from the result"
        assert result.request_id == job_id
