"""best.pt holds the weights and the run's record but no training state; last.pt keeps everything for --resume."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from lossbench.framework.builders import load_run
from lossbench.framework.checkpoint import (REQUIRED_KEYS, TRAINING_STATE_KEYS, WEIGHTS_KEYS, load_checkpoint,
                                           stale_best)
from lossbench.framework.cli import run_main
from lossbench.framework.config import parse_args
from lossbench.framework.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def _eval_script():
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(tmp_path: Path, resume: bool = False) -> Path:
    """Epoch 1 of a 2-epoch AdamW run (``resume``: the rest of it)."""
    args = parse_args(["--model", "test_resnet", "--img-size", "16", "--epochs", "2", "--batch-size", "32",
                       "--max-train-samples", "64", "--warmup-epochs", "0", "--opt", "adamw", "--keep", "last",
                       "--output", str(tmp_path), "--name", "r", "--no-progress"]
                      + (["--resume"] if resume else ["--stop-after-epochs", "1"]))
    Trainer(args).fit()
    return tmp_path / "r"


def test_best_is_weights_only_smaller_and_evaluates(tmp_path, capsys):
    run = _train(tmp_path)
    last = load_checkpoint(str(run / "last.pt"))
    best = load_checkpoint(str(run / "best.pt"), required=WEIGHTS_KEYS)
    assert all(last.get(k) is not None for k in ("optimizer", "scheduler", "rng"))  # last.pt: everything
    assert not set(best) & set(TRAINING_STATE_KEYS), sorted(best)
    assert best["epoch"] == 1 and best["config"] == last["config"] and best["best_epoch"] == 1
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v), k
    # AdamW keeps two moment buffers per weight: best.pt is about a third of last.pt
    assert (run / "best.pt").stat().st_size < 0.5 * (run / "last.pt").stat().st_size
    with pytest.raises(Exception, match=r"lacks \['optimizer', 'scheduler'"):
        load_checkpoint(str(run / "best.pt"), required=REQUIRED_KEYS)  # it is no resume state

    model, args, bundle, state = load_run(str(run / "best.pt"))
    assert state["epoch"] == 1 and bundle.num_classes == 6 and not model.training
    assert stale_best(str(run)) is None
    out = tmp_path / "ev"
    assert run_main("eval.py", _eval_script().main, ["--run", str(run), "--scores", "msp,energy", "--ood", "gaussian",
                                                     "--max-ood-samples", "50", "--no-progress", "--out", str(out),
                                                     "--no-feature-cache"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and set(metrics["ood"]["results"]) == {"msp", "energy"}

    # resuming reads last.pt; the epoch it adds rewrites best.pt weights-only again (keep: last)
    _train(tmp_path, resume=True)
    best2 = load_checkpoint(str(run / "best.pt"), required=WEIGHTS_KEYS)
    assert best2["epoch"] == 2 and not set(best2) & set(TRAINING_STATE_KEYS)
    assert stale_best(str(run)) is None


def test_an_old_best_with_the_training_state_still_loads(tmp_path):
    """best.pt files written before it was weights-only (a full copy of the state) load as before."""
    run = _train(tmp_path)
    shutil.copyfile(run / "last.pt", run / "best.pt")
    model, _, _, state = load_run(str(run / "best.pt"))
    assert "optimizer" in state and state["epoch"] == 1
    assert stale_best(str(run)) is None
