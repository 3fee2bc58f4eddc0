"""The calibration and failure-detection blocks of an evaluation: numbers, Markdown, the reliability
diagram and the risk-coverage curves."""

import json
import math

import numpy as np
import pytest
import torch

from lossbench.experiments.evaluate_run import calibration_block, failure_block, write_report
from lossbench.experiments.report import (
    RELIABILITY_LABELS, calibration_markdown, failure_markdown, plot_reliability, plot_risk_coverage, reliability_figure,
)
from ood import failure_metrics, ood_metrics
from ood.calibration import (
    HistogramBinning, VectorScaling, calibration_metrics, expected_calibration_error, negative_log_likelihood,
)


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


def test_block_reports_every_calibrator_fitted_on_val(tmp_path):
    val, val_y = _logits(1500, 0)
    test, test_y = _logits(1500, 1)
    cal = calibration_block(test, test_y, val, val_y)
    assert set(cal["calibrators"]) == {"vector", "matrix_odir", "histogram", "isotonic"}
    # each entry is the test metrics after that calibrator, fitted on the validation split only
    hb = HistogramBinning().fit(val, val_y)
    assert cal["calibrators"]["histogram"] == calibration_metrics(hb.transform(test), test_y)
    vs = VectorScaling().fit(val, val_y)
    assert math.isclose(cal["calibrators"]["vector"]["nll"], negative_log_likelihood(vs.transform(test), test_y),
                        rel_tol=1e-6)
    assert cal["calibrator_fit"]["matrix_odir"]["lam"] == cal["calibrator_fit"]["matrix_odir"]["mu"] > 0
    for name, m in cal["calibrators"].items():  # over-confident by 3: every calibrator lowers ECE and NLL
        assert m["ece"] < cal["before"]["ece"] and m["nll"] < cal["before"]["nll"], name
    md = calibration_markdown(cal)
    assert "| metric | before | after TS | vector scaling | matrix scaling (ODIR) | histogram binning | isotonic |" in md
    row = next(line for line in md.splitlines() if line.startswith("| ECE, equal-width (%) |"))
    assert row.endswith(f"| {100 * cal['calibrators']['isotonic']['ece']:.2f} |")


def test_failure_block_markdown_plot_and_metrics_json(tmp_path):
    test, test_y = _logits(800, 2)
    fail = failure_block(test, test_y, temperature=3.0)
    correct = (test.argmax(1) == test_y).numpy()
    assert fail["error_rate"] == pytest.approx(1 - correct.mean()) and fail["n"] == 800
    # each confidence scored with ood.failure_metrics on the same correct / wrong predictions
    msp = torch.softmax(test, 1).amax(1).numpy()
    assert fail["scores"]["msp"] == failure_metrics(msp, correct)
    ts = torch.softmax(test / 3.0, 1).amax(1).numpy()
    assert fail["scores"]["msp_ts"] == failure_metrics(ts, correct)
    assert fail["scores"]["energy"] == failure_metrics(torch.logsumexp(test, 1).numpy(), correct)
    assert fail["scores"]["maxlogit"] == failure_metrics(test.amax(1).numpy(), correct)
    md = failure_markdown(fail)
    assert f"| MSP | {100 * fail['scores']['msp']['aurc']:.2f} | " in md and "coverage @ 5 % risk" in md
    # through write_report: metrics.json keeps the numbers without the raw arrays, results.md the table
    s_in, s_out = np.linspace(0, 1, 50), np.linspace(-1, 0.5, 40)
    ood_res = {"convention": "paper", "results": {"msp": {"noise": ood_metrics(s_in, s_out)}},
               "scores": {"msp": {"noise": {"id": s_in, "ood": s_out}}}}
    result = {"test": {"n": 800, "acc": float(correct.mean()), "ece": 0.1, "loss": 1.0}, "ood_sets": {"noise": 40},
              "ood": ood_res, "failure": fail}
    text = write_report(result, str(tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert "raw" not in saved["failure"] and saved["failure"]["scores"]["msp"]["aurc"] == fail["scores"]["msp"]["aurc"]
    assert "Failure detection on the test split" in text and (tmp_path / "results.md").read_text() == text
    png = (tmp_path / "risk_coverage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # REPORT_FILES (what eval.py says it wrote) names every file, and only those (no calibration block here)
    from lossbench.experiments.evaluate_run import REPORT_FILES
    assert {p.name for p in tmp_path.iterdir()} == set(REPORT_FILES) - {"reliability.png"}
    plot_risk_coverage(fail, str(tmp_path / "again.png"))


def test_every_score_with_a_pixel_step_gets_the_data_std():
    """i-ODIN took its step in normalised units under eval.py: every score whose constructor takes
    ``input_std`` must be in PIXEL_STEP_SCORES, so evaluate_model passes the normalisation std."""
    import inspect

    from lossbench.experiments.evaluate_run import PIXEL_STEP_SCORES
    from ood import list_scores
    from ood.registry import get_score_class

    takes_std = {n for n in list_scores() if "input_std" in inspect.signature(get_score_class(n)).parameters}
    assert takes_std and takes_std == set(PIXEL_STEP_SCORES)
