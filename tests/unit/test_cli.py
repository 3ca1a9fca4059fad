"""The tpq entry point: dispatch, help, and clear errors for bad options."""
import pytest

from common.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_unknown_command_is_refused(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--temperature", "nan"], ["--max-tokens", "0"], ["--top-p", "2"]])
def test_local_refuses_bad_sampling_options_before_loading_a_model(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["local", "hello", "--model", "/no/such/model", *option])
    assert exit_info.value.code == 2
    assert "bad sampling options" in capsys.readouterr().err


def test_local_reports_an_unknown_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["local", "hello", "--model", "/no/such/model"])
    assert exit_info.value.code == 1
    assert "smollm2-135m-instruct" in capsys.readouterr().err


def test_local_streams_an_answer_from_a_tiny_model(tiny_llama_dir, capsys):
    assert main(["local", "hello", "--model", str(tiny_llama_dir), "--max-tokens", "5", "--stream"]) == 0
    captured = capsys.readouterr()
    assert "[5 tokens in" in captured.err and "finish: length" in captured.err
