"""Every registered loss trains through the real trainer, from its own config, and its loss falls."""

from pathlib import Path

import pytest

import lossbench
from lossbench.framework.config import parse_args
from lossbench.framework.trainer import Trainer

pytestmark = pytest.mark.slow  # trains real models / runs the scripts

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", lossbench.list_losses())
def test_loss_trains_and_falls(name, tmp_path):
    cfg = ROOT / "configs" / f"{name}.yaml"
    assert cfg.is_file(), f"configs/{name}.yaml is missing"
    args = parse_args(["-c", str(cfg), "--model", "resnet10t", "--img-size", "16", "--epochs", "3",
                       "--batch-size", "64", "--output", str(tmp_path), "--name", name, "--no-progress",
                       "--warmup-epochs", "0"])
    assert args.loss == name
    Trainer(args).fit()
    import csv

    rows = list(csv.DictReader(open(tmp_path / name / "log.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == 3
    assert losses[-1] < losses[0], f"{name}: training loss did not fall: {losses}"
