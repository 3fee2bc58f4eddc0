"""A run killed between the writes of one epoch (last.pt, then best.pt, then log.csv) gets best.pt and
log.csv back to what last.pt records on --resume, even when no epoch is left to train."""

import csv
from pathlib import Path

import pytest
import torch

import lossbench.framework.trainer as engine
from lossbench.framework.checkpoint import (WEIGHTS_KEYS, best_epoch_of, load_checkpoint, save_checkpoint, stale_best,
                                           weights_only)
from lossbench.framework.config import parse_args
from lossbench.framework.trainer import Trainer


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise point runs (an Exception handler would not stop it)."""


def _args(tmp_path: Path, epochs: int, resume: bool = False):
    return parse_args(["--model", "test_resnet", "--img-size", "16", "--epochs", str(epochs), "--batch-size", "32",
                       "--max-train-samples", "64", "--warmup-epochs", "0", "--output", str(tmp_path),
                       "--name", "r", "--no-progress"] + (["--resume"] if resume else []))


def _val_accs(monkeypatch, accs):
    """Validation accuracies ``accs`` for epochs 1, 2, ... (which epoch is the best is then known)."""
    it = iter(accs)
    monkeypatch.setattr(engine, "classification_metrics", lambda logits, labels: {"acc": next(it), "loss": 1.0,
                                                                                "ece": 0.1})


def _kill_after_last_pt(monkeypatch, epoch: int):
    real = engine.save_checkpoint

    def save(path, state):
        real(path, state)
        if path.endswith("last.pt") and state["epoch"] == epoch:
            raise _Killed

    monkeypatch.setattr(engine, "save_checkpoint", save)
    return real


def _log(run: Path):
    return [(int(r["epoch"]), float(r["val_acc"])) for r in csv.DictReader(open(run / "log.csv"))]


@pytest.mark.slow  # trains real (tiny) models
@pytest.mark.parametrize("kill_epoch", [1, 2])
def test_kill_after_last_pt_then_resume_brings_best_and_log_up(tmp_path, monkeypatch, capsys, kill_epoch):
    """Regression: --resume said "resumed at epoch 2" and left best.pt (epoch 1, or none) and log.csv stale."""
    _val_accs(monkeypatch, [0.5, 0.7])  # every epoch is a new best
    real = _kill_after_last_pt(monkeypatch, kill_epoch)
    with pytest.raises(_Killed):
        Trainer(_args(tmp_path, kill_epoch)).fit()
    run = tmp_path / "r"
    assert load_checkpoint(str(run / "last.pt"))["epoch"] == kill_epoch
    if kill_epoch == 1:  # the stale files the kill leaves behind
        assert not (run / "best.pt").exists() and not (run / "log.csv").exists()
    else:
        assert load_checkpoint(str(run / "best.pt"), required=WEIGHTS_KEYS)["epoch"] == 1 and _log(run) == [(1, 0.5)]
    monkeypatch.setattr(engine, "save_checkpoint", real)
    capsys.readouterr()
    Trainer(_args(tmp_path, kill_epoch, resume=True)).fit()  # no epoch left: resuming only repairs
    last, best = load_checkpoint(str(run / "last.pt")), load_checkpoint(str(run / "best.pt"), required=WEIGHTS_KEYS)
    assert best["epoch"] == last["best_epoch"] == kill_epoch and "optimizer" not in best
    for k in last["model"]:
        assert torch.equal(best["model"][k], last["model"][k]), k
    assert _log(run) == [(r["epoch"], r["val_acc"]) for r in last["log"]] == [(1, 0.5), (2, 0.7)][:kill_epoch]
    was = "was missing" if kill_epoch == 1 else "held epoch 1"
    assert f"best.pt brought up to epoch {kill_epoch} (it {was})" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_keeps_an_older_best_and_rewrites_the_log(tmp_path, monkeypatch, capsys):
    _val_accs(monkeypatch, [0.7, 0.5])  # epoch 2 is worse: best.pt rightly stays at epoch 1
    real = _kill_after_last_pt(monkeypatch, 2)
    with pytest.raises(_Killed):
        Trainer(_args(tmp_path, 2)).fit()
    run = tmp_path / "r"
    best_bytes = (run / "best.pt").read_bytes()
    monkeypatch.setattr(engine, "save_checkpoint", real)
    Trainer(_args(tmp_path, 2, resume=True)).fit()
    assert (run / "best.pt").read_bytes() == best_bytes and _log(run) == [(1, 0.7), (2, 0.5)]
    assert "best.pt" not in capsys.readouterr().out
    (run / "best.pt").unlink()  # lost by hand: last.pt cannot give epoch 1's weights back, so say so
    Trainer(_args(tmp_path, 2, resume=True)).fit()
    assert "warning: best.pt was missing, but the best epoch is 1" in capsys.readouterr().err


def test_best_epoch_of_a_checkpoint_that_predates_it():
    rows = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.7}, {"epoch": 3, "val_acc": 0.7}]
    assert best_epoch_of({"log": rows}) == 2  # fit keeps a new best only when strictly higher
    assert best_epoch_of({"log": rows, "best_epoch": 3}) == 3 and best_epoch_of({"log": []}) == 0


def _bare_trainer(run: Path, epoch: int, best_epoch: int) -> Trainer:
    """A Trainer with only what ``sync_run_files`` reads (no model or data: the fast check of the rule)."""
    t = object.__new__(Trainer)
    t.run_dir, t.epoch, t.best_epoch = str(run), epoch, best_epoch
    t.log_rows = [{"epoch": e, "val_acc": 0.1 * e} for e in range(1, epoch + 1)]
    return t


def _ckpt(epoch: int, best_epoch: int, w: float):
    return {"model": {"w": torch.full((3,), w)}, "optimizer": {}, "scheduler": {}, "epoch": epoch,
            "global_step": epoch, "config": {}, "best_epoch": best_epoch}


def test_sync_rewrites_a_stale_best_from_last_and_the_log(tmp_path):
    save_checkpoint(str(tmp_path / "best.pt"), _ckpt(1, 1, 1.0))
    save_checkpoint(str(tmp_path / "last.pt"), _ckpt(2, 2, 2.0))
    assert _bare_trainer(tmp_path, 2, 2).sync_run_files() == ["best.pt brought up to epoch 2 (it held epoch 1)"]
    best = load_checkpoint(str(tmp_path / "best.pt"), required=WEIGHTS_KEYS)
    assert torch.equal(best["model"]["w"], torch.full((3,), 2.0)) and best["epoch"] == best["best_epoch"] == 2
    assert "optimizer" not in best and "scheduler" not in best  # weights only, as fit writes it
    assert _log(tmp_path) == [(1, 0.1), (2, 0.2)]
    assert _bare_trainer(tmp_path, 2, 2).sync_run_files() == []  # now in step: nothing to do


def test_sync_replaces_a_damaged_best(tmp_path):
    save_checkpoint(str(tmp_path / "last.pt"), _ckpt(1, 1, 1.0))
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    assert _bare_trainer(tmp_path, 1, 1).sync_run_files() == ["best.pt brought up to epoch 1 (it was unreadable)"]
    assert load_checkpoint(str(tmp_path / "best.pt"), required=WEIGHTS_KEYS)["epoch"] == 1


def test_sync_keeps_a_weights_only_best_that_is_up_to_date(tmp_path):
    """Regression: a weights-only best.pt (no optimiser state) must read as 'held epoch N', not 'unreadable'."""
    save_checkpoint(str(tmp_path / "last.pt"), _ckpt(2, 2, 2.0))
    save_checkpoint(str(tmp_path / "best.pt"), weights_only(_ckpt(2, 2, 2.0)))
    before = (tmp_path / "best.pt").read_bytes()
    assert _bare_trainer(tmp_path, 2, 2).sync_run_files() == []
    assert (tmp_path / "best.pt").read_bytes() == before


def test_eval_run_refuses_a_stale_best(tmp_path, capsys):
    """Regression: ``eval.py --run`` evaluated the epoch-1 best.pt of a run whose last.pt says epoch 2 is best."""
    import importlib.util

    from lossbench.framework.cli import run_main

    spec = importlib.util.spec_from_file_location("eval_script", Path(__file__).resolve().parents[2] / "eval.py")
    eval_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_script)

    save_checkpoint(str(tmp_path / "best.pt"), _ckpt(1, 1, 1.0))
    save_checkpoint(str(tmp_path / "last.pt"), _ckpt(2, 2, 2.0))
    assert "holds epoch 1, but last.pt records epoch 2 as the best" in stale_best(str(tmp_path))
    assert run_main("eval.py", eval_script.main, ["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "best.pt' holds epoch 1" in err and "--resume" in err
    save_checkpoint(str(tmp_path / "last.pt"), _ckpt(3, 1, 3.0))  # a later, worse epoch: best.pt is right
    assert stale_best(str(tmp_path)) is None
