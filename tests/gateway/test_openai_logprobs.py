"""Logprobs, echo and token-id prompts through the real ``openai`` SDK, a real gateway and a real group.

The group serves the tiny random Llama (fp32); every logprob the SDK
receives must be transformers' log-softmax of the same sequence within
1e-4, for sampled tokens and (with echo) the prompt's, and each token's
``bytes`` / name must be that id's bytes in the model's vocabulary (which
the group published for the gateway). The token ids of each answer come
from its job's rq result, read with the Python client.
"""
from __future__ import annotations

import openai
import pytest
import torch

from gpu_worker.models.tokenizer import Tokenizer
from producer import Client
from tests.checkpoints import hf_reference_logprobs
from tests.parity import LOGPROB_TOLERANCE

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is a queue?"}]
PROMPT = "Once upon a time"
MAX_TOKENS = 6
TOP = 3


@pytest.fixture
def served(start_stack, start_gateway, tiny_llama_dir, redis_url):
    """``(openai client, model id, python client)`` of a gateway in front of one group of the tiny model."""
    start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    server = start_gateway()
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    [model] = sdk.models.list().data
    with Client(redis_url) as client:
        yield sdk, model.id, client


@pytest.fixture(scope="module")
def tok(tiny_llama_dir) -> Tokenizer:
    return Tokenizer(tiny_llama_dir)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= LOGPROB_TOLERANCE


def assert_named(tok: Tokenizer, token_id: int, name: str, raw: list[int] | None = None) -> None:
    """``name`` (and ``raw``, chat's ``bytes``) are how the gateway names ``token_id``."""
    data = tok.token_bytes(token_id)
    assert raw is None or bytes(raw) == data
    try:
        assert name == data.decode("utf-8")
    except UnicodeDecodeError:
        assert name == "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def assert_row_matches(tok: Tokenizer, row: torch.Tensor, token_id: int, logprob: float,
                       top: list[tuple[str, float, list[int] | None]]) -> None:
    """A position's logprob and its alternatives (most likely first) are transformers' ``row``."""
    assert close(logprob, row[token_id].item()), (logprob, row[token_id].item())
    reference = torch.topk(row, len(top))
    assert [v for _, v, _ in top] == sorted((v for _, v, _ in top), reverse=True)
    for (name, value, raw), ref_id, ref_value in zip(top, reference.indices.tolist(), reference.values.tolist()):
        assert close(value, ref_value)
        assert_named(tok, ref_id, name, raw)


def test_chat_logprobs_are_transformers_streamed_and_not(served, tok, tiny_llama_dir):
    sdk, model, client = served
    options = {"model": model, "messages": CHAT, "temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": True,
               "top_logprobs": TOP, "extra_body": {"ignore_eos": True}}
    answer = sdk.chat.completions.create(**options)
    generated = client.job(answer.id).result(timeout=60).token_ids
    prompt = tok.encode_chat(CHAT)
    assert answer.usage.prompt_tokens == len(prompt) and len(generated) == MAX_TOKENS
    reference = hf_reference_logprobs(tiny_llama_dir, prompt + generated)  # row i: the distribution of token i + 1
    content = answer.choices[0].logprobs.content
    assert len(content) == MAX_TOKENS
    for i, (entry, token_id) in enumerate(zip(content, generated)):
        assert_named(tok, token_id, entry.token, entry.bytes)
        assert_row_matches(tok, reference[len(prompt) - 1 + i], token_id, entry.logprob,
                           [(t.token, t.logprob, t.bytes) for t in entry.top_logprobs])

    chunks = list(sdk.chat.completions.create(**options, stream=True))
    streamed = [e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [e.model_dump() for e in content]  # the same job run again: the same greedy tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content


def test_completions_echo_logprobs_and_token_id_prompts_are_transformers(served, tok, tiny_llama_dir):
    sdk, model, client = served
    prompt = tok.encode(PROMPT)
    options = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": TOP, "echo": True,
               "extra_body": {"ignore_eos": True}}
    answer = sdk.completions.create(prompt=PROMPT, **options)
    generated = client.job(answer.id).result(timeout=60).token_ids
    ids = prompt + generated
    reference = hf_reference_logprobs(tiny_llama_dir, ids)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(logprobs.tokens) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing precedes it
    for i in range(1, len(ids)):
        assert_named(tok, ids[i], logprobs.tokens[i])
        top = sorted(((name, value, None) for name, value in logprobs.top_logprobs[i].items()), key=lambda t: -t[1])
        chosen = reference[i - 1][ids[i]].item()
        assert close(logprobs.top_logprobs[i][logprobs.tokens[i]], chosen)
        if len(top) > TOP:  # the chosen token was not among the TOP most likely: it is the extra entry
            top = [t for t in top if t[0] != logprobs.tokens[i]]
        assert_row_matches(tok, reference[i - 1], ids[i], logprobs.token_logprobs[i], top)
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):
        if not token.startswith("bytes:"):
            assert choice.text[offset:].startswith(token)

    stream = list(sdk.completions.create(prompt=PROMPT, stream=True, **options))
    assert stream[0].choices[0].text == PROMPT  # the first chunk is the prompt
    joined = {name: sum((getattr(c.choices[0].logprobs, name) for c in stream if c.choices[0].logprobs), [])
              for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == logprobs.model_dump()
    assert "".join(c.choices[0].text for c in stream) == choice.text

    by_ids = sdk.completions.create(prompt=prompt, **options)  # the same prompt as token ids
    assert by_ids.choices[0].text == choice.text and by_ids.choices[0].logprobs.tokens == logprobs.tokens

    scored = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lm_eval = scored.choices[0].logprobs  # what lm-eval's loglikelihood reads: from the context length on
    assert len(lm_eval.tokens) == len(prompt) + 1 and lm_eval.token_logprobs[0] is None
    assert all(close(a, b) for a, b in zip(lm_eval.token_logprobs[1:len(prompt)], logprobs.token_logprobs[1:]))
    assert all(len(top) <= 2 and token in top for token, top in zip(lm_eval.tokens[1:], lm_eval.top_logprobs[1:]))
    only = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert only.choices[0].text == PROMPT and only.choices[0].logprobs.tokens == lm_eval.tokens[:len(prompt)]
    assert only.usage.completion_tokens == 0
