"""WCDAS (Han, ICML 2023): wrapped-Cauchy distributed angular softmax head."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_features, check_number, check_positive, check_target, compute_dtype
from .base import Head
from ._common import clamped_normalize

#: Default floor of the feature / weight norms: rows are divided by ``max(||x||, norm_eps)``.
NORM_EPS = 1e-3

__all__ = ["WCDASHead", "wrapped_cauchy_logits"]


def wrapped_cauchy_logits(
    features: Tensor, weight: Tensor, g: Tensor, scale: Tensor, rho_eps: float = 1e-6,
    norm_eps: float = NORM_EPS,
) -> Tensor:
    """Wrapped-Cauchy kernel logits ``s (1 - rho_c^2) / (2 pi (1 + rho_c^2 - 2 rho_c cos theta_c))``.

    Han, "Wrapped Cauchy Distributed Angular Softmax for Long-Tailed Visual Recognition",
    ICML 2023, eq. of the WCDAS logit; official code boranhan/WCDAS_code ``models/Loss.py``
    (class ``WCDAS``). cos theta_c = <x/||x||, w_c/||w_c||>, rho_c = sigmoid(g_c).
    Evaluated in float32 (float64 stays float64) with autocast off, in the algebraically equal,
    cancellation-free form s (1-rho)(1+rho) / (2 pi ((1-rho)^2 + 2 rho (1 - cos theta))),
    where 1 - rho = sigmoid(-g) is clamped to >= ``rho_eps`` (rho < 1 always; in low precision
    rho rounds to 1 and the official form gives 0/0) and 1 - cos theta is clamped to >= 0.
    The official code writes 3.14 for pi (a 0.05 % rescale of s); we use pi.

    Norms: feature and weight rows are divided by ``max(||x||, norm_eps)`` (``F.normalize``'s
    clamp, as the official code's ``F.normalize``, but with ``norm_eps = 1e-3`` instead of its
    1e-12), computed without overflow (:func:`~lossbench.losses._common.clamped_normalize`: rows
    with entries past ~1.8e19 no longer give ``x / inf = 0``). The clamp bounds the gradient to a
    feature row by ``1 / norm_eps`` times the gradient to its unit vector: with 1e-12 a row of norm
    1e-9 got a gradient ~1e7 times that of a unit row. A row shorter than ``norm_eps`` (e.g. an
    all-zero ReLU output: cos theta = 0 to every class) is no longer scale-free (its cosines shrink
    with its norm); penultimate features are normally orders of magnitude longer -- lower
    ``norm_eps`` for a model whose features are not.

    Shapes: features ``(N, D)``, weight ``(C, D)``, g ``(C,)``, scale scalar -> ``(N, C)``.
    """
    dtype = compute_dtype(features)
    with torch.autocast(features.device.type, enabled=False):
        x = clamped_normalize(features.to(dtype), norm_eps)
        w = clamped_normalize(weight.to(dtype), norm_eps)
        one_minus_cos = (1.0 - x @ w.t()).clamp_min(0.0)
        g = g.to(dtype)
        one_minus_rho = torch.sigmoid(-g).clamp_min(rho_eps)
        rho = 1.0 - one_minus_rho
        numerator = one_minus_rho * (1.0 + rho)
        denominator = 2.0 * math.pi * (one_minus_rho.square() + 2.0 * rho * one_minus_cos)
        return scale.to(dtype) * numerator / denominator


@register_loss("wcdas", kind="head")
class WCDASHead(Head):
    """Wrapped-Cauchy angular softmax head (Han, ICML 2023; official code boranhan/WCDAS_code).

    logit_c = s * (1 - rho_c^2) / (2 pi (1 + rho_c^2 - 2 rho_c cos theta_c)),
    rho_c = sigmoid(g_c), loss = CE(logits, y)

    One closed-form wrapped-Cauchy kernel per class, no bias, no logit adjustment, as in the
    official code. Parameters: ``weight`` (C, D) with ``nn.Linear``'s default init; ``g`` (C,)
    initialised to ``g_init`` (official configs: 0 for CIFAR-LT -- our default --, -1 for
    ImageNet-LT, +1 for iNaturalist); scale s = softplus(s') + 1 with s' trainable from 0
    (s0 = 1 + log 2 ~ 1.69) when ``s_trainable=True``, else the fixed ``s`` (the official code
    hard-codes 250, used in its iNaturalist config). Computed in float32 even under autocast,
    with rho kept below 1 and the feature / weight norms floored at ``norm_eps`` (default 1e-3,
    which bounds the gradient of a near-zero feature row; see :func:`wrapped_cauchy_logits`). The
    paper's two-stage recipe (re-train the head on a frozen backbone with class-balanced sampling)
    is the trainer's job.

    Optimiser recipe (:meth:`optim_settings`): s' is one scalar that must travel from 0 to tens
    or hundreds (the official code trains everything with SGD at lr 0.2-0.4, or fixes s = 250).
    Under Adam-type optimisers a parameter moves by about its lr per step, so at a network lr of
    2e-3 s stays near 2 and the softmax stays nearly uniform. The head therefore declares a peak
    lr of ``scale_lr`` (default 1.0) for s', whatever the network's lr, and no weight decay on
    s' and g; ``scale_lr=None`` gives s' the network's lr (the official SGD recipe). The 1.0
    comes from a head-only measurement on fixed features (AdamW at 2e-3, 150 steps; see the
    README), not from the paper.

    Shapes: features ``(N, in_features)``, target ``(N,)`` -> scalar loss;
    ``logits(features)`` -> ``(N, num_classes)`` float32.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        g_init: float = 0.0,
        s_trainable: bool = True,
        s: float = 250.0,
        rho_eps: float = 1e-6,
        scale_lr: Optional[float] = 1.0,
        norm_eps: float = NORM_EPS,
    ) -> None:
        super().__init__(in_features, num_classes)
        if scale_lr is not None:
            check_positive(float(scale_lr), "scale_lr")
        self.scale_lr = None if scale_lr is None else float(scale_lr)
        check_positive(float(s), "s")
        check_number(g_init, "g_init")
        check_positive(float(rho_eps), "rho_eps")
        if not float(rho_eps) < 1.0:
            raise ValueError(f"rho_eps must be < 1, got {rho_eps}")
        check_positive(float(norm_eps), "norm_eps")
        self.s_trainable = bool(s_trainable)
        self.rho_eps, self.norm_eps = float(rho_eps), float(norm_eps)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear (official: nn.Linear subclass)
        self.g = nn.Parameter(torch.full((self.num_classes,), float(g_init)))
        if self.s_trainable:
            self.s_raw = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("s_fixed", torch.tensor(float(s)))

    def optim_settings(self) -> Dict[str, Dict[str, float]]:
        """No weight decay on g and s'; s' at peak lr ``scale_lr`` (see the class docstring)."""
        out: Dict[str, Dict[str, float]] = {"g": {"weight_decay": 0.0}}
        if self.s_trainable:
            out["s_raw"] = {"weight_decay": 0.0} if self.scale_lr is None else {"lr": self.scale_lr, "weight_decay": 0.0}
        return out

    @property
    def scale(self) -> Tensor:
        """The logit scale s (softplus(s') + 1, or the fixed s)."""
        return F.softplus(self.s_raw) + 1.0 if self.s_trainable else self.s_fixed

    @property
    def rho(self) -> Tensor:
        """Per-class concentrations rho_c = sigmoid(g_c), capped at 1 - rho_eps."""
        return 1.0 - torch.sigmoid(-self.g.float()).clamp_min(self.rho_eps)

    def logits(self, features: Tensor) -> Tensor:
        self.check_features(features)
        return wrapped_cauchy_logits(features, self.weight, self.g, self.scale, self.rho_eps, self.norm_eps)

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        check_features(features, self.in_features, "features")
        target = check_target(target, self.num_classes, features.shape[0])
        return F.cross_entropy(self.logits(features), target)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"s_trainable={self.s_trainable}, rho_eps={self.rho_eps}, norm_eps={self.norm_eps}")
