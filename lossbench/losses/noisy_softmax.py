"""Noisy softmax (Chen, Deng & Du, CVPR 2017): annealed noise on the target logit during training."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_features, check_positive, check_target, compute_dtype
from .base import Head
from ._common import check_reduction, linear

__all__ = ["NoisySoftmaxHead", "noisy_target_logits"]


def noisy_target_logits(
    features: Tensor,
    weight: Tensor,
    target: Tensor,
    xi: Tensor,
    alpha: float = 0.1,
    grad_through_noise: bool = True,
) -> Tensor:
    """Bias-free logits ``f = x W^T`` with the target logit replaced by its noisy version.

    Chen, Deng & Du, "Noisy Softmax", CVPR 2017 (arXiv:1708.03769), Sec. 3:
    f_y' = f_y - alpha * ||W_y|| ||x|| (1 - cos theta_y) |xi|. Since
    ||W_y|| ||x|| (1 - cos theta_y) = ||W_y|| ||x|| - f_y >= 0 the noise only lowers the target
    logit, and vanishes as x aligns with W_y ("annealed" noise). The amplitude is computed in
    float32 (float64 stays float64); ``grad_through_noise=False`` detaches it.

    Shapes: features ``(N, D)``, weight ``(C, D)``, target ``(N,)``, xi ``(N,)`` (the draws
    xi ~ N(0, sigma^2), one per example) -> logits ``(N, C)`` in float32 (or float64).
    """
    dtype = compute_dtype(features)
    target = target.long()
    logits = linear(features, weight).to(dtype)
    x = features.to(dtype)
    w_y = weight.to(dtype).index_select(0, target)
    # ||W_y|| ||x|| (1 - cos theta_y) = ||W_y|| ||x|| - <W_y, x>, both in float32.
    amplitude = (w_y.norm(dim=1) * x.norm(dim=1) - (w_y * x).sum(dim=1)).clamp_min(0)
    if not grad_through_noise:
        amplitude = amplitude.detach()
    delta = -alpha * amplitude * xi.to(dtype).abs()
    return logits.scatter_add(1, target.unsqueeze(1), delta.unsqueeze(1))


@register_loss("noisy_softmax", kind="head")
class NoisySoftmaxHead(Head):
    """Bias-free linear head trained with noisy softmax (Chen, Deng & Du, CVPR 2017).

    Training (``self.training``): loss = CE(f', y) with f' from :func:`noisy_target_logits`,
    xi ~ N(0, sigma^2) drawn per example from torch's global RNG, or from ``generator`` when
    given. Eval mode and :meth:`logits`: the plain logits ``f = x W^T`` (no noise).

    Defaults: ``alpha=0.1`` (the paper's best value in its alpha sweep); ``sigma=1`` (the
    natural reading of xi ~ N(0, sigma^2); not confirmed by the paper); ``grad_through_noise=True``
    (differentiate the noisy logit as written, amplitude included -- the sources do not settle
    it). The noise anneals by itself as training aligns x with W_y: no time schedule, so
    ``on_step`` does nothing.

    Shapes: features ``(N, in_features)``, target ``(N,)`` -> scalar loss;
    ``logits(features)`` -> ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        alpha: float = 0.1,
        sigma: float = 1.0,
        grad_through_noise: bool = True,
        reduction: str = "mean",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, num_classes)
        check_positive(float(alpha), "alpha", allow_zero=True)
        check_positive(float(sigma), "sigma", allow_zero=True)
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.grad_through_noise = bool(grad_through_noise)
        self.reduction = check_reduction(reduction)
        self.generator = generator
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init

    def logits(self, features: Tensor) -> Tensor:
        self.check_features(features)
        return linear(features, self.weight)

    def draw_noise(self, n: int, device: torch.device) -> Tensor:
        """xi ~ N(0, sigma^2), shape ``(n,)``, float32, from ``generator`` or the global RNG."""
        gen_device = self.generator.device if self.generator is not None else device
        xi = torch.randn(n, generator=self.generator, device=gen_device, dtype=torch.float32)
        return (xi * self.sigma).to(device)

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        check_features(features, self.in_features, "features")
        target = check_target(target, self.num_classes, features.shape[0])
        if not self.training or self.alpha == 0.0:
            logits = self.logits(features)
            logits = logits.to(compute_dtype(logits))
            return F.cross_entropy(logits, target, reduction=self.reduction)
        xi = self.draw_noise(features.shape[0], features.device)
        logits = noisy_target_logits(
            features, self.weight, target, xi, self.alpha, self.grad_through_noise
        )
        return F.cross_entropy(logits, target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, alpha={self.alpha}, "
            f"sigma={self.sigma}, grad_through_noise={self.grad_through_noise}"
        )
