"""``moekit.cli.main``'s error handling: moekit's own errors become one line, a bug keeps its traceback."""

import pytest

import moekit.cli as cli


def _command_raising(monkeypatch, err: BaseException) -> None:
    def command(args):
        raise err

    monkeypatch.setattr(cli, "cmd_convert", command)  # bound by make_parser() when main() runs


def test_an_error_moekit_raises_is_one_line(monkeypatch, capsys):
    _command_raising(monkeypatch, ValueError("steps must be a positive integer"))
    assert cli.main(["convert", "--run", "r"]) == 2
    assert capsys.readouterr().err == "moekit convert: error: steps must be a positive integer\n"


def test_a_type_error_from_a_bug_keeps_its_traceback(monkeypatch):
    _command_raising(monkeypatch, TypeError("unsupported operand type(s) for +: 'int' and 'str'"))
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main(["convert", "--run", "r"])


def test_set_error_names_a_nested_field_by_its_dotted_path():
    # the path walk once reused `section` for the config class: "<class '...MoEConfig'>.moe.top_k"
    cfg = {"model": {"moe": {"dim": 8, "hidden_dim": 8}}}
    with pytest.raises(ValueError, match=r"^model\.moe\.top_k must be an integer; got '2\.5'"):
        cli._set_dotted("model", cfg["model"], "moe.top_k", "2.5")
    with pytest.raises(ValueError, match=r"^model\.moe\.dim is not a config section"):
        cli._set_dotted("model", cfg["model"], "moe.dim.x", "3")
