"""The Batch API over real HTTP: uvicorn, a real redis-server, the real ``openai`` SDK, jobs played by ProtocolWorker.

Each job is answered with a text naming its own id (``answer to <job id>``),
so every output line can be checked against the job it came from.
"""
from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Callable

import httpx
import openai
import pytest
import redis

from common import keys
from common.results import FinishReason
from gpu_worker.serve.vocab_publish import vocabulary_fields
from producer.gateway import files
from tests.doubles import ProtocolWorker
from tests.gateway.conftest import FAKE_MODEL, register_fake_group, wait_for

CHAT = "/v1/chat/completions"


def chat_line(custom_id: str, content: str = "hi", **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": FAKE_MODEL, "messages": [{"role": "user", "content": content}], **body}}


def jsonl(items: list[dict | str]) -> bytes:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items).encode()


def upload(client: openai.OpenAI, items: list[dict | str]) -> str:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl(items))), purpose="batch").id


def answer_of(job_id: str) -> str:
    return f"answer to {job_id}"


def serve(worker: ProtocolWorker, count: int, fail: Callable[[str], bool] = lambda _id: False) -> threading.Thread:
    """Serve ``count`` batch jobs on a thread: each says ``answer to <its id>`` (or fails, when ``fail(id)``)."""

    def run() -> None:
        try:
            for _ in range(count):
                running = worker.take(timeout=30)
                if fail(running.id):
                    worker.fail(running, "boom: the model fell over")
                    continue
                worker.emit(running, [answer_of(running.id)])
                worker.succeed(running, FinishReason.STOP)
                worker.served.append(running)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            worker.errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_status(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float = 30.0):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in statuses and b,
                    f"batch {batch_id} to reach {statuses}", timeout_s)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


# ------------------------------------------------------------------ files


def test_files_upload_retrieve_list_content_delete(sdk):
    client = sdk()
    items = [chat_line("a"), chat_line("b")]
    created = client.files.create(file=("mine.jsonl", io.BytesIO(jsonl(items))), purpose="batch")
    assert (created.object, created.purpose, created.filename, created.bytes) == ("file", "batch", "mine.jsonl",
                                                                                  len(jsonl(items)))
    assert client.files.retrieve(created.id).bytes == created.bytes
    assert client.files.content(created.id).content == jsonl(items)
    second = upload(client, items)
    listed = client.files.list()
    assert [f.id for f in listed.data][:2] == [second, created.id]  # newest first
    first_page = client.files.list(limit=1)
    assert [f.id for f in first_page.data] == [second] and first_page.has_more
    assert [f.id for f in client.files.list(limit=1, after=second).data] == [created.id]
    deleted = client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")


