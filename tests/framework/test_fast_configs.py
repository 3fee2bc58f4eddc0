"""The fast-training configs hold airbench's numbers, converted as their headers say."""

import os

import pytest
import yaml

from lossbench.framework.config import parse_args

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _load(name):
    with open(os.path.join(CONFIGS, name)) as fh:
        return yaml.safe_load(fh)


def _decoupled(lr_per_1024, wd_per_1024, momentum=0.85):
    """airbench's hyp -> per-step lr and torch's weight decay (lr * wd = hyp wd / kilostep scale)."""
    scale = 1 + 1 / (1 - momentum)
    lr = lr_per_1024 / scale
    return lr, wd_per_1024 / scale / lr


@pytest.mark.parametrize("name, hyp_lr, epochs", [("cifar10_fast.yaml", 11.5, 9.9), ("cifar10_fast_long.yaml", 10.0, 15)])
def test_lr_wd_schedule_follow_the_reference_hyp(name, hyp_lr, epochs):
    cfg = _load(name)
    lr, wd = _decoupled(hyp_lr, 0.0153)
    assert cfg["lr"] == pytest.approx(lr, rel=1e-12) and cfg["weight_decay"] == pytest.approx(wd, rel=1e-12)
    assert cfg["epochs"] == epochs and cfg["warmup_epochs"] == pytest.approx(0.23 * epochs, rel=1e-3)
    assert cfg["wa_decay"] == pytest.approx(0.95 ** 5, rel=1e-12)
    args = parse_args(["-c", os.path.join(CONFIGS, name)])  # the config is valid as a whole
    assert args.model == cfg["model"]


def test_long_recipe_changes_only_what_airbench95_changes():
    fast, long = _load("cifar10_fast.yaml"), _load("cifar10_fast_long.yaml")
    changed = {k for k in set(fast) | set(long) if fast.get(k) != long.get(k)}
    assert changed == {"model", "lr", "weight_decay", "epochs", "warmup_epochs", "name"}
    assert long["model"] == "lossbench_airbench95"
