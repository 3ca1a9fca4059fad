"""The client commands against a running stack: tpq batch (resumable), tpq generate, tpq status."""
from __future__ import annotations

import json

import pytest
import redis

from common import keys
from common.errors import InvalidRequestError
from producer.cli import batch as batch_cli
from producer.cli import generate as generate_cli
from producer.cli import status as status_cli


def write_jsonl(path, items) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def test_batch_input_errors_name_the_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"prompt": \n')
    with pytest.raises(InvalidRequestError, match=r"in.jsonl:3: not JSON"):
        batch_cli.read_requests(path)
    write_jsonl(path, [{"prompt": "fine"}, {"prompt": "x", "sampling": {"temperature": -1}}])
    with pytest.raises(InvalidRequestError, match=r"in.jsonl:2: .*temperature"):
        batch_cli.read_requests(path)
    write_jsonl(path, [{"prompt": "fine"}, ["not", "an", "object"]])
    with pytest.raises(InvalidRequestError, match=r"in.jsonl:2: a request must be a JSON object"):
        batch_cli.read_requests(path)


def test_batch_ids_are_stable_per_file_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"prompt": "a"}, {"prompt": "b", "request_id": "mine"}])
    first = [r["request_id"] for r in batch_cli.read_requests(path)]
    assert first == [r["request_id"] for r in batch_cli.read_requests(path)]
    assert first[1] == "mine" and first[0].endswith("-1")
    write_jsonl(path, [{"prompt": "changed"}, {"prompt": "b", "request_id": "mine"}])
    assert batch_cli.read_requests(path)[0]["request_id"] != first[0]


def test_batch_generate_and_status_against_a_stack(start_stack, redis_url, tiny_llama_dir, tmp_path, capsys):
    start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"prompt": f"line {i}", "sampling": {"max_tokens": 5, "temperature": 0}} for i in range(10)])

    assert batch_cli.main([str(source), "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 10 and all(line["finish_reason"] in ("stop", "length") for line in lines)
    jobs_before = len(list(conn.scan_iter(match=keys.RQ_JOB_PREFIX + "*")))

    kept = lines[:7]  # as if the command died after writing 7 results
    out.write_text("".join(json.dumps(line) + "\n" for line in kept))
    assert batch_cli.main([str(source), "-o", str(out)]) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["request_id"] for line in again) == sorted(line["request_id"] for line in lines)
    assert {line["request_id"]: line["token_ids"] for line in again} == {line["request_id"]: line["token_ids"] for line in lines}
    assert all(line["attempt"] == 1 for line in again), "a finished job was run again"
    assert len(list(conn.scan_iter(match=keys.RQ_JOB_PREFIX + "*"))) == jobs_before

    capsys.readouterr()
    assert generate_cli.main(["hello there", "--raw", "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "4 tokens" in captured.err or "stop" in captured.err

    assert status_cli.main(["--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    [group] = status["groups"]
    assert group["group"] == "g0" and group["state"] == "up" and group["shards"] == 16
    assert status["jobs"]["finished"] == 11 and status["jobs"]["failed"] == 0
