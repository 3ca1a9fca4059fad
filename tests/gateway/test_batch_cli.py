"""``tpq batch`` on OpenAI Batch API files: the same lines and output format as the gateway's batches.

A real redis-server; tests.doubles.ProtocolWorker plays the group (each job
answers ``answer to <job id>``), so every output line is checked against
the job it came from.
"""
from __future__ import annotations

import json

import pytest
import redis

from common import keys
from producer.cli import batch as batch_cli
from tests.gateway.test_batch_api import CHAT, answer_of, chat_line, jsonl, serve


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_lines_run_into_openai_output_lines_and_resume(tmp_path, monkeypatch, redis_url, worker):
    monkeypatch.setenv("TPQ_REDIS_URL", redis_url)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    text_line = {"custom_id": "t", "method": "POST", "url": CHAT,
                 "body": {"model": "any", "messages": [{"role": "user", "content": "x"}], "n": 2}}
    source.write_bytes(jsonl([chat_line("a"), chat_line("b", max_tokens=4), text_line]))
    thread = serve(worker, 4, fail=lambda job_id: job_id.endswith("-2"))
    assert batch_cli.main([str(source), "-o", str(out)]) == 1  # one line failed
    thread.join(timeout=30)
    assert worker.errors == []
    lines = {line["custom_id"]: line for line in read(out)}
    assert set(lines) == {"a", "b", "t"}
    a, b, t = lines["a"]["response"], lines["b"]["response"], lines["t"]["response"]
    assert a["status_code"] == 200 and a["body"]["object"] == "chat.completion"
    assert a["body"]["choices"][0]["message"]["content"] == answer_of(a["request_id"])
    assert b["status_code"] == 500 and "boom" in b["body"]["error"]["message"]
    assert [c["message"]["content"] for c in t["body"]["choices"]] == [answer_of(t["request_id"] + "-0"),
                                                                      answer_of(t["request_id"] + "-1")]
    conn = redis.Redis.from_url(redis_url)
    assert all(conn.hget(keys.rq_job_key(r.id), "origin") == b"batch" for r in worker.served)

    kept = [lines["a"], lines["t"]]  # as if the command died after two lines: only "b" runs again
    out.write_text("".join(json.dumps(line) + "\n" for line in kept))
    assert batch_cli.main([str(source), "-o", str(out), "--timeout-s", "20"]) == 1  # "b" is collected
    assert sorted(line["custom_id"] for line in read(out)) == ["a", "b", "t"]
    assert len(worker.served) == 3  # nothing ran again (the failed job is not counted as served)
    assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0


def test_bad_openai_lines_are_all_named_before_anything_runs(tmp_path, monkeypatch, redis_url, capsys):
    monkeypatch.setenv("TPQ_REDIS_URL", redis_url)
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([chat_line("a"), chat_line("a"), {**chat_line("c"), "url": "/v1/embeddings"},
                              chat_line("s", stream=True)]))
    assert batch_cli.main([str(source), "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "3 bad lines" in err and all(f"in.jsonl:{n}:" in err for n in (2, 3, 4))
    assert redis.Redis.from_url(redis_url).llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("first, expected", [(chat_line("a"), True), ({"prompt": "x"}, False), ("not json", False)])
def test_the_format_is_told_by_the_first_line(tmp_path, first, expected):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n" + jsonl([first]))
    assert batch_cli.is_openai_file(path) is expected
