"""The chaos soak's checks of what HTTP clients received (bench/soak/checks.py ``check_http``): each defect is seen."""
from __future__ import annotations

import pytest

from bench.soak.checks import check_http
from bench.soak.http_clients import HttpAnswer
from bench.soak.workload import Outcome, Spec
from common.results import FinishReason, JobResult, Timings, Usage

TOKENS = [5, 6, 7, 8, 9]
TEXT = "a b c d"  # token 2's text is empty (an incomplete character): the event of token 3 carries it


def outcome(answer: HttpAnswer, *, stream: bool = True) -> Outcome:
    """A finished HTTP job of TOKENS whose client received ``answer``."""
    spec = Spec(job_id="soak-0-1", prompt="p", session_id="s1", sampling={}, stream=stream, http=True)
    result = JobResult(request_id=spec.job_id, text=TEXT, token_ids=TOKENS, finish_reason=FinishReason.LENGTH,
                       usage=Usage(prompt_tokens=1, cached_tokens=0, generated_tokens=len(TOKENS)),
                       timings=Timings(queue_s=0, time_to_first_token_s=0, total_s=0), group="g0")
    o = Outcome(spec, http=answer)
    o.end("finished", result)
    return o


def streamed(events: list[tuple[int, str]], end_id: int | None = 4, tokens: int = 5,
             finish: str = "length") -> HttpAnswer:
    return HttpAnswer(text="".join(t for _, t in events), events=[(i, t, 0.0) for i, t in events],
                      end_id=end_id, finish_reason=finish, completion_tokens=tokens)


WHOLE = [(0, "a"), (1, " b"), (3, " c"), (4, " d")]


def test_a_whole_stream_has_no_defect():
    assert check_http(outcome(streamed(WHOLE))) == (0, 0, 0)


def test_the_finish_event_covers_trailing_empty_tokens():
    events = [(0, "a"), (1, " b"), (3, " c d")]
    assert check_http(outcome(streamed(events, end_id=4))) == (0, 0, 0)
    assert check_http(outcome(streamed(events, end_id=None))) == (0, 1, 0)  # no finish: token 4 never came


@pytest.mark.parametrize("events, expected", [
    ([(0, "a"), (1, " b"), (1, " b"), (3, " c"), (4, " d")], (1, 0, 1)),  # an event sent twice after a resume
    ([(0, "a"), (1, " b"), (4, " d")], (0, 0, 1)),  # token 3's event was skipped: its text never came
    ([(0, "a"), (1, " b"), (3, " c")], (0, 0, 1)),  # the finish event covers token 4, whose text never came
])
def test_duplicated_and_skipped_events_are_seen(events, expected):
    assert check_http(outcome(streamed(events))) == expected


def test_a_stream_that_ends_early_misses_tokens():
    assert check_http(outcome(streamed(WHOLE[:2], end_id=None))) == (0, 3, 1)


def test_usage_and_finish_reason_are_checked():
    assert check_http(outcome(streamed(WHOLE, tokens=4))) == (0, 0, 1)
    assert check_http(outcome(streamed(WHOLE, finish="stop"))) == (0, 0, 1)


def test_a_non_streamed_answer_is_checked_by_text_and_usage():
    good = HttpAnswer(text=TEXT, finish_reason="length", completion_tokens=5)
    assert check_http(outcome(good, stream=False)) == (0, 0, 0)
    assert check_http(outcome(HttpAnswer(text=TEXT + " d", finish_reason="length", completion_tokens=5),
                              stream=False)) == (0, 0, 1)
