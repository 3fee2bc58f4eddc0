"""Gumbel-softmax (Jang, Gu & Poole, ICLR 2017): safe Gumbel sampling, relaxed and straight-through
samples, the paper's temperature schedule, and a classification loss that trains through the samples."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_float, check_logits_target, check_positive, compute_dtype
from .base import LogitLoss
from ._common import check_int, check_reduction, reduce_loss

__all__ = [
    "GumbelSoftmaxLoss", "GumbelTemperatureSchedule", "gumbel_softmax",
    "gumbel_softmax_from_noise", "sample_gumbel",
]


def sample_gumbel(
    shape: Union[Sequence[int], torch.Size],
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Standard Gumbel draws ``g = -log(-log u)``, always finite.

    u ~ U(0, 1) is drawn in float32 (float64 stays float64) and clamped to
    ``[tiny, 1 - eps/2]`` (the smallest normal number and the largest float below 1), so
    neither log sees 0 (``torch.rand`` can return exactly 0) and g lies in about [-4.5, 16.6]
    for float32. With ``generator`` the draw is reproducible and independent of the global RNG.
    """
    work = compute_dtype(dtype)
    finfo = torch.finfo(work)
    gen_device = generator.device if generator is not None else device
    u = torch.rand(tuple(shape), generator=generator, dtype=work, device=gen_device)
    u = u.clamp(min=finfo.tiny, max=1.0 - finfo.eps / 2)
    g = -torch.log(-torch.log(u))
    return g.to(device=device if device is not None else g.device, dtype=dtype)


