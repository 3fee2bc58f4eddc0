"""ood: out-of-distribution scores, metrics and reports for any classifier.

Convention everywhere: **a higher score means more in-distribution**. Every score has
``fit(model, loader)`` (a no-op where nothing is needed) and ``score(model, loader) -> (N,)``
float64, plus tensor-level twins (``score_logits``; ``fit_features`` / ``score_features``).
"""

from .evaluate import evaluate_ood
from .features import FeatureExtractor, penultimate_features
from .metrics import CONVENTIONS, ood_metrics
from .registry import create_score, list_scores, register_score
from .report import plot_histograms, plot_roc, write_markdown
from .scores import (
    MAHALANOBIS_EPS_GRID, ODIN_EPS_GRID, ODIN_TEMPERATURES, MSP, ODIN, Energy, LogitScore,
    Mahalanobis, MaxLogit, OODScore, fit_class_gaussian, mahalanobis_distances,
)

__all__ = [
    "evaluate_ood", "ood_metrics", "CONVENTIONS",
    "create_score", "list_scores", "register_score",
    "write_markdown", "plot_roc", "plot_histograms",
    "FeatureExtractor", "penultimate_features",
    "OODScore", "LogitScore", "MSP", "Energy", "MaxLogit", "ODIN", "Mahalanobis",
    "fit_class_gaussian", "mahalanobis_distances",
    "MAHALANOBIS_EPS_GRID", "ODIN_EPS_GRID", "ODIN_TEMPERATURES",
]
