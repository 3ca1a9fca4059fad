"""The offline Engine on a tiny random Llama (tp=1): batching, caching, preemption, sampling, streaming."""
import math

import pytest
import torch
from pydantic import ValidationError

from common.errors import InvalidConfigError, InvalidRequestError, ModelNotFoundError
from common.results import FinishReason
from common.sampling import SamplingParams
from gpu_worker.engine.text_stage import TextStage
from gpu_worker.models.config import ModelConfig
from gpu_worker.llm import Engine
from tests.text_checks import spanning_stop

BLOCK = 4
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def random_prompts(count, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(count)]


def as_token_prompt(ids):
    return {"prompt_token_ids": ids}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    with Engine(str(tiny_llama_dir), block_size=BLOCK, max_model_len=256) as eng:
        yield eng


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """A second engine with no prefix cache: each request computed from scratch."""
    with Engine(str(tiny_llama_dir), block_size=BLOCK, enable_prefix_caching=False) as eng:
        yield eng


def alone(engine, ids, sampling=GREEDY):
    [result] = engine.generate(as_token_prompt(ids), sampling)
    return result


def test_batch_invariance_with_staggered_admission(engine, reference):
    prompts = random_prompts(16, [3, 7, 12, 19, 26, 33, 41, 5])
    expected = [alone(reference, p).token_ids for p in prompts]
    llm, results = engine.llm, {}
    for i, ids in enumerate(prompts):          # a new request joins at every step
        llm.add_request(f"s{i}", ids, GREEDY)
        results.update((r.request_id, r) for r in llm.step().finished)
    while llm.has_unfinished():
        results.update((r.request_id, r) for r in llm.step().finished)
    assert [results[f"s{i}"].token_ids for i in range(16)] == expected


def test_prefix_cache_computes_only_new_tokens(engine, reference):
    [shared] = random_prompts(1, [3 * BLOCK], seed=5)
    first, second = shared + [7, 8], shared + [9, 10, 11, 12, 13]
    alone(engine, first)
    before = engine.llm.stats.computed_tokens
    result = alone(engine, second)
    assert result.usage.cached_tokens == 3 * BLOCK
    assert result.usage.prompt_tokens == len(second)
    # 5 new prompt tokens, then one decode per generated token but the last
    assert engine.llm.stats.computed_tokens - before == 5 + result.usage.generated_tokens - 1
    assert result.token_ids == alone(reference, second).token_ids


def test_preemption_keeps_outputs_identical(tiny_llama_dir, reference):
    prompts = random_prompts(8, [10, 14, 6], seed=3)
    sampling = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [r.token_ids for r in reference.generate([as_token_prompt(p) for p in prompts], sampling)]
    with Engine(str(tiny_llama_dir), block_size=BLOCK, num_kv_blocks=24) as small:  # ~3 sequences fit
        results = small.generate([as_token_prompt(p) for p in prompts], sampling)
        assert small.llm.scheduler.num_preemptions > 0
        assert small.llm.block_manager.num_free_blocks == 24
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason is FinishReason.LENGTH for r in results)


def test_stream_events_match_the_result(engine):
    prompt = "The quick brown fox"
    sampling = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    [result] = engine.generate(prompt, sampling)
    events = list(engine.stream(prompt, sampling))
    assert [e.index for e in events] == list(range(len(result.token_ids)))
    assert [e.token_id for e in events] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert all(e.finish_reason is None for e in events[:-1])
    assert result.usage.generated_tokens == 15


def test_stop_string_truncates_text_and_stream_agrees(engine):
    prompt = "Once upon a time"
    [free] = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop = free.text[8:11]
    assert len(stop.strip()) > 0
    sampling = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,))
    [stopped] = engine.generate(prompt, sampling)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == free.text[:free.text.index(stop)]
    assert "".join(e.text for e in engine.stream(prompt, sampling)) == stopped.text


def test_stop_token_id_and_eos_finish_with_stop(engine):
    [free] = engine.generate("Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    stop_id = free.token_ids[4]
    [stopped] = engine.generate("Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                        stop_token_ids=(stop_id,)))
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    [a] = engine.generate("Tell me a story", sampling)
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    batch = engine.generate(["Tell me a story", "x y z", "abc", "12345"], [sampling] + others)
    assert batch[0].token_ids == a.token_ids
    [b] = engine.generate("Tell me a story", sampling.model_copy(update={"seed": 99}))
    assert b.token_ids != a.token_ids


@pytest.mark.parametrize("resume_at", [1, 7])
def test_a_resumed_seeded_request_draws_what_the_uninterrupted_run_drew(engine, resume_at):
    prompt = engine.tokenizer.encode("Resume me with a seed")
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=777, max_tokens=16, ignore_eos=True)
    [whole] = engine.generate(as_token_prompt(prompt), sampling)
    llm, finished = engine.llm, []
    llm.add_request("seeded-resume", prompt, sampling, resume_token_ids=whole.token_ids[:resume_at])
    while llm.has_unfinished():
        finished += llm.step().finished
    assert finished[0].token_ids == whole.token_ids


def test_chat_prompt_uses_the_template(engine):
    messages = [{"role": "user", "content": "hi"}]
    [result] = engine.generate(messages, SamplingParams(temperature=0, max_tokens=3))
    assert result.usage.prompt_tokens == len(engine.tokenizer.encode_chat(messages))


def test_results_report_usage_and_timings(engine):
    [r] = engine.generate("abc", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert r.usage.generated_tokens == len(r.token_ids) == 5
    assert 0 <= r.timings.queue_s <= r.timings.time_to_first_token_s <= r.timings.total_s


# -- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", [], {"prompt_token_ids": []}])
def test_empty_prompt_is_refused(engine, prompt):
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate(prompt, GREEDY)


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="context is 256 tokens"):
        engine.generate(as_token_prompt([5] * 256), GREEDY)


def test_token_ids_outside_vocab_are_refused(engine):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.generate(as_token_prompt([5, 10**6]), GREEDY)


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"max_tokens": -3}, {"temperature": math.nan}, {"temperature": -0.5},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"seed": -1}, {"stop": ("",)}, {"unknown": 1},
])
def test_bad_sampling_parameters_are_refused(engine, bad):
    with pytest.raises(ValidationError):
        engine.generate("hello", bad)


