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


# ---- every script's user errors, in-process: main() through run_main, as `python <script>` runs it ----
def _script_main(script):
    """``main`` of a top-level script (train.py, eval.py, bench.py), imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3] + "_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _one_error_line(capsys, script, argv):
    """Run ``script`` with ``argv``; assert exit status 2 and exactly one ``<script>: error:`` line; return it."""
    assert run_main(script, _script_main(script), argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), err
    return lines[0]


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss: ce\nloss_args: {label_smoothing: 0.0\nname: x\n")  # an unclosed flow mapping
    return str(path)


TRAIN = ["--model", "test_resnet", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("argv, message", [
    (["--loss-args", '{"no_such_arg": 1}'], "loss_args (--loss-args): unknown hyper-parameter 'no_such_arg' for loss 'ce'"),
    (["--loss-args", '{"label_smoothing": 2}'], "label_smoothing"),
    (["--id-classes", "0,1,42"], "id_classes (--id-classes) must lie in [0, 10)"),
    (["--id-classes", "0,0,1"], "id_classes (--id-classes) must be >= 2 distinct"),
    (["--model", "no_such_net"], "unknown timm model name 'no_such_net' (--model"),
])
def test_train_user_errors_are_one_line(capsys, tmp_path, argv, message):
    line = _one_error_line(capsys, "train.py", TRAIN + ["--output", str(tmp_path)] + argv)
    assert message in line


def test_device_cuda_without_cuda_is_one_line(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = _one_error_line(capsys, "train.py", TRAIN + ["--output", str(tmp_path), "--device", "cuda"])
    assert "device 'cuda' (--device)" in line and "CUDA is not available" in line
    line = _one_error_line(capsys, "eval.py", ["--run", str(tmp_path / "a_run"), "--device", "cuda"])
    assert "CUDA is not available" in line


@pytest.mark.parametrize("argv, message", [
    (["--score-args", '{"msp": {"no_such_arg": 1}}'], "--score-args['msp']: unknown hyper-parameter 'no_such_arg'"),
    (["--score-args", '{"odin": {"temperature": -1}}'], "--score-args['odin']"),
    (["--score-args", '{"knn": {"k": 5}}'], "'knn', which is not among the scores evaluated"),
    (["--scores", "msp", "--score-args", '["msp"]'], "--score-args must map score names"),
])
def test_eval_score_args_errors_are_one_line_before_anything_is_loaded(capsys, tmp_path, argv, message):
    line = _one_error_line(capsys, "eval.py", ["--run", str(tmp_path / "no_run_needed")] + argv)
    assert message in line


def test_malformed_yaml_is_one_line_with_its_place(capsys, bad_yaml):
    for script in ("train.py", "bench.py"):
        line = _one_error_line(capsys, script, ["-c", bad_yaml])
        assert "is not valid YAML at line 3, column 5" in line, line


def test_bench_bad_loss_and_score_args_are_refused_before_any_training(capsys, tmp_path, monkeypatch):
    from lossbench.framework.trainer import Trainer

    trained = []
    monkeypatch.setattr(Trainer, "fit", lambda self: trained.append(self.args.name))
    for extra, message in (("loss_args: {ce: {no_such_arg: 1}}", "loss_args of 'ce'"),
                           ("score_args: {msp: {no_such_arg: 1}}", "score_args['msp']")):
        cfg = tmp_path / "bench.yaml"
        cfg.write_text(f"losses: [ce]\nseeds: [0]\nscores: [msp]\noutput: {tmp_path / 'out'}\n"
                       f"train: {{model: test_resnet, epochs: 1}}\n{extra}\n")
        assert message in _one_error_line(capsys, "bench.py", ["-c", str(cfg), "--no-progress"])
    assert trained == [] and not (tmp_path / "out").exists()


# ---- Ctrl-C ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("finished_epoch", [False, True])
def test_train_ctrl_c_says_where_the_run_is_and_exits_130(capsys, tmp_path, monkeypatch, finished_epoch):
    import os

    from lossbench.framework.trainer import Trainer

    def interrupted(self):
        if finished_epoch:
            os.makedirs(self.run_dir, exist_ok=True)
            open(os.path.join(self.run_dir, "last.pt"), "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    argv = TRAIN + ["--output", str(tmp_path), "--name", "run"]
    assert run_main("train.py", _script_main("train.py"), argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("train.py: interrupted; ") and len(err.strip().splitlines()) == 1
    if finished_epoch:
        assert f"the last finished epoch is in {tmp_path / 'run' / 'last.pt'}" in err and "--resume" in err
    else:
        assert "no epoch had finished" in err


@pytest.mark.slow
def test_train_ctrl_c_on_a_real_run(tmp_path):
    """SIGINT to a running ``train.py`` once its first epoch is saved: exit 130, no traceback, resumable."""
    import signal
    import time

    argv = [sys.executable, "train.py", "--model", "test_resnet", "--epochs", "5000", "--no-progress",
            "--output", str(tmp_path), "--name", "run"]
    # A shell's background job starts with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # give the child the default disposition so that this test also runs under `make test &`.
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        last = tmp_path / "run" / "last.pt"
        deadline = time.time() + 300
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert last.exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"the last finished epoch is in {last}" in err and "--resume" in err
