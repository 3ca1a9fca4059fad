"""common.keys: key formats, stable sharding, input validation."""
from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import rq.job
from hypothesis import given
from hypothesis import strategies as st
from rq import Queue
from rq.job import Job
from rq.results import Result

from common import keys
from common.errors import InvalidRequestError

REPO_ROOT = Path(__file__).resolve().parents[2]

# 8-byte BLAKE2b digests from coreutils (`printf %s ID | b2sum -l 64`), an
# implementation independent of Python's hashlib.
B2SUM_64 = {
    "session-1": "ae49bd2cd463e7ac",
    "user:42": "d9279b7cb3a5b282",
    "ünïcode-☃": "e9a95be0b417a69e",
    "a": "40f89e395b66422f",
}


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("session_id", sorted(B2SUM_64))
@pytest.mark.parametrize("num_shards", [1, 7, 64, 4096])
def test_shard_matches_blake2b_definition(session_id: str, num_shards: int) -> None:
    expected = int(B2SUM_64[session_id], 16) % num_shards
    assert keys.shard_for_session(session_id, num_shards) == expected


def test_shard_pinned_values() -> None:
    # 0xae49bd2cd463e7ac % 64 == 0x2c, 0xd9279b7cb3a5b282 % 64 == 0x02.
    assert keys.shard_for_session("session-1", 64) == 44
    assert keys.shard_for_session("user:42", 64) == 2


@given(st.text(min_size=1, max_size=200))
def test_shard_is_in_range_and_matches_hashlib(session_id: str) -> None:
    digest = hashlib.blake2b(session_id.encode("utf-8"), digest_size=8).digest()
    shard = keys.shard_for_session(session_id, 64)
    assert 0 <= shard < 64
    assert shard == int.from_bytes(digest, "big") % 64


def test_shard_is_stable_across_processes() -> None:
    ids = [f"sess-{i}" for i in range(200)] + sorted(B2SUM_64)
    here = [keys.shard_for_session(s, 64) for s in ids]
    code = (
        "import json, sys; from common.keys import shard_for_session; "
        "print(json.dumps([shard_for_session(s, 64) for s in json.loads(sys.stdin.read())]))"
    )
    import json

    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
            env=env, cwd=REPO_ROOT, check=True,
        ).stdout
        assert json.loads(out) == here


def test_shard_distribution_is_roughly_uniform() -> None:
    num_shards, per_shard = 64, 1000
    counts = Counter(keys.shard_for_session(f"session-{i}", num_shards) for i in range(num_shards * per_shard))
    assert len(counts) == num_shards
    chi2 = sum((counts[s] - per_shard) ** 2 / per_shard for s in range(num_shards))
    # 63 degrees of freedom: chi2 > 130 has probability below 1e-6 for a uniform hash.
    assert chi2 < 130, chi2
    assert min(counts.values()) > 0.85 * per_shard and max(counts.values()) < 1.15 * per_shard


@pytest.mark.parametrize("bad", [0, -1, 4097, 2.0, True, "64"])
def test_shard_rejects_bad_num_shards(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="num_shards"):
        keys.shard_for_session("s", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "x" * 1025, None, 5, b"bytes"])
def test_shard_rejects_bad_session_ids(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="session id"):
        keys.shard_for_session(bad, 64)  # type: ignore[arg-type]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("good", ["a", "0f3c9a2e-5b1d-4c3e-9f0a-7d2b1e6c4a8f", "job_1-A", "x" * 128])
