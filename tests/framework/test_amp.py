"""Every loss trains a few steps under --amp (bf16 autocast on CPU): finite, and the loss falls."""

from pathlib import Path

import pytest

import lossbench
from lossbench.framework.config import parse_args
from lossbench.framework.trainer import Trainer

pytestmark = pytest.mark.slow  # trains real models / runs the scripts

ROOT = Path(__file__).resolve().parents[2]


# 32 px, not 16: at 16 px test_resnet's layer4 sees a 1x1 input, and the bf16 weight gradient of a
# stride-2, padding-1 3x3 convolution on a 1x1 input is garbage (|grad| ~ 1e29) in this torch build's
# oneDNN CPU kernels (8 of 10 random trials; 0 of 10 at 2x2 and larger inputs, and 0 with
# torch.backends.mkldnn disabled). That is an upstream kernel bug, not a lossbench one.
@pytest.mark.parametrize("name", lossbench.list_losses())
def test_amp_steps_finite_and_falling(name, tmp_path):
    args = parse_args(["-c", str(ROOT / "configs" / f"{name}.yaml"), "--amp", "--model", "test_resnet",
                       "--img-size", "32", "--epochs", "4", "--batch-size", "32", "--max-train-samples", "64",
                       "--lr", "3e-3", "--warmup-epochs", "0", "--output", str(tmp_path), "--name", name,
                       "--no-progress"])
    trainer = Trainer(args)
    assert trainer.amp_dtype is not None
    trainer.fit()  # raises FloatingPointError on a non-finite loss
    losses = [row["train_loss"] for row in trainer.log_rows]
    assert len(losses) == 4 and all(l == l and abs(l) < float("inf") for l in losses)
    assert losses[-1] < losses[0], f"{name}: loss did not fall under --amp: {losses}"
