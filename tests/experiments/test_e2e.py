"""Train -> eval through the real scripts, and the resume path."""

import pytest

import json
import subprocess
import sys
from pathlib import Path

import torch

pytestmark = pytest.mark.slow  # trains real models / runs the scripts

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "resnet10t", "--img-size", "16", "--batch-size", "64", "--no-progress"]


def _run(args, cwd=ROOT, check=True):
    out = subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def test_train_then_eval_scripts(tmp_path):
    _run(["train.py", "-c", "configs/demo.yaml", *TINY, "--epochs", "3", "--lr", "3e-3",
          "--output", str(tmp_path), "--name", "e2e"])
    run = tmp_path / "e2e"
    for f in ("config.yaml", "log.csv", "last.pt", "best.pt"):
        assert (run / f).is_file(), f
    assert len((run / "log.csv").read_text().strip().splitlines()) == 4  # header + 3 epochs
    out = _run(["eval.py", "--run", str(run), "--scores", "msp,energy", "--ood", "heldout,gaussian"])
    assert "AUROC" in out.stdout
    m = json.loads((run / "metrics.json").read_text())
    assert m["test"]["acc"] > 1 / 6 + 0.2  # well above chance (6 classes)
    assert 0 <= m["test"]["ece"] <= 1
    res = m["ood"]["results"]
    assert set(res) == {"msp", "energy"} and set(res["msp"]) == {"heldout", "gaussian"}
    for f in ("results.md", "roc.png", "hist.png", "reliability.png"):
        assert (run / f).stat().st_size > 0, f
    cal = m["calibration"]
    assert cal["fit_split"] == "val" and cal["temperature"] > 0
    assert cal["before"]["ece"] == pytest.approx(m["test"]["ece"]) and cal["before"]["acc"] == pytest.approx(m["test"]["acc"])
    assert cal["after"]["acc"] == pytest.approx(cal["before"]["acc"])  # TS keeps the argmax
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-12
    assert "before and after temperature scaling" in (run / "results.md").read_text()
    # an existing run is not overwritten without --resume
    again = _run(["train.py", "-c", "configs/demo.yaml", *TINY, "--epochs", "3", "--lr", "3e-3",
                  "--output", str(tmp_path), "--name", "e2e"], check=False)
    assert again.returncode != 0 and "--resume" in again.stderr


def test_unknown_config_key_through_script(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("loss: ce\nlearnig_rate: 0.1\n")
    out = _run(["train.py", "-c", str(cfg)], check=False)
    assert out.returncode == 2 and "learnig_rate" in out.stderr and "valid keys" in out.stderr


def test_resume_gives_same_weights(tmp_path):
    common = ["train.py", "-c", "configs/demo.yaml", *TINY, "--epochs", "3", "--output", str(tmp_path)]
    _run(common + ["--name", "full"])
    _run(common + ["--name", "split", "--stop-after-epochs", "1"])
    log = (tmp_path / "split" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 2
    _run(common + ["--name", "split", "--resume"])
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert a["log"][-1]["train_loss"] == b["log"][-1]["train_loss"]
    # resuming with a different configuration is refused, naming the option
    out = _run(common + ["--name", "split", "--resume", "--lr", "0.5"], check=False)
    assert out.returncode != 0 and "lr" in out.stderr and "different configuration" in out.stderr
