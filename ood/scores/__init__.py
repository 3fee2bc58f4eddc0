"""Every OOD score; importing this package registers them all. Higher score = more in-distribution."""

from .base import LogitScore, OODScore
from .energy import Energy
from .mahalanobis import (
    MAHALANOBIS_EPS_GRID, Mahalanobis, fit_class_gaussian, mahalanobis_distances,
)
from .maxlogit import MaxLogit
from .msp import MSP
from .odin import ODIN, ODIN_EPS_GRID, ODIN_TEMPERATURES
from .feature_base import (
    Classifier, FeatureData, FeatureScore, ScoreNotApplicable, collect_features, resolve_classifier,
)
from .react import ReAct
from .ash import ash_b, ash_p, ash_s
from .ash_b import ASHB
from .ash_p import ASHP
from .ash_s import ASHS
from .scale import SCALE
from .knn import KNN
from .vim import ViM
from .gen import GEN
from .kl_matching import KLMatching
from .mds import MDS
from .rmds import RMDS
from .dice import DICE
from .gradnorm import GradNorm, gradnorm_closed_form
from .she import SHE
from .fdbd import FDBD
from .nnguide import NNGuide
from .relation import Relation
from .mds_norm import MDSNorm, RMDSNorm
from .nci import NCI
from .vra import VRA
from .adascale import ADASCALE_GRID, ADASCALE_OFFICIAL_GRID, AdaSCALEA, AdaSCALEL
from .iodin import IODIN
from .weiper import WEIPER_GRID, WeiPer
from .rankfeat import RankFeat
from .gram import GRAM
from .nac import NAC

__all__ = [
    "OODScore", "LogitScore", "MSP", "Energy", "MaxLogit", "ODIN", "Mahalanobis",
    "fit_class_gaussian", "mahalanobis_distances",
    "MAHALANOBIS_EPS_GRID", "ODIN_EPS_GRID", "ODIN_TEMPERATURES",
    "FeatureScore", "FeatureData", "Classifier", "ScoreNotApplicable", "collect_features", "resolve_classifier",
    "ReAct", "ASHP", "ASHB", "ASHS", "ash_p", "ash_b", "ash_s", "SCALE", "KNN", "ViM", "GEN",
    "KLMatching", "MDS", "RMDS", "DICE", "GradNorm", "gradnorm_closed_form", "SHE", "FDBD",
    "NNGuide", "Relation", "MDSNorm", "RMDSNorm", "NCI", "VRA", "AdaSCALEA", "AdaSCALEL",
    "ADASCALE_GRID", "ADASCALE_OFFICIAL_GRID", "IODIN", "WeiPer", "WEIPER_GRID", "RankFeat", "GRAM", "NAC",
]
