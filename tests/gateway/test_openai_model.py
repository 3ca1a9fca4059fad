"""The gateway in front of a real worker group (the tiny random Llama), spoken to by the real ``openai`` SDK.

Greedy answers must be the offline ``Engine``'s for the same model and
prompts, token for token: through the sync and the asyncio SDK, streamed
and not, for chat and completions; the usage must count the engine's
tokens; and a stream dropped mid-way and resumed with ``Last-Event-ID``
must give the same text, every token once.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from common.sampling import SamplingParams
from tests.gateway.sse import content_of, sse_events

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
CHAT = [{"role": "user", "content": "What is a queue?"}]
PROMPTS = ["hello world", "Once upon a time"]


@pytest.fixture
def served(start_stack, start_gateway, tiny_llama_dir):
    """``(sdk base URL, model id)`` of a gateway in front of one group of the tiny model."""
    start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    server = start_gateway()
    [model] = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused").models.list().data
    return f"{server.url}/v1", model.id


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    """The offline engine's greedy results: the chat first, then each prompt."""
    from gpu_worker.llm import Engine

    with Engine(str(tiny_llama_dir), tp=1) as engine:
        return engine.generate([CHAT, *PROMPTS], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))


def joined(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_sync_sdk_answers_as_the_engine_does(served, offline):
    base_url, model = served
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    chat, *texts = offline
    answer = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == chat.text
    assert answer.usage.prompt_tokens == chat.usage.prompt_tokens
    assert answer.usage.completion_tokens == len(chat.token_ids)
    assert answer.usage.total_tokens == chat.usage.prompt_tokens + len(chat.token_ids)

    chunks = list(client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    assert joined(chunks) == chat.text
    assert chunks[-1].usage.completion_tokens == len(chat.token_ids)

    completion = client.completions.create(model=model, prompt=PROMPTS, temperature=0, max_tokens=MAX_TOKENS)
    assert [c.text for c in completion.choices] == [t.text for t in texts]
    assert completion.usage.prompt_tokens == sum(t.usage.prompt_tokens for t in texts)
    assert completion.usage.completion_tokens == sum(len(t.token_ids) for t in texts)
    streamed = {}
    for c in client.completions.create(model=model, prompt=PROMPTS, temperature=0, max_tokens=MAX_TOKENS,
                                       stream=True):
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {i: t.text for i, t in enumerate(texts)}


def test_async_sdk_answers_as_the_engine_does(served, offline):
    base_url, model = served
    chat, first, _ = offline

    async def go() -> None:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                                          max_tokens=MAX_TOKENS, stream=True)
            assert joined([c async for c in stream]) == chat.text
            completion = await client.completions.create(model=model, prompt=PROMPTS[0], temperature=0,
                                                         max_tokens=MAX_TOKENS)
            assert completion.choices[0].text == first.text

    asyncio.run(go())


def test_a_dropped_stream_resumes_with_the_engines_text(served, offline):
    base_url, model = served
    chat = offline[0]
    body = {"model": model, "messages": CHAT, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        with http.stream("POST", "chat/completions", json=body) as response:
            seen = []
            for event in sse_events(response.iter_lines()):
                seen.append(event)
                if sum(1 for e in seen if content_of(e)) == 2:
                    break
        cid = json.loads(seen[0]["data"])["id"]
        with http.stream("GET", f"chat/completions/{cid}/stream", headers={"Last-Event-ID": seen[-1]["id"]}) as rest:
            resumed = list(sse_events(rest.iter_lines()))
    assert resumed[-1]["data"] == "[DONE]"
    text = "".join(content_of(e) or "" for e in seen + resumed[:-1])
    assert text == chat.text
