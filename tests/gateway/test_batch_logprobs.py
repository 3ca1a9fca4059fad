"""Logprobs and echo in HTTP batch lines: each output line's body is what the endpoint itself answers.

The setting of tests/gateway/test_http_logprobs.py (a registered group, its
vocabulary published, LogprobWorker writing every logprob), a real uvicorn
gateway and redis-server, the real ``openai`` SDK.
"""
from __future__ import annotations

import io
import json

import openai

from tests.gateway.conftest import FAKE_MODEL, register_fake_group, wait_for
from tests.gateway.test_http_logprobs import MESSAGES, PROMPT_IDS, TEXTS, lp, sdk, served, worker  # noqa: F401

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def batch_of(client: openai.OpenAI, endpoint: str, bodies: list[dict]):
    items = [{"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body} for i, body in enumerate(bodies)]
    content = "".join(json.dumps(item) + "\n" for item in items).encode()
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch").id
    return client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")


def finished(client: openai.OpenAI, batch_id: str):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in ("completed", "failed") and b,
                    f"batch {batch_id} to finish")


def bodies_of(client: openai.OpenAI, file_id: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    return {line["custom_id"]: line["response"]["body"] for line in lines}


def without_ids(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def test_batch_lines_with_logprobs_and_echo_answer_as_the_endpoints_do(served, worker):  # noqa: F811
    client = sdk(served())
    chat = {"model": FAKE_MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2}
    texts = [{"model": FAKE_MODEL, "prompt": "Say hi", "echo": True, "logprobs": 1, "max_tokens": 4},
             {"model": FAKE_MODEL, "prompt": PROMPT_IDS, "echo": True, "max_tokens": 4},  # echoed by the vocabulary
             {"model": FAKE_MODEL, "prompt": "Say hi", "echo": True, "logprobs": 1, "max_tokens": 0}]
    thread = worker.run_in_thread(TEXTS, count=2 * (1 + len(texts)))
    chat_batch, text_batch = batch_of(client, CHAT, [chat]), batch_of(client, TEXT, texts)
    chat_done, text_done = finished(client, chat_batch.id), finished(client, text_batch.id)
    direct_chat = client.chat.completions.create(**chat).model_dump(exclude_unset=True)
    direct_texts = [client.completions.create(**body).model_dump(exclude_unset=True) for body in texts]
    thread.join(timeout=30)
    assert worker.errors == []
    assert (chat_done.status, text_done.status, text_done.request_counts.completed) == ("completed", "completed", 3)

    [chat_body] = bodies_of(client, chat_done.output_file_id).values()
    assert [c["logprob"] for c in chat_body["choices"][0]["logprobs"]["content"]] == [lp(i) for i in (100, 101, 102,
                                                                                                    103)]
    assert without_ids(chat_body) == without_ids(direct_chat)
    text_bodies = bodies_of(client, text_done.output_file_id)
    assert text_bodies["c0"]["choices"][0]["text"] == "Say hiHelloé!"
    assert text_bodies["c0"]["choices"][0]["logprobs"]["text_offset"] == [0, 3, 6, 9, 11, 11]
    assert text_bodies["c1"]["choices"][0]["text"] == "Say hiHelloé!"
    assert text_bodies["c2"]["choices"][0]["text"] == "Say hi" and text_bodies["c2"]["usage"]["completion_tokens"] == 0
    for i, direct in enumerate(direct_texts):
        assert without_ids(text_bodies[f"c{i}"]) == without_ids(direct), i


def test_a_logprobs_line_of_a_model_without_a_vocabulary_fails_the_batch_before_anything_runs(start_gateway,
                                                                                              redis_url):
    register_fake_group(redis_url, model="no-vocab", group="gw-novocab")
    client = sdk(start_gateway().url)
    plain = {"model": "no-vocab", "messages": MESSAGES}
    batch = batch_of(client, CHAT, [plain, {**plain, "logprobs": True}, plain])
    assert batch.status == "failed"
    [error] = batch.errors.data
    assert (error.line, error.code, error.param) == (2, "vocabulary_unavailable", "body.logprobs")
    assert "no vocabulary of no-vocab is published" in error.message