def test_valid_job_ids_pass_and_rq_accepts_them(good: str) -> None:
    assert keys.validate_job_id(good) == good
    rq.job.validate_job_id(good)


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("", "non-empty"),
        ("x" * 129, "at most 128"),
        ("a b", "' '"),
        ("a:b", "':'"),
        ("a.b", "'.'"),
        ("a*", "'*'"),
        ("job\n", "'\\n'"),
        ("ünï", "'ïü'"),
        (None, "must be a string"),
        (42, "must be a string"),
    ],
)
def test_bad_job_ids_are_rejected_clearly(bad: object, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        keys.validate_job_id(bad)  # type: ignore[arg-type]
    assert "job id" in str(info.value)
    assert fragment in str(info.value)
    with pytest.raises(InvalidRequestError):
        keys.token_channel(bad)  # type: ignore[arg-type]


@given(st.text(alphabet="abcXYZ019_-", min_size=1, max_size=128))
def test_every_valid_job_id_is_valid_for_rq(job_id: str) -> None:
    keys.validate_job_id(job_id)
    rq.job.validate_job_id(job_id)


@pytest.mark.parametrize("bad", ["", "g:1", "g*", "g 1", "x" * 65])
def test_bad_group_names_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="group name"):
        keys.heartbeat(bad, 0)


