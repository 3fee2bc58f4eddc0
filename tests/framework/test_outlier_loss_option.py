"""--outlier-loss energy|oe: one option, two outlier terms through the same LossStep."""

import torch

from lossbench.framework.checkpoint import config_changes
from lossbench.framework.config import parse_args, to_dict
from lossbench.framework.models import create_model
from lossbench.framework.trainer import LossStep, build_outlier_loss
from lossbench.losses import EnergyMarginLoss, OutlierExposureLoss, uniform_cross_entropy


def test_default_is_energy_and_oe_is_a_choice():
    args = parse_args([])
    assert args.outlier_loss == "energy" and args.oe_weight == 0.5
    assert isinstance(build_outlier_loss(args), EnergyMarginLoss)
    oe = build_outlier_loss(parse_args(["--outlier-loss", "oe", "--oe-weight", "0.25"]))
    assert isinstance(oe, OutlierExposureLoss) and oe.weight == 0.25


def test_loss_step_adds_the_oe_term():
    torch.manual_seed(0)
    model = create_model("test_resnet", 4, "ce", {}, in_chans=1).eval()
    x, y, x_out = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0]), torch.rand(3, 1, 16, 16)
    loss, logits = LossStep(model, OutlierExposureLoss(0.5))(x, y, x_out)
    f = model.features(torch.cat([x, x_out]))
    ref = torch.nn.functional.cross_entropy(model.head.logits(f[:5]), y) + 0.5 * uniform_cross_entropy(
        model.head.logits(f[5:])).mean()
    torch.testing.assert_close(loss, ref)
    assert logits.shape == (5, 4)


def test_runs_saved_before_the_option_still_resume():
    saved = to_dict(parse_args([]))
    for key in ("outlier_loss", "oe_weight"):
        saved.pop(key)
    assert config_changes(saved, to_dict(parse_args([]))) == []
    assert config_changes(saved, to_dict(parse_args(["--outlier-loss", "oe"]))) == ["outlier_loss: 'energy' -> 'oe'"]
