"""LogitNorm (Wei et al., ICML 2022): cross-entropy on L2-normalised, temperature-scaled logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_logits_target, check_positive, compute_dtype
from .base import LogitLoss
from ._common import check_reduction, row_scale

__all__ = ["LogitNormLoss", "logit_norm"]


def logit_norm(logits: Tensor, tau: float = 0.04, eps: float = 1e-7) -> Tensor:
    """Normalised logits ``z / (tau * (||z||_2 + eps))`` per row, in float32 (float64 stays float64).

    The ``eps`` is added to the norm, as in the official code (hongxin001/logitnorm_ood,
    ``common/loss_function.py``: ``norms = torch.norm(x, p=2, dim=-1, keepdim=True) + 1e-7``).
    Evaluated as ``y / (tau * (||y|| + eps / m))`` with ``y = z / m``, ``m = max_c |z_c|`` (detached):
    the same value and gradient, but the squares cannot overflow (float32 ``||z||`` is ``inf`` once an
    entry passes ~1.8e19, and ``z / inf`` would make every such row a constant loss).
    Shapes: ``(N, C)`` -> ``(N, C)``.
    """
    z = logits.to(compute_dtype(logits))
    with torch.autocast(z.device.type, enabled=False):
        m = row_scale(z)
        y = z / m
        return y / (tau * (torch.linalg.vector_norm(y, dim=1, keepdim=True) + eps / m))


@register_loss("logitnorm", kind="logits")
class LogitNormLoss(LogitLoss):
    """LogitNorm loss: ``CE(z / (tau (||z||_2 + eps)), y)``.

    Wei, Xie, Cheng, Feng, An & Li, "Mitigating Neural Network Overconfidence with Logit
    Normalization", ICML 2022 (arXiv:2205.09310), eq. (5)-(6). Training only: at test time the
    raw logits are used (the maintainer's answer in the official repository's issue #1), so
    :meth:`~lossbench.losses.base.LinearHead.logits` and every OOD score see ``z``, not its normalised
    version. Defaults: ``tau = 0.04``, the CIFAR-10 value of the paper and of OpenOOD's
    ``train_logitnorm.yml`` (the official README's example command uses ``--temp 0.01``; the
    author recommends 0.0085 for CIFAR-100 -- smaller tau for more classes); ``eps = 1e-7``
    added to the norm as in the official code. Since ``||z / (tau ||z||)|| = 1/tau``, the loss
    is bounded below by ``CE`` at logit norm 25 (tau = 0.04) whatever the scale of ``z``.

    Shapes: logits ``(N, C)``, target ``(N,)`` -> scalar (``'mean'``/``'sum'``) or ``(N,)`` (``'none'``).
    """

    def __init__(self, tau: float = 0.04, eps: float = 1e-7, reduction: str = "mean") -> None:
        super().__init__()
        check_positive(float(tau), "tau")
        check_positive(float(eps), "eps", allow_zero=True)
        self.tau, self.eps = float(tau), float(eps)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = check_logits_target(logits, target)
        return F.cross_entropy(logit_norm(logits, self.tau, self.eps), target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, eps={self.eps}, reduction={self.reduction!r}"
