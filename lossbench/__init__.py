"""lossbench: classifier losses and heads, faithful to their papers, importable anywhere."""

from .registry import build_head, create_loss, list_losses, register_loss
from .losses import Head, LinearHead, LogitLoss
from .losses.energy_margin import EnergyMarginLoss  # auxiliary OOD term, not registered
from .losses.outlier_exposure import OutlierExposureLoss  # auxiliary OOD term, not registered
from .losses import FocalLoss, LogitNormLoss
from .losses import (  # the loss zoo
    CrammerSingerLoss, CrossEntropyLoss, GumbelSoftmaxLoss, GumbelTemperatureSchedule, L1SVMHead,
    L2SVMHead, NBCSoftmaxHead, NoisySoftmaxHead, WCDASHead, WestonWatkinsLoss, ZLoss,
    gumbel_softmax, log_partition_penalty, z_loss,
)
from .cce import (  # cut cross-entropy; importing it registers the 'cce' head
    CutCrossEntropyHead, linear_cross_entropy, linear_logsumexp, linear_max_softmax, linear_topk,
)

__all__ = [
    "build_head", "create_loss", "list_losses", "register_loss",
    "Head", "LinearHead", "LogitLoss", "EnergyMarginLoss", "OutlierExposureLoss", "FocalLoss", "LogitNormLoss",
    "CrammerSingerLoss", "CrossEntropyLoss", "GumbelSoftmaxLoss", "GumbelTemperatureSchedule",
    "L1SVMHead", "L2SVMHead", "NBCSoftmaxHead", "NoisySoftmaxHead", "WCDASHead", "WestonWatkinsLoss",
    "ZLoss", "gumbel_softmax", "log_partition_penalty", "z_loss",
    "CutCrossEntropyHead", "linear_cross_entropy", "linear_logsumexp", "linear_max_softmax",
    "linear_topk",
]
__version__ = "0.1.0"
