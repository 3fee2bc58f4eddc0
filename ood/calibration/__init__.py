"""Calibration of a classifier's probabilities: the ECE family, Brier, NLL, accuracy, and post-hoc
calibrators (temperature, vector and matrix-ODIR scaling, histogram binning, isotonic regression).

A library module (torch only): import it without the trainer. Metrics take logits ``(N, C)`` (or
probabilities as ``probs=``, or with ``from_probs=True``) and labels ``(N,)`` and return floats;
:class:`TemperatureScaling` is the post-hoc fix (``fit`` on validation logits, ``transform`` test logits);
:class:`VectorScaling`, :class:`MatrixScaling`, :class:`HistogramBinning` and :class:`IsotonicCalibration`
share that interface (``transform`` returns logits or log-probabilities: apply softmax).
"""

from .metrics import (
    accuracy, adaptive_calibration_error, brier_score, calibration_metrics, classwise_calibration_error,
    expected_calibration_error, maximum_calibration_error, negative_log_likelihood, reliability_bins,
)
from .temperature import TemperatureScaling, fit_temperature
from .scaling import MatrixScaling, VectorScaling, odir_grid
from .binning import HistogramBinning, IsotonicCalibration

__all__ = [
    "accuracy", "adaptive_calibration_error", "brier_score", "calibration_metrics", "classwise_calibration_error",
    "expected_calibration_error", "maximum_calibration_error", "negative_log_likelihood", "reliability_bins",
    "TemperatureScaling", "fit_temperature", "VectorScaling", "MatrixScaling", "odir_grid", "HistogramBinning",
    "IsotonicCalibration",
]
