import math

import pytest
import torch

from ood.calibration import expected_calibration_error


def test_ece_hand_worked():
    # two samples: confidences 0.9 (correct) and 0.6 (wrong), in different bins of 15
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    logits = p.log()
    target = torch.tensor([0, 1])
    expected = 0.5 * abs(1 - 0.9) + 0.5 * abs(0 - 0.6)
    assert math.isclose(expected_calibration_error(logits, target), expected, rel_tol=1e-9)


def test_ece_same_bin_averages_before_abs():
    p = torch.tensor([[0.95, 0.05], [0.94, 0.06]], dtype=torch.float64)  # same bin (14/15, 1]
    target = torch.tensor([0, 1])
    expected = abs(0.5 - (0.95 + 0.94) / 2)
    assert math.isclose(expected_calibration_error(p.log(), target), expected, rel_tol=1e-9)


def test_ece_errors():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="target"):
        expected_calibration_error(torch.zeros(2, 3), torch.tensor([0, 3]))
