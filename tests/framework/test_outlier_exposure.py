"""Energy-bounded fine-tuning with auxiliary outliers (Liu et al. 2020) through the real trainer."""

import pytest

import torch

from lossbench.framework.config import parse_args
from lossbench.framework.ood_sets import get_ood_dataset
from lossbench.framework.builders import make_loader, predict
from lossbench.framework.trainer import Trainer
from ood import ood_metrics

pytestmark = pytest.mark.slow  # trains real models / runs the scripts


def _energy_auroc(trainer, ood_name):
    ood = get_ood_dataset(ood_name, trainer.bundle, n_noise=300, seed=123)
    s_in = torch.logsumexp(predict(trainer.model, make_loader(trainer.bundle.test, 256), trainer.device)[0], 1)
    s_out = torch.logsumexp(predict(trainer.model, make_loader(ood, 256), trainer.device)[0], 1)
    return ood_metrics(s_in.numpy(), s_out.numpy())["auroc"], s_in, s_out


def test_outlier_exposure_separates_energies(tmp_path):
    common = ["-c", "configs/demo.yaml", "--model", "test_resnet", "--img-size", "16", "--epochs", "3",
              "--batch-size", "32", "--max-train-samples", "256", "--output", str(tmp_path), "--no-progress"]
    plain = Trainer(parse_args(common + ["--name", "plain"]))
    plain.fit()
    oe = Trainer(parse_args(common + ["--name", "oe", "--outlier-data", "uniform"]))
    assert oe.energy_loss is not None
    oe.fit()
    auroc_plain, _, _ = _energy_auroc(plain, "uniform")
    auroc_oe, s_in, s_out = _energy_auroc(oe, "uniform")
    assert auroc_oe > 0.95 and auroc_oe > auroc_plain
    # the margins push the free energy -logsumexp of outliers up, of inliers down
    assert float(s_in.mean()) > float(s_out.mean())


def _max_softmax(trainer, loader):
    return torch.softmax(predict(trainer.model, loader, trainer.device)[0], 1).max(1).values


def test_outlier_exposure_msp_variant_flattens_outlier_softmax(tmp_path):
    # trained long enough (all ~970 digits, 5 epochs) for the plain model to be confident on noise
    common = ["-c", "configs/demo.yaml", "--model", "test_resnet", "--img-size", "16", "--epochs", "5",
              "--batch-size", "32", "--output", str(tmp_path), "--no-progress"]
    plain = Trainer(parse_args(common + ["--name", "plain"]))
    plain.fit()
    oe = Trainer(parse_args(common + ["--name", "oe", "--outlier-data", "uniform", "--outlier-loss", "oe"]))
    assert type(oe.outlier_loss).__name__ == "OutlierExposureLoss"
    oe.fit()
    ood = make_loader(get_ood_dataset("uniform", oe.bundle, n_noise=300, seed=123), 256)
    test = make_loader(oe.bundle.test, 256)
    out_plain, out_oe = float(_max_softmax(plain, ood).mean()), float(_max_softmax(oe, ood).mean())
    in_oe = float(_max_softmax(oe, test).mean())
    msg = f"mean max-softmax on outliers: plain {out_plain:.3f}, OE {out_oe:.3f}; OE on test {in_oe:.3f}"
    # the CE-to-uniform term flattens the outliers' softmax (uniform over 6 classes: 1/6)
    assert out_oe < 0.3 and out_oe < out_plain - 0.1, msg
    assert in_oe > out_oe + 0.1, msg
