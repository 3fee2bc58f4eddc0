"""Every loss and head; importing this package registers them all."""

from .base import Head, LinearHead, LogitLoss
from .cross_entropy import CrossEntropyLoss, log_partition_penalty
from .energy_margin import EnergyMarginLoss
from .focal import FocalLoss, flsd53_gamma, focal_loss
from .gumbel_softmax import (
    GumbelSoftmaxLoss, GumbelTemperatureSchedule, gumbel_softmax, gumbel_softmax_from_noise, sample_gumbel,
)
from .logitnorm import LogitNormLoss, logit_norm
from .nbc_softmax import NBCSoftmaxHead, nbc_loss
from .noisy_softmax import NoisySoftmaxHead, noisy_target_logits
from .outlier_exposure import OutlierExposureLoss, uniform_cross_entropy
from .svm import (
    CrammerSingerLoss, L1SVMHead, L2SVMHead, WestonWatkinsLoss, crammer_singer_loss, one_vs_rest_hinge,
    weston_watkins_loss,
)
from .wcdas import WCDASHead, wrapped_cauchy_logits
from .z_loss import ZLoss, z_loss, z_normalize

__all__ = [
    "Head", "LinearHead", "LogitLoss",
    "CrossEntropyLoss", "log_partition_penalty",
    "EnergyMarginLoss", "OutlierExposureLoss", "uniform_cross_entropy",
    "FocalLoss", "flsd53_gamma", "focal_loss",
    "LogitNormLoss", "logit_norm",
    "GumbelSoftmaxLoss", "GumbelTemperatureSchedule", "gumbel_softmax", "gumbel_softmax_from_noise",
    "sample_gumbel",
    "NBCSoftmaxHead", "nbc_loss",
    "NoisySoftmaxHead", "noisy_target_logits",
    "CrammerSingerLoss", "L1SVMHead", "L2SVMHead", "WestonWatkinsLoss", "crammer_singer_loss",
    "one_vs_rest_hinge", "weston_watkins_loss",
    "WCDASHead", "wrapped_cauchy_logits",
    "ZLoss", "z_loss", "z_normalize",
]
