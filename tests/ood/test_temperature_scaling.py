"""Temperature scaling: recovers a known temperature, lowers the NLL, matches a brute-force search."""

import math

import pytest
import torch

from ood.calibration import TemperatureScaling, expected_calibration_error, fit_temperature, negative_log_likelihood


def _synthetic(t_true, n=10000, c=8, seed=0):
    """Labels drawn from softmax(z / t_true): the NLL-optimal temperature of z is t_true (as n grows)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    y = torch.multinomial(torch.softmax(z / t_true, 1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 2.5, 4.54])
def test_recovers_known_temperature(t_true):
    z, y = _synthetic(t_true)
    ts = TemperatureScaling().fit(z, y)
    assert abs(ts.temperature - t_true) / t_true < 0.05
    assert ts.nll_after <= ts.nll_before
    assert not ts.at_bound


def test_matches_brute_force_grid_and_is_a_stationary_point():
    z, y = _synthetic(3.0, n=1000, seed=1)
    t = fit_temperature(z, y)
    grid = torch.exp(torch.linspace(math.log(0.5), math.log(20), 801, dtype=torch.float64))
    nll = torch.stack([torch.nn.functional.cross_entropy(z / g, y) for g in grid])
    t_grid = float(grid[nll.argmin()])
    assert abs(t - t_grid) / t_grid < 5e-3  # grid step 0.46 %
    # d NLL / dT = 0 at the optimum (central difference, float64)
    h = 1e-4 * t
    d = (negative_log_likelihood(z / (t + h), y) - negative_log_likelihood(z / (t - h), y)) / (2 * h)
    assert abs(d) < 1e-6


def test_transform_keeps_accuracy_and_improves_ece_of_an_overconfident_model():
    z, y = _synthetic(1.0, n=5000, seed=2)
    over = z * 3  # over-confident logits: fitted T ~ 3
    ts = TemperatureScaling().fit(over[:2500], y[:2500])
    test = ts.transform(over[2500:])
    assert torch.equal(test.argmax(1), over[2500:].argmax(1))
    assert expected_calibration_error(test, y[2500:]) < expected_calibration_error(over[2500:], y[2500:])
    assert abs(ts.temperature - 3.0) < 0.3


def test_separable_data_stops_at_the_lower_bound():
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    ts = TemperatureScaling(t_min=0.01).fit(z, torch.tensor([0, 1]))
    assert ts.temperature == 0.01 and ts.at_bound


def test_errors():
    with pytest.raises(RuntimeError, match="before fit"):
        TemperatureScaling().transform(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="t_min"):
        TemperatureScaling(t_min=2.0, t_max=1.0)
    with pytest.raises(ValueError, match="logits contains"):
        TemperatureScaling().fit(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="logits is empty"):
        TemperatureScaling().fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("kw, name", [
    ({"t_max": float("inf")}, "t_max"), ({"t_max": float("nan")}, "t_max"),
    ({"t_min": 1e-320}, "t_min"), ({"t_min": 0.0}, "t_min"), ({"t_min": -1.0}, "t_min"),
    ({"t_min": float("-inf")}, "t_min"), ({"t_min": 5.0, "t_max": 5.0}, "t_min < t_max"),
])
def test_bounds_must_be_finite_positive_normal_and_ordered(kw, name):
    """t_max = inf was a math domain error and t_min = 1e-320 (subnormal) returned T = 0."""
    with pytest.raises(ValueError, match=name):
        TemperatureScaling(**kw)
    with pytest.raises(ValueError, match=name):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 1]), **kw)


def test_extreme_normal_bounds_give_a_finite_positive_temperature():
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]], dtype=torch.float64) * 1e10  # separable: T falls to t_min
    t = fit_temperature(z, torch.tensor([0, 1]), t_min=1e-300, t_max=1e300)
    assert t == 1e-300
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    t = fit_temperature(z, torch.tensor([1, 0]), t_min=1e-300, t_max=1e300)  # every label wrong: T grows to t_max
    assert t == 1e300
