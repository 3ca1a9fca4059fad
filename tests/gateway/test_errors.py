"""The client's exceptions mapped onto HTTP statuses: a request the model refused is the client's 400."""
from __future__ import annotations

from common.errors import JobFailed, QueueFull, refusal
from producer.gateway.errors import from_tpq_error


def test_a_job_the_model_refused_is_a_400_and_other_failures_stay_500():
    refused = from_tpq_error(JobFailed("job 'j' failed", job_id="j", error=refusal("the prompt has 900 tokens")))
    assert (refused.status, refused.code) == (400, "request_refused_by_model")
    assert "the prompt has 900 tokens" in refused.message
    crashed = from_tpq_error(JobFailed("job 'j' failed", job_id="j", error="RuntimeError: CUDA error"))
    assert (crashed.status, crashed.code) == (500, "job_failed")


def test_a_full_queue_is_a_429_with_retry_after():
    full = from_tpq_error(QueueFull("queue gen.3 is full"))
    assert full.status == 429 and full.headers["Retry-After"].isdigit()
