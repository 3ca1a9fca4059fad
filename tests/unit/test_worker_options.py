"""``tpq up`` takes ``tpq worker``'s engine options and passes on exactly the ones given."""
from __future__ import annotations

import pytest

from common.worker_options import ENGINE_OPTIONS
from gpu_worker.cli.worker import build_parser as worker_parser
from gpu_worker.cli.worker import engine_options
from common.settings import get_settings
from producer.local_stack.up_cli import build_parser as up_parser
from producer.local_stack.up_cli import worker_args


def test_up_passes_on_only_the_engine_options_given():
    args = up_parser().parse_args(["--model", "/models/x", "--kv-cache-gb", "0.5", "--quantization", "int8",
                                   "--no-prefix-caching", "--groups", "2"])
    assert worker_args(args) == ["--model", "/models/x", "--quantization", "int8", "--kv-cache-gb", "0.5",
                                 "--no-prefix-caching"]
    assert worker_args(up_parser().parse_args([])) == []


def test_what_up_passes_on_parses_in_tpq_worker_to_the_same_engine_options():
    given = ["--model", "/models/x", "--dtype", "bfloat16", "--device", "cpu", "--quantization", "int8",
             "--max-num-seqs", "8", "--kv-cache-gb", "0.25", "--kv-cache-dtype", "fp8", "--no-prefix-caching"]
    passed = worker_args(up_parser().parse_args(given))
    options = engine_options(worker_parser().parse_args(passed), get_settings())
    assert options == {"model": "/models/x", "tp": 1, "dtype": "bfloat16", "device": "cpu", "quantization": "int8",
                       "max_num_seqs": 8, "kv_cache_gb": 0.25, "kv_cache_dtype": "fp8",
                       "enable_prefix_caching": False}


def test_every_engine_option_reaches_tpq_up():
    up_flags = {flag for action in up_parser()._actions for flag in action.option_strings}
    assert {flag for flag, _, _ in ENGINE_OPTIONS} <= up_flags


@pytest.mark.parametrize("bad", [["--kv-cache-gb", "0"], ["--max-num-seqs", "0"], ["--quantization", "int3"],
                                 ["--dtype", "float8"]])
def test_a_bad_engine_option_is_refused_by_tpq_up(bad, capsys):
    with pytest.raises(SystemExit):
        up_parser().parse_args(bad)
    assert bad[0] in capsys.readouterr().err