def test_a_file_over_the_bound_is_413(sdk):
    client = sdk(http_max_file_bytes=2048)
    with pytest.raises(openai.APIStatusError) as small_over:  # read past the bound
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 3000)), purpose="batch")
    with pytest.raises(openai.APIStatusError) as declared:  # refused by its Content-Length before it is read
        client.files.create(file=("huge.jsonl", io.BytesIO(b"x" * 200_000)), purpose="batch")
    for raised in (small_over, declared):
        assert raised.value.status_code == 413 and raised.value.code == "file_too_large"
    assert client.files.list().data == []
    assert client.files.create(file=("ok.jsonl", io.BytesIO(jsonl([chat_line("a")]))), purpose="batch").bytes > 0


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the HTTP/1.1 response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), f"the connection closed before a response: {data!r}"
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def test_a_chunked_upload_over_the_bound_is_refused_as_soon_as_it_passes_it(gateway):
    limit, slack = 2048, files.MULTIPART_SLACK_BYTES
    url = httpx.URL(gateway(http_max_file_bytes=limit))
    host, port = url.host, url.port
    boundary = "tpqboundary"
    opening = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
        sent = 0
        for part in [opening] + [b"x" * 16384] * ((limit + slack) // 16384 + 1):  # just past the bound, then no more
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            sent += len(part)
        assert sent > limit + slack
        status, body = read_response(sock)  # while the body is not over: no last chunk was sent
    assert status == 413 and body["error"]["code"] == "file_too_large", body
    assert "upload is" in body["error"]["message"]


# ------------------------------------------------------------------ batches


def test_a_batch_runs_to_completed_with_every_line_its_own_jobs_answer(sdk, worker, redis_url):
    client = sdk()
    items = [chat_line(f"req-{i}", f"question {i}") for i in range(4)]
    items.append(chat_line("two-choices", n=2, seed=7))
    file_id = upload(client, items)
    thread = serve(worker, 6)
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                  metadata={"run": "t1"})
    assert batch.status == "in_progress" and batch.request_counts.total == 5 and batch.metadata == {"run": "t1"}
    done = wait_status(client, batch.id, {"completed"})
    thread.join(timeout=30)
    assert worker.errors == []
    assert done.request_counts.completed == 5 and done.request_counts.failed == 0 and done.error_file_id is None
    assert done.completed_at and done.finalizing_at and done.in_progress_at
    out = {line["custom_id"]: line for line in lines_of(client, done.output_file_id)}
    assert set(out) == {f"req-{i}" for i in range(4)} | {"two-choices"}
    conn = redis.Redis.from_url(redis_url)
    for number, item in enumerate(items, start=1):
        line = out[item["custom_id"]]
        response, job_id = line["response"], f"{batch.id}-{number}"
        assert line["error"] is None and response["status_code"] == 200 and response["request_id"] == job_id
        body = response["body"]
        assert body["object"] == "chat.completion" and body["id"] == job_id and body["model"] == FAKE_MODEL
        job_ids = [job_id] if number < 5 else [f"{job_id}-0", f"{job_id}-1"]
        assert [c["message"]["content"] for c in body["choices"]] == [answer_of(j) for j in job_ids]
        assert all(conn.hget(keys.rq_job_key(j), "origin") == b"batch" for j in job_ids)  # batch priority
    assert len({line["id"] for line in out.values()}) == 5
    assert sorted(r.id for r in worker.served) == sorted(
        [f"{batch.id}-{n}" for n in range(1, 5)] + [f"{batch.id}-5-0", f"{batch.id}-5-1"])
    assert conn.scard(keys.api_batches_open()) == 0 and not conn.exists(keys.api_batch_output(batch.id))
    assert [b.id for b in client.batches.list().data] == [batch.id]


def test_failed_jobs_become_error_file_lines(sdk, worker):
    client = sdk()
    file_id = upload(client, [chat_line("good"), chat_line("bad")])
    thread = serve(worker, 2, fail=lambda job_id: job_id.endswith("-2"))
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    done = wait_status(client, batch.id, {"completed"})
    thread.join(timeout=30)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [good] = lines_of(client, done.output_file_id)
    [bad] = lines_of(client, done.error_file_id)
    assert good["custom_id"] == "good" and good["response"]["body"]["choices"][0]["message"]["content"] == \
        answer_of(f"{batch.id}-1")
    assert bad["custom_id"] == "bad" and bad["response"]["status_code"] == 500
    assert "boom" in bad["response"]["body"]["error"]["message"]


