"""ood: out-of-distribution scores, calibration and metrics for any PyTorch classifier.

A library (torch + scikit-learn): it never imports timm or the lossbench training framework.
Convention everywhere: **a higher score means more in-distribution**. Every score has
``fit(model, loader)`` (a no-op where nothing is needed) and ``score(model, loader) -> (N,)``
float64, plus tensor-level twins (``score_logits``; ``fit_features`` / ``score_features``).
Failure detection (is this prediction right?) is scored by :mod:`ood.failure` (AURC, AUGRC, ...).
"""

from .adapter import AdaptedClassifier, adapt_classifier
from .evaluate import FeaturePasses, evaluate_ood
from .feature_cache import FeatureCache
from .features import FeatureExtractor, penultimate_features
from .stages import Stages, find_stages
from .metrics import CONVENTIONS, ood_metrics
from .failure import (
    aurc, augrc, aurc_optimal, coverage_at_risk, eaurc, failure_metrics, risk_at_coverage, risk_coverage_curve,
)
from .registry import create_score, list_scores, register_score
from .search import grid_of, grid_points, group_means, search_score
from .calibration import (
    HistogramBinning, IsotonicCalibration, MatrixScaling, TemperatureScaling, VectorScaling,
    adaptive_calibration_error, brier_score, calibration_metrics, classwise_calibration_error,
    expected_calibration_error, fit_temperature, maximum_calibration_error, negative_log_likelihood,
    reliability_bins,
)
from .scores import (
    MAHALANOBIS_EPS_GRID, ODIN_EPS_GRID, ODIN_TEMPERATURES, MSP, ODIN, Energy, LogitScore,
    Mahalanobis, MaxLogit, OODScore, fit_class_gaussian, mahalanobis_distances,
    ASHB, ASHP, ASHS, DICE, FDBD, GEN, KNN, MDS, RMDS, SCALE, SHE, Classifier, FeatureData,
    FeatureScore, GradNorm, KLMatching, NNGuide, ReAct, Relation, ScoreNotApplicable, ViM,
    collect_features, resolve_classifier,
    MDSNorm, RMDSNorm, NCI, VRA, AdaSCALEA, AdaSCALEL, IODIN, WeiPer, RankFeat, GRAM, NAC,
)

__all__ = [
    "adapt_classifier", "AdaptedClassifier", "evaluate_ood", "FeaturePasses", "ood_metrics", "CONVENTIONS", "FeatureCache",
    "aurc", "augrc", "eaurc", "aurc_optimal", "risk_at_coverage", "coverage_at_risk", "failure_metrics",
    "risk_coverage_curve",
    "create_score", "list_scores", "register_score", "grid_of", "grid_points", "group_means", "search_score",
    "expected_calibration_error", "adaptive_calibration_error", "classwise_calibration_error",
    "maximum_calibration_error", "brier_score", "negative_log_likelihood", "calibration_metrics",
    "reliability_bins", "TemperatureScaling", "fit_temperature", "VectorScaling", "MatrixScaling",
    "HistogramBinning", "IsotonicCalibration",
    "FeatureExtractor", "penultimate_features", "Stages", "find_stages",
    "OODScore", "LogitScore", "MSP", "Energy", "MaxLogit", "ODIN", "Mahalanobis",
    "fit_class_gaussian", "mahalanobis_distances",
    "MAHALANOBIS_EPS_GRID", "ODIN_EPS_GRID", "ODIN_TEMPERATURES",
    "FeatureScore", "FeatureData", "Classifier", "ScoreNotApplicable", "collect_features",
    "resolve_classifier", "ReAct", "ASHP", "ASHB", "ASHS", "SCALE", "KNN", "ViM", "GEN",
    "KLMatching", "MDS", "RMDS", "DICE", "GradNorm", "SHE", "FDBD", "NNGuide", "Relation",
    "MDSNorm", "RMDSNorm", "NCI", "VRA", "AdaSCALEA", "AdaSCALEL", "IODIN", "WeiPer", "RankFeat", "GRAM", "NAC",
]
