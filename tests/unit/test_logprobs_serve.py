"""The serve path keeps logprobs unchanged: resumed tokens' logprobs from the log, the job's result from the engine's."""
from common.results import FinishReason, GenerationResult, Timings, TokenEvent, TokenLogprob, Usage
from common.schemas import GenerationRequest
from gpu_worker.serve.admission import FinishWithoutEngine
from gpu_worker.serve.jobs import engine_job_result, resumed_logprobs

ASKING = GenerationRequest(prompt="hi", sampling={"logprobs": 2, "prompt_logprobs": 1})
PLAIN = GenerationRequest(prompt="hi")
LOGGED = (
    TokenEvent(request_id="j", index=0, token_id=5, text="a", logprob=-0.5, top_logprobs=[(5, -0.5), (6, -1.0)]),
    TokenEvent(request_id="j", index=1, token_id=6, text="b"),  # written by a worker without logprobs
)


def test_resumed_tokens_take_their_logprobs_from_the_logged_events():
    assert resumed_logprobs(ASKING, LOGGED) == [
        TokenLogprob(token_id=5, logprob=-0.5, top_logprobs=[(5, -0.5), (6, -1.0)]),
        TokenLogprob(token_id=6, logprob=None),
    ]
    assert resumed_logprobs(PLAIN, LOGGED) is None


def test_a_job_completed_from_its_log_carries_the_logged_logprobs():
    result = FinishWithoutEngine(ASKING, LOGGED, FinishReason.LENGTH, end_written=True).job_result("j", 1, "g", 2)
    assert result.logprobs == resumed_logprobs(ASKING, LOGGED)
    assert result.prompt_logprobs is None  # only an engine run computes them
    assert FinishWithoutEngine(PLAIN, LOGGED, FinishReason.LENGTH).job_result("j", 1, "g", 2).logprobs is None


def test_the_job_result_carries_the_engines_logprobs_unchanged():
    prompt = [TokenLogprob(token_id=3), TokenLogprob(token_id=4, logprob=-2.0, top_logprobs=[(9, -0.1)])]
    result = GenerationResult(request_id="j", text="ab", token_ids=[5, 6], finish_reason=FinishReason.LENGTH,
                              usage=Usage(prompt_tokens=2, cached_tokens=0, generated_tokens=2),
                              timings=Timings(queue_s=0.1, time_to_first_token_s=0.2, total_s=0.3),
                              logprobs=[e.token_logprob() for e in LOGGED], prompt_logprobs=prompt)
    job_result = engine_job_result(result, queued_before_s=1.0, group="g", attempt=1)
    assert job_result.logprobs == result.logprobs and job_result.prompt_logprobs == prompt
    stored = job_result.model_dump(mode="json")  # what rq stores
    assert type(job_result).model_validate(stored) == job_result