def _check_gumbel_logits(logits: Tensor) -> None:
    check_float(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (category) dimension, got {tuple(logits.shape)}")
    if bool(torch.isnan(logits).any()) or bool((logits == float("inf")).any()):
        raise ValueError("logits contains NaN or +inf; expected finite values or -inf (masked categories)")
    if logits.numel() and bool((logits == float("-inf")).all(dim=-1).any()):
        raise ValueError("logits has a row where every category is -inf; at least one must be finite")


def gumbel_softmax_from_noise(
    logits: Tensor, gumbels: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1
) -> Tensor:
    """Gumbel-softmax sample for given Gumbel noise: ``softmax((logits + g) / tau)``.

    Jang, Gu & Poole 2017 (arXiv:1611.01144), eq. (1)-(2); ``logits`` are unnormalised log
    probabilities log pi (up to a constant). ``hard=True`` is the straight-through estimator
    (Sec. 2.2): the forward value is the one-hot of the argmax, the gradient that of the relaxed
    sample. ``-inf`` logits (masked categories) get probability 0 and zero gradient, not NaN.
    Computed in float32 (float64 stays float64) and returned in that dtype. Shape preserved.
    """
    check_positive(float(tau), "tau")
    work = compute_dtype(logits)
    y = torch.softmax((logits.to(work) + gumbels.to(work)) / tau, dim=dim)
    if not hard:
        return y
    index = y.argmax(dim=dim, keepdim=True)
    y_hard = torch.zeros_like(y).scatter_(dim, index, 1.0)
    return y_hard - y.detach() + y


def gumbel_softmax(
    logits: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Relaxed (or straight-through, ``hard=True``) Gumbel-softmax sample of ``logits``.

    Jang, Gu & Poole 2017: y = softmax((log pi + g) / tau), g_i = -log(-log u_i), u ~ U(0, 1),
    with the safe sampler :func:`sample_gumbel`. Accepts ``-inf`` logits (masked categories);
    rejects NaN, ``+inf`` and all-masked rows. Shape preserved; float32 (or float64) out.
    """
    _check_gumbel_logits(logits)
    g = sample_gumbel(logits.shape, compute_dtype(logits), logits.device, generator)
    return gumbel_softmax_from_noise(logits, g, tau, hard, dim)


class GumbelTemperatureSchedule:
    """Temperature ``tau(t) = max(tau_min, tau0 * exp(-rate * t_k))``, ``t_k = every * floor(t / every)``.

    Jang, Gu & Poole 2017 (arXiv:1611.01144), Sec. 4: tau = max(0.5, exp(-r t)) re-set every N steps,
    r in {1e-5, 1e-4}, N in {500, 1000} (semi-supervised run: r = 3e-5 every 2000 steps).
    Defaults tau0 = 1, tau_min = 0.5, rate = 1e-4, every = 1000 (from that grid).
    """

    def __init__(self, tau0: float = 1.0, rate: float = 1e-4, every: int = 1000, tau_min: float = 0.5) -> None:
        check_positive(float(tau0), "tau0")
        check_positive(float(rate), "rate", allow_zero=True)
        check_positive(float(tau_min), "tau_min")
        self.tau0, self.rate, self.tau_min = float(tau0), float(rate), float(tau_min)
        self.every = check_int(every, "every")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        t = (int(step) // self.every) * self.every
        return max(self.tau_min, self.tau0 * math.exp(-self.rate * t))

    def __repr__(self) -> str:
        return (f"GumbelTemperatureSchedule(tau0={self.tau0}, rate={self.rate}, every={self.every}, "
                f"tau_min={self.tau_min})")


@register_loss("gumbel_softmax", kind="logits")
class GumbelSoftmaxLoss(LogitLoss):
    """Classification loss trained through Gumbel-softmax samples of the class distribution.

    In training mode, with y the Gumbel-softmax sample of ``logits`` at temperature tau
    (Jang, Gu & Poole 2017):

    * ``hard=False``: loss_i = -log y_{i, t_i}, the cross-entropy of the relaxed sample
      (= ``F.cross_entropy((logits + g) / tau, t)``, computed stably in log space);
    * ``hard=True`` (straight-through): loss_i = 1 - y^ST_{i, t_i}, the 0/1 error of the
      one-hot sample in the forward pass, with the relaxed sample's gradient.

    In eval mode the noise is left out (g = 0), so the loss is deterministic. tau follows
    :class:`GumbelTemperatureSchedule` and is advanced by ``on_step(step)``; ``anneal=False``
    keeps ``tau`` fixed. With ``anneal=True`` a ``tau`` below ``tau_min`` is a ``ValueError`` (the
    schedule's floor would silently override it at step 0). Noise comes from torch's global RNG, or from ``generator`` if given.
    The paper has no supervised classification loss; this one is ours, built from its sampler.

    Shapes: logits ``(N, C)``, target ``(N,)`` -> scalar, or ``(N,)`` with ``'none'``.
    """

    def __init__(
        self,
        tau: float = 1.0,
        tau_min: float = 0.5,
        anneal_rate: float = 1e-4,
        anneal_every: int = 1000,
        anneal: bool = True,
        hard: bool = False,
        reduction: str = "mean",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        check_positive(float(tau), "tau")
        check_positive(float(tau_min), "tau_min")
        if anneal and float(tau) < float(tau_min):
            raise ValueError(
                f"tau ({tau}) is below tau_min ({tau_min}): the annealing schedule max(tau_min, ...) would "
                "raise it to tau_min at the first step; pass tau_min <= tau, or anneal=False to keep tau fixed")
        self.schedule = GumbelTemperatureSchedule(tau, anneal_rate, anneal_every, min(float(tau_min), float(tau)))
        self.tau = float(tau)
        self.anneal = bool(anneal)
        self.hard = bool(hard)
        self.reduction = check_reduction(reduction)
        self.generator = generator

    def on_step(self, step: int) -> None:
        """Set ``tau`` to the schedule's value at optimisation step ``step``."""
        if self.anneal:
            self.tau = self.schedule(step)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = check_logits_target(logits, target)
        work = compute_dtype(logits)
        x = logits.to(work)
        if self.training:
            x = x + sample_gumbel(x.shape, work, x.device, self.generator)
        if self.hard:
            y = gumbel_softmax_from_noise(x, torch.zeros_like(x), self.tau, hard=True)
            per_sample = 1.0 - y.gather(1, target.unsqueeze(1)).squeeze(1)
        else:
            per_sample = F.cross_entropy(x / self.tau, target, reduction="none")
        return reduce_loss(per_sample, self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, schedule={self.schedule}, anneal={self.anneal}, hard={self.hard}"
