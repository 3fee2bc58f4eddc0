"""The calibration block of an evaluation: numbers, Markdown and the reliability diagram."""

import math

import torch

from lossbench.experiments.evaluate_run import calibration_block
from lossbench.experiments.report import calibration_markdown, plot_reliability
from ood.calibration import expected_calibration_error


def _logits(n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * 3, y  # over-confident by a factor 3


def test_block_fits_on_val_and_reports_test(tmp_path):
    val, val_y = _logits(1500, 0)
    test, test_y = _logits(1500, 1)
    cal = calibration_block(test, test_y, val, val_y)
    assert abs(cal["temperature"] - 3.0) < 0.4 and cal["n_fit"] == 1500
    assert math.isclose(cal["before"]["ece"], expected_calibration_error(test, test_y))
    assert math.isclose(cal["after"]["ece"], expected_calibration_error(test / cal["temperature"], test_y))
    assert cal["after"]["ece"] < cal["before"]["ece"] and cal["after"]["nll"] < cal["before"]["nll"]
    assert cal["after"]["acc"] == cal["before"]["acc"]
    md = calibration_markdown(cal)
    assert "| ECE, equal-width (%) | " + f"{100 * cal['before']['ece']:.2f} | {100 * cal['after']['ece']:.2f} |" in md
    out = tmp_path / "reliability.png"
    plot_reliability(cal, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written atomically, nothing left
