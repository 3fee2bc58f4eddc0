"""Every OOD score; importing this package registers them all. Higher score = more in-distribution."""

from .base import LogitScore, OODScore
from .energy import Energy
from .mahalanobis import (
    MAHALANOBIS_EPS_GRID, Mahalanobis, fit_class_gaussian, mahalanobis_distances,
)
from .maxlogit import MaxLogit
from .msp import MSP
from .odin import ODIN, ODIN_EPS_GRID, ODIN_TEMPERATURES

__all__ = [
    "OODScore", "LogitScore", "MSP", "Energy", "MaxLogit", "ODIN", "Mahalanobis",
    "fit_class_gaussian", "mahalanobis_distances",
    "MAHALANOBIS_EPS_GRID", "ODIN_EPS_GRID", "ODIN_TEMPERATURES",
]