@pytest.mark.parametrize("bad", [-1, 4096, 1.0, True])
def test_bad_ranks_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="rank"):
        keys.heartbeat("g0", bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- key formats


def test_key_formats() -> None:
    assert keys.shard_queue_name(0) == "gen.0"
    assert keys.shard_queue_name(63) == "gen.63"
    assert keys.BATCH_QUEUE == "batch"
    assert keys.shard_queue_names(3) == ["gen.0", "gen.1", "gen.2"]
    assert keys.token_channel("j1") == "tpq:tokens:j1"
    assert keys.token_log("j1") == "tpq:log:j1"
    assert keys.cancel_flag("j1") == "tpq:cancel:j1"
    assert keys.batch_info("b1") == "tpq:batch:b1"
    assert keys.batch_jobs("b1") == "tpq:batchjobs:b1"
    assert keys.heartbeat("g0", 3) == "tpq:hb:g0:3"
    assert keys.heartbeat_pattern() == "tpq:hb:*"
    assert keys.heartbeat_pattern("g0") == "tpq:hb:g0:*"
    assert keys.group_info("g0") == "tpq:group:g0"
    assert keys.groups_set() == "tpq:groups"
    assert keys.shard_map() == "tpq:shardmap"
    assert keys.shard_map_epoch() == "tpq:shardepoch"
    assert keys.supervisor_lock() == "tpq:lock:supervisor"


def test_rq_key_names_match_rq(fake_redis) -> None:
    assert keys.rq_queue_key("gen.5") == Queue("gen.5", connection=fake_redis).key
    assert keys.rq_queue_key(keys.BATCH_QUEUE) == Queue("batch", connection=fake_redis).key
    assert keys.rq_job_key("j1") == Job.key_for("j1")
    assert keys.rq_result_key("j1") == Result.get_key("j1")


# A sample value for each parameter a key-building function of common.keys takes (by name, else by
# type). A new kind of parameter fails test_every_key_function_can_be_sampled until it gets a sample.
SAMPLE_BY_NAME = {"counter": keys.JOB_COUNTERS[0]}
SAMPLE_BY_TYPE = {"str": "sample0id", "int": 3917, "str | None": "sample0id", "str | bytes": "sample0id"}


def key_functions() -> dict[str, object]:
    """Every public function of common.keys, by name (key builders and validators alike)."""
    return {name: f for name, f in inspect.getmembers(keys, inspect.isfunction)
            if f.__module__ == keys.__name__ and not name.startswith("_")}


def sample_call(function) -> tuple[object, list[object]]:
    """``function`` called with a sample for each required parameter: ``(what it returned, the samples)``."""
    samples = []
    for param in inspect.signature(function).parameters.values():
        if param.default is not inspect.Parameter.empty:
            continue
        if param.name in SAMPLE_BY_NAME:
            samples.append(SAMPLE_BY_NAME[param.name])
        else:
            kind = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
            assert kind in SAMPLE_BY_TYPE, f"no sample for {function.__name__}({param.name}: {kind})"
            samples.append(SAMPLE_BY_TYPE[kind])
    try:
        return function(*samples), samples
    except InvalidRequestError:
        return None, samples  # a validator or parser that refuses the samples: it builds no key


def tpqueue_key_prefixes() -> dict[str, set[str]]:
    """Each key prefix (or whole key) in tpqueue's namespace, with what in common.keys spells it.

    Taken from common.keys itself, so that a new key is covered without editing
    this test: every module-level string constant in the ``tpq:`` namespace,
    and every function that builds a ``tpq:`` key from sample arguments (its
    prefix is the key up to the first argument; a glob pattern counts up to
    its ``*``; a key without arguments is its own prefix).
    """
    prefixes: dict[str, set[str]] = {}
    for name, value in vars(keys).items():
        if name.isupper() and isinstance(value, str) and value.startswith(keys.KEY_PREFIX) and value != keys.KEY_PREFIX:
            prefixes.setdefault(value, set()).add(name)
    for name, function in key_functions().items():
        key, samples = sample_call(function)
        if not (isinstance(key, str) and key.startswith(keys.KEY_PREFIX)):
            continue
        cuts = [key.find(str(s)) for s in samples if str(s) in key] + [key.find("*")]
        prefix = key[:min((c for c in cuts if c >= 0), default=len(key))]
        prefixes.setdefault(prefix, set()).add(f"{name}()")
    return prefixes


def test_every_key_function_can_be_sampled() -> None:
    built = {name: sample_call(f)[0] for name, f in key_functions().items()}
    assert {"token_log", "heartbeat", "groups_set", "claimed_jobs", "job_counter"} <= {
        name for name, key in built.items() if isinstance(key, str) and key.startswith(keys.KEY_PREFIX)}


def test_entity_prefixes_do_not_overlap() -> None:
    prefixes = tpqueue_key_prefixes()
    assert len(prefixes) >= 13, sorted(prefixes)  # the 13 entities of the key table, at least
    for prefix, spelled_by in prefixes.items():
        functions = sorted(s for s in spelled_by if s.endswith("()"))
        assert functions, f"{prefix!r} ({', '.join(sorted(spelled_by))}) is built by no function of common.keys"
        stem = functions[0][:-2]
        assert all(f.startswith(stem) for f in functions), f"{prefix!r} is built by two entities: {functions}"
        for other in prefixes:
            assert other == prefix or not other.startswith(prefix), (
                f"{other!r} ({', '.join(sorted(prefixes[other]))}) starts with the prefix {prefix!r} "
                f"({', '.join(sorted(spelled_by))}): a SCAN of one entity would match the other")


def test_keys_with_arguments_end_their_prefix_with_a_separator() -> None:
    for prefix, spelled_by in tpqueue_key_prefixes().items():
        if any(name.endswith("_PREFIX") for name in spelled_by):
            assert prefix.endswith(":"), f"{prefix!r} ({', '.join(sorted(spelled_by))}) should end with ':'"


def test_queue_names_do_not_overlap() -> None:
    names = [keys.SHARD_QUEUE_PREFIX, keys.BATCH_QUEUE]
    assert not any(a != b and b.startswith(a) for a in names for b in names), names
    assert all(not name.startswith(keys.KEY_PREFIX) for name in names)


def test_shard_queue_name_round_trip() -> None:
    for shard in (0, 1, 63, 4095):
        assert keys.shard_of_queue_name(keys.shard_queue_name(shard)) == shard
    for bad in ("batch", "gen.", "gen.01", "gen.-1", "gen.x", "gen.4096", "gen.١"):
        with pytest.raises(InvalidRequestError):
            keys.shard_of_queue_name(bad)
    with pytest.raises(InvalidRequestError, match="shard"):
        keys.shard_queue_name(-1)


def test_heartbeat_key_round_trip() -> None:
    assert keys.parse_heartbeat_key(keys.heartbeat("group.a-1", 7)) == ("group.a-1", 7)
    assert keys.parse_heartbeat_key(b"tpq:hb:g0:0") == ("g0", 0)
    for bad in ("tpq:hb:g0", "tpq:hb:g0:x", "tpq:group:g0", "tpq:hb::1"):
        with pytest.raises(InvalidRequestError):
            keys.parse_heartbeat_key(bad)
