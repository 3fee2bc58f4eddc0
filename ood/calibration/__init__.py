"""Calibration of a classifier's probabilities: the ECE family, Brier, NLL, accuracy, temperature scaling.

A library module (torch only): import it without the trainer. Metrics take logits ``(N, C)`` (or
probabilities as ``probs=``, or with ``from_probs=True``) and labels ``(N,)`` and return floats;
:class:`TemperatureScaling` is the post-hoc fix (``fit`` on validation logits, ``transform`` test logits).
"""

from .metrics import (
    accuracy, adaptive_calibration_error, brier_score, calibration_metrics, classwise_calibration_error,
    expected_calibration_error, maximum_calibration_error, negative_log_likelihood, reliability_bins,
)
from .temperature import TemperatureScaling, fit_temperature

__all__ = [
    "accuracy", "adaptive_calibration_error", "brier_score", "calibration_metrics", "classwise_calibration_error",
    "expected_calibration_error", "maximum_calibration_error", "negative_log_likelihood", "reliability_bins",
    "TemperatureScaling", "fit_temperature",
]
