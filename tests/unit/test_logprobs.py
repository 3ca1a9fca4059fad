"""Logprobs from the engine (tp=1) against transformers' log-softmax on tiny random checkpoints.

Prompt and sampled-token logprobs and their top-k must equal transformers'
fp32 log-softmax within 1e-4 (same ids, same values), greedy and sampled,
through chunked prefill, the prefix cache, preemption and resume.
"""
import json

import pytest
import torch
from pydantic import ValidationError

from common.jobs import decode_stream_message, encode_stream_message
from common.results import FinishReason, GenerationResult, Timings, TokenEvent, TokenLogprob, Usage
from common.sampling import SamplingParams
from gpu_worker.llm import Engine
from tests.parity import LOGPROB_TOLERANCE, assert_logprobs_match_transformers

BLOCK = 4
BUDGET = 16  # tokens per step: a 37-token prompt prefills in chunks of 16, 16 and 5

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3)
SAMPLED = SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=11, max_tokens=6, ignore_eos=True,
                         logprobs=4, prompt_logprobs=0)


def random_prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[request.param]


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(str(model_dir), block_size=BLOCK, max_num_batched_tokens=BUDGET, max_model_len=256) as eng:
        yield eng


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_prompt_and_sampled_logprobs_match_transformers(engine, model_dir, sampling):
    prompt = random_prompt(37)
    [result] = engine.generate({"prompt_token_ids": prompt}, sampling)
    assert_logprobs_match_transformers(model_dir, prompt, result, sampling)
    # the stream carries what the result does, token by token
    events = list(engine.stream({"prompt_token_ids": prompt}, sampling))
    assert [e.token_id for e in events] == result.token_ids
    assert [e.token_logprob() for e in events] == result.logprobs


def test_sampled_logprobs_are_the_raw_distribution_not_the_tempered_one(engine):
    """Temperature, top-k and top-p change what is drawn, never the logprobs reported for a token."""
    prompt = random_prompt(9, seed=4)
    raw = SamplingParams(temperature=0, max_tokens=1, logprobs=3)
    tempered = raw.model_copy(update={"temperature": 5.0, "top_k": 2, "seed": 1})
    [greedy] = engine.generate({"prompt_token_ids": prompt}, raw)
    [hot] = engine.generate({"prompt_token_ids": prompt}, tempered)
    [(hot_ids, hot_values)], [(ids, values)] = [[list(zip(*r.logprobs[0].top_logprobs))] for r in (hot, greedy)]
    assert hot_ids == ids and hot_values == pytest.approx(values, abs=LOGPROB_TOLERANCE)


def test_rows_that_did_not_ask_get_nothing_and_asking_changes_no_token(engine, model_dir):
    prompts = [random_prompt(n, seed=n) for n in (5, 23, 12)]
    plain = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    mixed = [plain.model_copy(update={"logprobs": 0}), plain, plain.model_copy(update={"prompt_logprobs": 2})]
    expected = engine.generate([{"prompt_token_ids": p} for p in prompts], plain)
    results = engine.generate([{"prompt_token_ids": p} for p in prompts], mixed)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    only_sampled, neither, only_prompt = results
    assert only_sampled.prompt_logprobs is None and all(e.top_logprobs == [] for e in only_sampled.logprobs)
    assert neither.logprobs is None and neither.prompt_logprobs is None
    assert only_prompt.logprobs is None and len(only_prompt.prompt_logprobs) == len(prompts[2])
    assert_logprobs_match_transformers(model_dir, prompts[0], only_sampled, mixed[0])
    assert_logprobs_match_transformers(model_dir, prompts[2], only_prompt, mixed[2])
    events = list(engine.stream([{"prompt_token_ids": p} for p in prompts], mixed))
    wire = [json.loads(encode_stream_message(e)) for e in events]
    assert all(("logprob" in w) == (w["request_id"] == "0") for w in wire)  # only the request that asked


def test_prompt_logprobs_are_computed_even_when_the_prefix_is_cached(engine, model_dir):
    """A request with prompt_logprobs takes nothing from the prefix cache; its blocks still fill the cache."""
    prompt = random_prompt(6 * BLOCK + 1, seed=9)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.generate({"prompt_token_ids": prompt}, plain)
    [cached] = engine.generate({"prompt_token_ids": prompt}, plain)
    assert cached.usage.cached_tokens == 6 * BLOCK  # the prefix is in the cache
    asking = plain.model_copy(update={"prompt_logprobs": 1})
    [result] = engine.generate({"prompt_token_ids": prompt}, asking)
    assert result.usage.cached_tokens == 0
    assert_logprobs_match_transformers(model_dir, prompt, result, asking)
    assert result.token_ids == cached.token_ids


