"""common.settings: defaults, environment overrides, rejected names and values."""
from __future__ import annotations

import math
from pathlib import Path

import platformdirs
import pytest
from pydantic import ValidationError

from common.errors import InvalidConfigError
from common.settings import LogFormat, LogLevel, Settings, get_settings, valid_env_vars


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TPQ_* variable from the outer environment leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("TPQ_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults() -> None:
    s = get_settings()
    assert s.redis_url is None
    assert s.cache_dir is None
    assert s.data_dir == Path(platformdirs.user_data_dir("tpqueue"))
    assert s.model_cache_dir == Path(platformdirs.user_cache_dir("tpqueue"))
    assert s.num_shards == 64
    assert s.result_ttl_s == 24 * 3600
    assert s.failure_ttl_s == 7 * 24 * 3600
    assert s.token_log_maxlen == 8192
    assert s.token_log_ttl_s == 24 * 3600
    assert (s.heartbeat_interval_s, s.heartbeat_ttl_s, s.hang_timeout_s) == (1.0, 5.0, 30.0)
    assert s.max_prompt_chars == 100_000
    assert s.max_tokens_limit == 4096
    assert s.max_batch_size == 10_000
    assert s.max_queue_depth == 10_000
    assert s.job_retries == 3
    assert s.model == "smollm2-135m-instruct"
    assert s.tp == 1
    assert s.log_format is LogFormat.TEXT
    assert s.log_level is LogLevel.INFO


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_env_overrides(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("TPQ_NUM_SHARDS", "8")
    clean_env.setenv("tpq_tp", "2")  # any case
    clean_env.setenv("TPQ_REDIS_URL", "redis://localhost:7777/1")
    clean_env.setenv("TPQ_CACHE_DIR", str(tmp_path))
    clean_env.setenv("TPQ_LOG_FORMAT", "JSON")
    clean_env.setenv("TPQ_HEARTBEAT_INTERVAL_S", "0.25")
    clean_env.setenv("TPQ_HEARTBEAT_TTL_S", "1")
    s = get_settings()
    assert (s.num_shards, s.tp, s.redis_url) == (8, 2, "redis://localhost:7777/1")
    assert s.cache_dir == tmp_path and s.model_cache_dir == tmp_path
    assert s.log_format is LogFormat.JSON
    assert (s.heartbeat_interval_s, s.heartbeat_ttl_s) == (0.25, 1.0)


def test_home_is_expanded_in_paths(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TPQ_CACHE_DIR", "~/models")
    s = get_settings(data_dir="~/redis-data")
    assert s.cache_dir == Path.home() / "models"
    assert s.data_dir == Path.home() / "redis-data"


def test_keyword_overrides_win_over_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TPQ_NUM_SHARDS", "8")
    assert get_settings(num_shards=16).num_shards == 16


def test_empty_env_var_means_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TPQ_CACHE_DIR", "")
    clean_env.setenv("TPQ_REDIS_URL", "")
    s = get_settings()
    assert s.cache_dir is None and s.redis_url is None


def test_unknown_env_var_is_rejected_by_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TPQ_NUM_SHARD", "8")
    with pytest.raises(InvalidConfigError) as info:
        get_settings()
    message = str(info.value)
    assert "TPQ_NUM_SHARD " in message
    assert "did you mean TPQ_NUM_SHARDS?" in message
    for name in valid_env_vars():
        assert name in message
    with pytest.raises(InvalidConfigError, match="TPQ_NUM_SHARD"):
        Settings()  # the check is in Settings itself, not only in get_settings


def test_unknown_env_var_in_lower_case_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("tpq_bogus", "1")
    with pytest.raises(InvalidConfigError, match="tpq_bogus"):
        get_settings()


def test_other_env_vars_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TPQUEUE_SOMETHING", "1")
    clean_env.setenv("REDIS_URL", "redis://elsewhere:1")
    assert get_settings().redis_url is None


def test_unknown_keyword_is_rejected() -> None:
    with pytest.raises(InvalidConfigError, match=r"unknown setting 'num_shard' \(did you mean 'num_shards'\?\)"):
        get_settings(num_shard=8)
    with pytest.raises(ValidationError):
        Settings(num_shard=8)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"num_shards": 0}, "TPQ_NUM_SHARDS"),
        ({"num_shards": 4097}, "TPQ_NUM_SHARDS"),
        ({"num_shards": "many"}, "TPQ_NUM_SHARDS"),
        ({"tp": 0}, "TPQ_TP"),
        ({"job_retries": 0}, "TPQ_JOB_RETRIES"),
        ({"result_ttl_s": 0}, "TPQ_RESULT_TTL_S"),
        ({"failure_ttl_s": -1}, "TPQ_FAILURE_TTL_S"),
        ({"max_prompt_chars": 0}, "TPQ_MAX_PROMPT_CHARS"),
        ({"max_queue_depth": 0}, "TPQ_MAX_QUEUE_DEPTH"),
        ({"max_batch_size": 0}, "TPQ_MAX_BATCH_SIZE"),
        ({"heartbeat_interval_s": 0.0}, "TPQ_HEARTBEAT_INTERVAL_S"),
        ({"hang_timeout_s": math.nan}, "TPQ_HANG_TIMEOUT_S"),
        ({"heartbeat_ttl_s": math.inf}, "TPQ_HEARTBEAT_TTL_S"),
        ({"log_format": "xml"}, "TPQ_LOG_FORMAT"),
        ({"log_level": "LOUD"}, "TPQ_LOG_LEVEL"),
        ({"model": ""}, "TPQ_MODEL"),
        ({"redis_url": "http://localhost:6379"}, "unsupported scheme"),
        ({"heartbeat_interval_s": 2.0, "heartbeat_ttl_s": 3.0}, "at least twice heartbeat_interval_s"),
        ({"hang_timeout_s": 1.0}, "hang_timeout_s (1.0) must exceed heartbeat_interval_s"),
        ({"max_tokens_limit": 8192}, "token_log_maxlen (8192) must exceed max_tokens_limit (8192)"),
    ],
)
def test_bad_values_are_rejected(overrides: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        get_settings(**overrides)
    assert fragment in str(info.value)


def test_bad_env_value_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TPQ_MAX_TOKENS_LIMIT", "lots")
    with pytest.raises(InvalidConfigError, match="TPQ_MAX_TOKENS_LIMIT"):
        get_settings()


def test_several_bad_values_are_all_reported() -> None:
    with pytest.raises(InvalidConfigError) as info:
        get_settings(num_shards=0, tp=0)
    assert "TPQ_NUM_SHARDS" in str(info.value) and "TPQ_TP" in str(info.value)


def test_redis_password_never_shows(clean_env: pytest.MonkeyPatch) -> None:
    s = get_settings(redis_url="redis://alice:hunter2secret@db.example:6379/0")
    assert s.redis_url == "redis://alice:hunter2secret@db.example:6379/0"
    assert "hunter2secret" not in repr(s) and "hunter2secret" not in str(s)
    assert "alice:***@db.example" in repr(s)
    clean_env.setenv("TPQ_REDIS_URL", "redis://:hunter2secret@db.example:notaport")
    with pytest.raises(InvalidConfigError) as info:
        get_settings()
    assert "hunter2secret" not in str(info.value)
    assert "hunter2secret" not in repr(info.value.__cause__)
    assert "hunter2secret" not in str(info.value.__cause__)


def test_settings_are_immutable() -> None:
    s = get_settings()
    with pytest.raises(ValidationError):
        s.num_shards = 3  # type: ignore[misc]
