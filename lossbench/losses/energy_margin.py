"""Energy-bounded fine-tuning term with an auxiliary outlier set (Liu et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_finite, check_float, check_number, check_positive, compute_dtype


class EnergyMarginLoss(nn.Module):
    """Squared-hinge energy margins: ``w * (relu(E_in - m_in)^2.mean() + relu(m_out - E_out)^2.mean())``.

    Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, eq. (6),
    with ``E(x) = -logsumexp(f(x))`` (T = 1). An auxiliary term added to the classification loss
    during fine-tuning: it pushes in-distribution energies below ``m_in`` and outlier energies
    above ``m_out``. Form and defaults follow the official code (wetliu/energy_ood
    ``CIFAR/train.py``: ``0.1 * (relu(Ec_in - m_in)^2.mean() + relu(m_out - Ec_out)^2.mean())``)
    and its run script ``CIFAR/run.sh``: ``m_in = -23, m_out = -5`` for CIFAR-10
    (``-27 / -5`` for CIFAR-100), weight 0.1. Note: the paper text swaps the names of the two
    margins, and ``train.py``'s own argparse defaults are -25 / -7; we use the run script's.

    Not a classification loss (not in the loss registry). ``logits_in`` ``(N_in, C)``,
    ``logits_out`` ``(N_out, C)`` -> scalar, computed and returned in float32 (float64 if either
    input is float64); never cast back to fp16, whose range the squared margins easily exceed.
    Empty inputs are a ``ValueError``.
    """

    def __init__(self, m_in: float = -23.0, m_out: float = -5.0, weight: float = 0.1):
        super().__init__()
        check_positive(float(weight), "weight", allow_zero=True)
        check_number(m_in, "m_in")
        check_number(m_out, "m_out")
        if float(m_in) > float(m_out):
            raise ValueError(f"m_in ({m_in}) must be <= m_out ({m_out}): ID energies sit below outliers'")
        self.m_in = float(m_in)
        self.m_out = float(m_out)
        self.weight = float(weight)

    def on_step(self, step: int) -> None:
        """No schedule (kept for the trainer's uniform hook)."""

    @staticmethod
    def energy(logits: Tensor) -> Tensor:
        """``E = -logsumexp(logits)`` per row, ``(N,)``."""
        return -torch.logsumexp(logits, dim=1)

    def forward(self, logits_in: Tensor, logits_out: Tensor) -> Tensor:
        for name, t in (("logits_in", logits_in), ("logits_out", logits_out)):
            check_float(t, name, ndim=2)
            if t.shape[0] == 0:
                raise ValueError(f"{name} is empty; expected at least one sample")
            check_finite(t, name)
        if logits_in.shape[1] != logits_out.shape[1]:
            raise ValueError(
                f"logits_in and logits_out must have the same number of classes, got "
                f"{logits_in.shape[1]} and {logits_out.shape[1]}")
        work = torch.promote_types(compute_dtype(logits_in), compute_dtype(logits_out))
        e_in = self.energy(logits_in.to(work))
        e_out = self.energy(logits_out.to(work))
        loss = F.relu(e_in - self.m_in).pow(2).mean() + F.relu(self.m_out - e_out).pow(2).mean()
        return self.weight * loss

    def extra_repr(self) -> str:
        return f"m_in={self.m_in}, m_out={self.m_out}, weight={self.weight}"