def test_preempted_requests_keep_one_prompt_logprob_per_token(model_dir):
    prompts = [random_prompt(n, seed=n) for n in (14, 10, 18, 6, 12)]
    sampling = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    with Engine(str(model_dir), block_size=BLOCK, max_num_batched_tokens=BUDGET, num_kv_blocks=20) as small:
        results = small.generate([{"prompt_token_ids": p} for p in prompts], sampling)
        assert small.llm.scheduler.num_preemptions > 0
    for prompt, result in zip(prompts, results):
        assert_logprobs_match_transformers(model_dir, prompt, result, sampling)


def test_a_resumed_request_keeps_the_logged_logprobs_and_computes_the_rest(engine, model_dir):
    prompt = random_prompt(11, seed=2)
    [full] = engine.generate({"prompt_token_ids": prompt}, GREEDY)
    llm, events, finished = engine.llm, [], []
    llm.add_request("resumed", prompt, GREEDY, resume_token_ids=full.token_ids[:3],
                    resume_logprobs=full.logprobs[:3])
    while llm.has_unfinished():
        output = llm.step()
        events += output.tokens
        finished += output.finished
    [result] = finished
    assert [e.index for e in events] == [3, 4, 5]
    assert result.logprobs[:3] == full.logprobs[:3]
    assert_logprobs_match_transformers(model_dir, prompt, result, GREEDY)


def test_a_resume_without_logged_logprobs_marks_those_tokens_unknown(engine):
    prompt = random_prompt(11, seed=2)
    [full] = engine.generate({"prompt_token_ids": prompt}, GREEDY)
    [result] = _resume(engine, prompt, full.token_ids[:2])
    assert [lp.logprob for lp in result.logprobs[:2]] == [None, None]
    assert all(lp.logprob is not None for lp in result.logprobs[2:])


def test_resume_logprobs_for_other_tokens_are_refused(engine):
    from common.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="resume_logprobs"):
        engine.llm.add_request("bad", [5, 6, 7], GREEDY, resume_token_ids=[8, 9],
                               resume_logprobs=[TokenLogprob(token_id=8, logprob=-1.0)])


def _resume(engine, prompt, tokens):
    llm, finished = engine.llm, []
    llm.add_request("resumed-unknown", prompt, GREEDY, resume_token_ids=tokens)
    while llm.has_unfinished():
        finished += llm.step().finished
    return finished


@pytest.mark.parametrize("bad", [{"logprobs": 21}, {"logprobs": -1}, {"logprobs": True}, {"prompt_logprobs": 21},
                                 {"prompt_logprobs": 1.5}])
def test_bad_logprob_counts_are_refused(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**bad)


def test_the_wire_format_is_unchanged_without_logprobs_and_round_trips_with_them():
    plain = TokenEvent(request_id="j", index=0, token_id=7, text="a")
    assert set(json.loads(encode_stream_message(plain))) == {"request_id", "index", "token_id", "text",
                                                              "finish_reason", "sampled_at"}
    old = b'{"request_id":"j","index":0,"token_id":7,"text":"a","finish_reason":null,"sampled_at":null}'
    assert decode_stream_message(old) == plain
    rich = plain.model_copy(update={"logprob": -0.25, "top_logprobs": [(7, -0.25), (3, -2.0)]})
    assert decode_stream_message(encode_stream_message(rich)) == rich
    result = GenerationResult(request_id="j", text="a", token_ids=[7], finish_reason=FinishReason.STOP,
                              usage=Usage(prompt_tokens=1, cached_tokens=0, generated_tokens=1),
                              timings=Timings(queue_s=0, time_to_first_token_s=0, total_s=0))
    assert "logprobs" not in result.model_dump(mode="json")
    assert "prompt_logprobs" not in result.model_dump(mode="json")
    with_them = result.model_copy(update={"prompt_logprobs": [TokenLogprob(token_id=7)]})
    assert GenerationResult.model_validate(with_them.model_dump(mode="json")) == with_them
