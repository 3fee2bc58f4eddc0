"""Scripts: a user error is one line ``<script>: error: <message>`` and exit status 2; a bug keeps its traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from lossbench.errors import UserInputError
from lossbench.framework.cli import list_type, parse_list, run_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value, item, expected", [
    ("0,1,2", int, [0, 1, 2]), ("0 1, 2", int, [0, 1, 2]), ([3, 4], int, [3, 4]), (5, int, [5]),
    ("ce, wcdas", str, ["ce", "wcdas"]), ("ce", str, ["ce"]), ("", str, []), (None, str, []),
])
def test_parse_list(value, item, expected):
    assert parse_list(value, item) == expected


@pytest.mark.parametrize("value", ["1,x", [1.5], [True]])
def test_parse_list_rejects_non_integers_naming_the_argument(value):
    with pytest.raises(UserInputError, match="seeds"):
        parse_list(value, int, "seeds")


def test_list_type_is_an_argparse_error():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
        list_type(int, "--seeds")("0,a")


def test_run_main_one_line_for_user_errors_traceback_for_bugs(capsys):
    def user_error(argv):
        raise UserInputError("unknown loss name 'nope'; expected one of ['ce']")

    def bug(argv):
        raise RuntimeError("an internal bug")

    assert run_main("x.py", user_error) == 2
    assert capsys.readouterr().err == "x.py: error: unknown loss name 'nope'; expected one of ['ce']\n"
    with pytest.raises(RuntimeError, match="internal bug"):
        run_main("x.py", bug)


def _script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["train.py", "--loss", "no_such_loss", "--epochs", "1", "--output", "{tmp}"], "unknown loss name 'no_such_loss'"),
    (["train.py", "--data", "cifar10", "--data-root", "{tmp}/nowhere", "--output", "{tmp}"], "cifar10"),
    (["train.py", "-c", "{tmp}/missing.yaml"], "does not exist"),
    (["eval.py", "--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["bench.py", "-c", "configs/bench_digits.yaml", "--losses", "nope", "--out", "{tmp}"], "nope"),
])
def test_scripts_print_one_line_for_user_errors(tmp_path, args, message):
    out = _script(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    error_lines = [l for l in lines if l.startswith(f"{args[0]}: error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "eval.py", "bench.py"])
def test_every_script_has_no_progress(script):
    out = _script(script, "--help")
    assert out.returncode == 0 and "--no-progress" in out.stdout
