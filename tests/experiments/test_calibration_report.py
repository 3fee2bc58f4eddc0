"""The calibration block of an evaluation: numbers, Markdown and the reliability diagram."""

import math

import torch

from lossbench.experiments.evaluate_run import calibration_block
from lossbench.experiments.report import RELIABILITY_LABELS, calibration_markdown, plot_reliability, reliability_figure
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


def _bins(acc, conf, count):
    edges = [i / len(acc) for i in range(len(acc) + 1)]
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "accuracy": acc, "confidence": conf}


def test_reliability_bars_are_honest_in_both_directions_and_show_counts():
    """An under-confident bin (accuracy 0.9 > confidence 0.55) used to get a translucent red band drawn
    over its blue bar from 0.9 down to 0.55 (a purple band not in the legend, blue only up to 0.55)."""
    nan = float("nan")
    before = _bins([nan, 0.9, 0.5], [nan, 0.55, 0.85], [0, 2, 2000])
    cal = {"reliability": {"before": before, "after": before}, "temperature": 1.0,
           "before": {"ece": 0.1}, "after": {"ece": 0.1}}
    ax = reliability_figure(cal).axes[0]
    bars = {c.get_label(): c for c in ax.containers}
    assert set(bars) == set(RELIABILITY_LABELS.values())
    acc = bars[RELIABILITY_LABELS["accuracy"]]
    assert [p.get_height() for p in acc] == [0.0, 0.9, 0.5]  # the full accuracy, empty bin flat
    under, over = bars[RELIABILITY_LABELS["under"]], bars[RELIABILITY_LABELS["over"]]
    assert (under[1].get_y(), round(under[1].get_height(), 12)) == (0.55, 0.35)  # from confidence up to accuracy
    assert (over[2].get_y(), round(over[2].get_height(), 12)) == (0.5, 0.35)  # from accuracy up to confidence
    assert under[2].get_height() == 0 and over[1].get_height() == 0 and under[0].get_height() == 0
    assert under[1].get_facecolor() != over[2].get_facecolor() != acc[1].get_facecolor()
    assert all(p.get_alpha() in (None, 1.0) for c in ax.containers for p in c)  # no blended colours
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(legend) == set(RELIABILITY_LABELS.values())
    assert {"2", "2000"} <= {t.get_text() for t in ax.texts}  # samples per bin are shown
