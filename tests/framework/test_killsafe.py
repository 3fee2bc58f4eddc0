"""SIGKILL at several moments (mid-epoch, mid-checkpoint-write), resume, and end with the same weights."""

import pytest

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

pytestmark = pytest.mark.slow  # trains real models / runs the scripts

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["-c", "configs/demo.yaml", "--model", "test_resnet", "--img-size", "16", "--epochs", "3",
        "--batch-size", "32", "--max-train-samples", "128", "--no-progress"]


def _train(extra, runner=None):
    cmd = [sys.executable] + ([str(ROOT / "tests" / "framework" / "kill_runner.py"), runner] if runner else ["train.py"])
    return subprocess.run(cmd + ARGS + extra, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_sigkill_anywhere_then_resume_is_identical(tmp_path):
    out = _train(["--output", str(tmp_path), "--name", "clean"])
    assert out.returncode == 0, out.stderr
    run = ["--output", str(tmp_path), "--name", "killed", "--resume"]
    # 4 steps per epoch: forward 6 is mid-epoch 2; save 1 of the resumed process is last.pt of epoch 2;
    # forward 3 is mid-epoch 2 again; then run to the end.
    for point in ("forward:6", "save:1", "forward:3"):
        out = _train(run, runner=point)
        assert out.returncode == -signal.SIGKILL, (point, out.returncode, out.stderr[-2000:])
        ckpt = tmp_path / "killed" / "last.pt"
        assert ckpt.is_file()
        state = torch.load(ckpt, weights_only=False)  # always a complete checkpoint
        assert state["epoch"] == 1, point
        if point.startswith("save"):
            leftovers = [p for p in os.listdir(tmp_path / "killed") if p.endswith(".tmp")]
            assert leftovers, "the mid-write kill should have left its half-written temp file behind"
    out = _train(run)
    assert out.returncode == 0, out.stderr
    assert not [p for p in os.listdir(tmp_path / "killed") if p.endswith(".tmp")]
    a = torch.load(tmp_path / "clean" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["train_loss"] for r in a["log"]] == [r["train_loss"] for r in b["log"]]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = _train(["--output", str(tmp_path), "--name", "c", "--epochs", "1"])
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "c" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    out = _train(["--output", str(tmp_path), "--name", "c", "--epochs", "1", "--resume"])
    assert out.returncode == 2  # a user error: one line, no traceback
    assert any(l.startswith("train.py: error: checkpoint ") and "corrupt" in l for l in out.stderr.splitlines())
    assert "Traceback" not in out.stderr