def test_bad_input_leaves_nothing_behind(engine):
    with pytest.raises(InvalidRequestError):
        engine.generate(["fine", ""], GREEDY)
    assert not engine.llm.has_unfinished()
    with pytest.raises(InvalidRequestError, match="2 sampling parameter sets for 3 prompts"):
        engine.generate(["a", "b", "c"], [GREEDY, GREEDY])


def test_unknown_model_path_is_refused():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        Engine("/no/such/model")


def test_unknown_engine_option_is_refused(tiny_llama_dir):
    with pytest.raises(ValidationError, match="kv_cache_size"):
        Engine(str(tiny_llama_dir), kv_cache_size=3)


def test_tp_that_does_not_split_heads_names_valid_values(tiny_qwen2_dir):
    with pytest.raises(InvalidConfigError, match="valid tp values: 1, 2, 6"):
        Engine(str(tiny_qwen2_dir), tp=4)


def test_smollm2_shaped_config_lists_1_3_9():
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                                    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                    "num_attention_heads": 9, "num_key_value_heads": 3})
    with pytest.raises(InvalidConfigError, match=r"tp=2 .* valid tp values: 1, 3, 9"):
        config.check_tp(2)


def test_bfloat16_engine_agrees_with_float32_on_first_tokens(tiny_llama_dir, reference):
    """bf16 runs both GEMM paths (one-token decodes, multi-token prefills); argmax survives the rounding."""
    prompts = [as_token_prompt(p) for p in random_prompts(6, [9, 17, 30], seed=8)]
    sampling = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = [r.token_ids[0] for r in reference.generate(prompts, sampling)]
    with Engine(str(tiny_llama_dir), dtype="bfloat16", block_size=BLOCK) as bf16:
        results = bf16.generate(prompts, sampling)
    assert [r.token_ids[0] for r in results] == expected
    assert all(len(r.token_ids) == 4 for r in results)


def test_resume_continues_at_the_next_index_without_gap_or_duplicate(engine):
    """A requeued request re-prefills prompt + streamed tokens and continues where the stream stopped;
    the text stage rebuilds the text already sent, so the deltas continue it."""
    prompt = engine.tokenizer.encode("Resume me, please: the story continues")
    sampling = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=("zzzz",))
    first_run = list(engine.stream(as_token_prompt(prompt), sampling))
    sent_before_crash = first_run[:8]
    resumed = [e.token_id for e in sent_before_crash]
    llm, texts, events, finished = engine.llm, TextStage(engine.tokenizer, engine.llm.eos_token_ids), [], []
    llm.add_request("resumed", prompt, sampling, resume_token_ids=resumed)
    texts.add("resumed", prompt, sampling, resume_token_ids=resumed)
    while llm.has_unfinished():
        output = llm.step()
        text = texts.process(output.tokens, output.finished)
        events += text.events
        finished += text.finished
    [result] = finished
    assert [e.index for e in events] == list(range(8, 20))
    assert result.token_ids == [e.token_id for e in first_run]
    full_text = "".join(e.text for e in first_run)
    assert "".join(e.text for e in sent_before_crash) + "".join(e.text for e in events) == full_text
    assert result.text == full_text


def test_resume_of_a_finished_request_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="already finished"):
        engine.llm.add_request("done", [5, 6, 7], SamplingParams(max_tokens=3), resume_token_ids=[8, 9, 10])


def test_a_stop_string_across_tokens_ends_the_text_events_and_tokens_before_it(engine):
    prompt = "Once upon a time"
    free_sampling = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    free = list(engine.stream(prompt, free_sampling))
    stop, k = spanning_stop([e.text for e in free])
    full = "".join(e.text for e in free)
    sampling = free_sampling.model_copy(update={"stop": (stop,)})
    events = list(engine.stream(prompt, sampling))
    [result] = engine.generate(prompt, sampling)
    assert result.finish_reason is FinishReason.STOP and events[-1].finish_reason is FinishReason.STOP
    assert result.text == "".join(e.text for e in events) == full[:full.index(stop)]
    assert [e.token_id for e in events] == result.token_ids == [e.token_id for e in free[:k + 2]]
    assert result.usage.generated_tokens == k + 2