def test_validation_failures_fail_the_batch_per_line_and_enqueue_nothing(sdk, redis_url):
    client = sdk()
    items: list[dict | str] = [
        chat_line("ok"),
        "{not json",
        {"method": "POST", "url": CHAT, "body": {"model": FAKE_MODEL, "messages": []}},
        chat_line("ok"),
        {**chat_line("wrong-url"), "url": "/v1/completions"},
        {**chat_line("get"), "method": "GET"},
        chat_line("tools", tools=[{"type": "function"}]),
        {**chat_line("unknown-model"), "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}},
        chat_line("streamed", stream=True),
    ]
    batch = client.batches.create(input_file_id=upload(client, items), endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    got = {(e.line, e.param) for e in batch.errors.data}
    assert got == {(2, None), (3, "custom_id"), (4, "custom_id"), (5, "url"), (6, "method"), (7, "body.tools"),
                   (8, "body.model"), (9, "body.stream")}
    codes = {e.line: e.code for e in batch.errors.data}
    assert codes[4] == "duplicate_custom_id" and codes[8] == "model_not_found" and codes[2] == "invalid_json_line"
    assert all(f"line {e.line}" in e.message for e in batch.errors.data)
    conn = redis.Redis.from_url(redis_url)
    assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0
    assert conn.scard(keys.api_batches_open()) == 0
    assert client.batches.retrieve(batch.id).status == "failed"


VOCAB_SIZE = 100


def text_line(custom_id: str, prompt: object, model: str = FAKE_MODEL) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": 2}}


def test_token_ids_past_the_vocabulary_fail_the_batch_per_line_as_the_endpoint_refuses_them(sdk, redis_url):
    client = sdk()
    with redis.Redis.from_url(redis_url) as conn:
        conn.hset(keys.vocab(FAKE_MODEL), mapping=vocabulary_fields(
            FAKE_MODEL, [f"<{i}>".encode() for i in range(VOCAB_SIZE)], [0]))
    bad_ids, bad_lists = [1, VOCAB_SIZE], [[3], [4, VOCAB_SIZE + 7]]
    items = [text_line("ok", [1, VOCAB_SIZE - 1]), text_line("bad", bad_ids), text_line("bad-lists", bad_lists),
             text_line("text", "hello")]
    batch = client.batches.create(input_file_id=upload(client, items), endpoint="/v1/completions",
                                  completion_window="24h")
    assert batch.status == "failed", batch
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(2, "invalid_value", "body.prompt"),
                                                                    (3, "invalid_value", "body.prompt")]
    for error, prompt in zip(batch.errors.data, (bad_ids, bad_lists)):
        with pytest.raises(openai.BadRequestError) as direct:  # the endpoint's own refusal of the same body
            client.completions.create(model=FAKE_MODEL, prompt=prompt, max_tokens=2)
        assert error.message == f"line {error.line}: {direct.value.body['message']}"
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0, "a refused batch enqueued jobs"


def test_token_ids_of_a_model_without_a_vocabulary_are_left_to_the_worker(start_gateway, redis_url):
    register_fake_group(redis_url, model="no-vocab", group="gw-novocab")
    client = openai.OpenAI(base_url=f"{start_gateway().url}/v1", api_key="unused", max_retries=0)
    items = [text_line("ids", [1, 10 ** 6], model="no-vocab")]
    batch = client.batches.create(input_file_id=upload(client, items), endpoint="/v1/completions",
                                  completion_window="24h")
    assert batch.status == "in_progress" and batch.errors is None, batch
    with redis.Redis.from_url(redis_url) as conn:
        wait_for(lambda: conn.exists(keys.rq_job_key(f"{batch.id}-1")), "the keeper to enqueue the line's job")


def test_bad_create_bodies_and_unknown_ids(sdk):
    client = sdk()
    file_id = upload(client, [chat_line("a")])
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    for call in (client.batches.retrieve, client.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            call("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    base = str(client.base_url).removesuffix("/v1/")
    assert httpx.get(f"{base}/v1/batches/not..an..id").status_code == 404


def test_cancel_keeps_what_finished(sdk, worker, redis_url):
    client = sdk()
    file_id = upload(client, [chat_line(f"c{i}") for i in range(3)])
    thread = serve(worker, 1)
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed == 1, "one finished line")
    thread.join(timeout=30)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_status(client, batch.id, {"cancelled"})
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2) and done.cancelled_at
    [finished] = lines_of(client, done.output_file_id)
    assert finished["response"]["body"]["choices"][0]["message"]["content"] == \
        answer_of(finished["response"]["request_id"])
    unrun = lines_of(client, done.error_file_id)
    assert len(unrun) == 2 and all(line["error"]["code"] == "batch_cancelled" and line["response"] is None
                                   for line in unrun)
    assert {finished["custom_id"]} | {line["custom_id"] for line in unrun} == {"c0", "c1", "c2"}
    conn = redis.Redis.from_url(redis_url)
    assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0  # the queued jobs were cancelled
    with pytest.raises(openai.APIStatusError) as again:
        client.batches.cancel(batch.id)
    assert again.value.status_code == 409


def test_batches_list_pages_newest_first(sdk):
    client = sdk()
    file_id = upload(client, [chat_line("a", tools=[{"type": "function"}])])  # fails at once: nothing runs
    ids = [client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id
           for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more
    assert [b.id for b in client.batches.list(limit=2, after=ids[1]).data] == [ids[0]]
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # the SDK follows the pages (after=)


def test_a_batch_past_its_window_expires_with_what_finished(sdk, worker, redis_url):
    client = sdk()
    thread = serve(worker, 1)
    batch = client.batches.create(input_file_id=upload(client, [chat_line("x"), chat_line("y")]), endpoint=CHAT,
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed == 1, "one finished line")
    thread.join(timeout=30)
    conn = redis.Redis.from_url(redis_url)
    spec = json.loads(conn.hget(keys.api_batch(batch.id), "spec"))
    conn.hset(keys.api_batch(batch.id), "spec", json.dumps({**spec, "expires_at": spec["created_at"] - 1}))
    done = wait_status(client, batch.id, {"expired"})
    assert done.expired_at and (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert len(lines_of(client, done.output_file_id)) == 1
    [late] = lines_of(client, done.error_file_id)
    assert late["error"]["code"] == "batch_expired" and late["response"] is None
    assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0
