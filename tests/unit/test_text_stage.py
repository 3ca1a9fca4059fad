"""The text stage on its own (no model): deltas, stop strings across tokens, tokens past a stop dropped, resume."""
import pytest

from common.results import FinishReason, TokenLogprob
from common.sampling import SamplingParams
from gpu_worker.engine.llm_engine import FinishedRequest, SampledToken
from gpu_worker.engine.text_stage import TextStage
from gpu_worker.models.tokenizer import Tokenizer
from tests.text_checks import spanning_stop

PROMPT_TEXT = "Once upon a time,"
TEXT = " there was a little robot who loved to read books about the sea"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return Tokenizer(tiny_llama_dir)


def token_texts(tokenizer, ids):
    """Each token's delta when the ids are decoded one by one (the tiny tokenizer's text is ASCII here)."""
    return [tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])):] for i in range(len(ids))]


def sampled(request_id, ids, start=0, last_reason=None):
    tokens = [SampledToken(request_id, start + i, t, sampled_at=0.0, logprob=TokenLogprob(token_id=t, logprob=-i))
              for i, t in enumerate(ids)]
    if last_reason is not None:
        tokens[-1].finish_reason = last_reason
    return tokens


def finished(request_id, ids, reason):
    return FinishedRequest(request_id, list(ids), reason, prompt_tokens=4, cached_tokens=0, queue_s=0.0,
                           time_to_first_token_s=0.0, total_s=0.0,
                           logprobs=[TokenLogprob(token_id=t, logprob=-i) for i, t in enumerate(ids)])


def test_tokens_after_a_stop_string_are_dropped_and_the_stop_is_asked_once(tokenizer):
    prompt, ids = tokenizer.encode(PROMPT_TEXT), tokenizer.encode(TEXT)
    texts = token_texts(tokenizer, ids)
    stop, k = spanning_stop(texts)
    stage = TextStage(tokenizer, eos_token_ids=[2])
    stage.add("r", prompt, SamplingParams(stop=("never seen", stop)))
    events, stops = [], []
    for token in sampled("r", ids):  # one step each; the engine runs on until the stop reaches it
        out = stage.process([token], [])
        events += out.events
        stops += out.stops
    out = stage.process([], [finished("r", ids, FinishReason.STOP)])  # the engine's abort, steps later
    [result] = out.finished

    expected = "".join(texts)[:"".join(texts).index(stop)]
    assert stops == ["r"]
    assert [e.index for e in events] == list(range(k + 2))  # up to the token that completed the stop string
    assert events[-1].finish_reason is FinishReason.STOP and all(e.finish_reason is None for e in events[:-1])
    assert "".join(e.text for e in events) == expected == result.text
    assert result.token_ids == ids[:k + 2] and result.usage.generated_tokens == k + 2
    assert [lp.token_id for lp in result.logprobs] == ids[:k + 2]
    assert [e.logprob for e in events] == [lp.logprob for lp in result.logprobs]
    assert stage.dropped_tokens == len(ids) - (k + 2)
    assert len(stage) == 0


def test_a_stop_string_in_the_last_token_needs_no_stop_request(tokenizer):
    ids = tokenizer.encode(TEXT)
    texts = token_texts(tokenizer, ids)
    stop, k = spanning_stop(texts)
    kept = ids[:k + 2]
    stage = TextStage(tokenizer, eos_token_ids=[2])
    stage.add("r", [5], SamplingParams(stop=(stop,)))
    out = stage.process(sampled("r", kept, last_reason=FinishReason.LENGTH), [finished("r", kept, FinishReason.LENGTH)])
    assert out.stops == []
    assert out.events[-1].finish_reason is FinishReason.STOP
    assert out.finished[0].finish_reason is FinishReason.STOP
    assert out.finished[0].text == "".join(texts)[:"".join(texts).index(stop)]


def test_a_cancel_that_races_the_stop_keeps_the_stop(tokenizer):
    ids = tokenizer.encode(TEXT)
    stop, k = spanning_stop(token_texts(tokenizer, ids))
    stage = TextStage(tokenizer, eos_token_ids=[2])
    stage.add("r", [5], SamplingParams(stop=(stop,)))
    assert stage.process(sampled("r", ids), []).stops == ["r"]
    [result] = stage.process([], [finished("r", ids, FinishReason.CANCELLED)]).finished
    assert result.finish_reason is FinishReason.STOP and result.token_ids == ids[:k + 2]


def test_held_back_text_is_sent_when_no_stop_string_comes(tokenizer):
    ids = tokenizer.encode(TEXT)
    stage = TextStage(tokenizer, eos_token_ids=[2])
    stage.add("r", [5], SamplingParams(stop=("zzzzz",)))
    first = stage.process(sampled("r", ids[:-1]), [])
    assert len("".join(e.text for e in first.events)) == len(tokenizer.decode(ids[:-1])) - 4  # the holdback
    last = stage.process(sampled("r", ids[-1:], start=len(ids) - 1, last_reason=FinishReason.LENGTH),
                         [finished("r", ids, FinishReason.LENGTH)])
    assert "".join(e.text for e in first.events + last.events) == tokenizer.decode(ids) == last.finished[0].text


def test_eos_and_stop_token_ids_end_without_text(tokenizer):
    ids = tokenizer.encode(TEXT)[:4]
    stage = TextStage(tokenizer, eos_token_ids=[ids[-1]])
    stage.add("r", [5], SamplingParams())
    out = stage.process(sampled("r", ids, last_reason=FinishReason.STOP), [finished("r", ids, FinishReason.STOP)])
    assert out.finished[0].text == tokenizer.decode(ids[:-1]) and out.events[-1].text == ""
    assert out.finished[0].token_ids == ids


def test_a_resumed_request_continues_the_text_already_sent(tokenizer):
    ids = tokenizer.encode(TEXT)
    sampling = SamplingParams(stop=("zzz",))
    whole = TextStage(tokenizer, eos_token_ids=[2])
    whole.add("r", [5], sampling)
    out = whole.process(sampled("r", ids, last_reason=FinishReason.LENGTH), [finished("r", ids, FinishReason.LENGTH)])
    resumed = TextStage(tokenizer, eos_token_ids=[2])
    resumed.add("r", [5], sampling, resume_token_ids=ids[:6])
    rest = resumed.process(sampled("r", ids[6:], start=6, last_reason=FinishReason.LENGTH),
                           [finished("r", ids, FinishReason.LENGTH)])
    assert "".join(e.text for e in out.events[:6] + rest.events) == out.finished[0].text
    assert rest.finished[0].text == out.finished[0].text
