"""Temperature scaling (Guo et al., ICML 2017): one temperature T fitted by minimising the NLL."""

from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._inputs import to_probs

__all__ = ["TemperatureScaling", "fit_temperature"]


def check_temperature_bounds(t_min: float, t_max: float) -> Tuple[float, float]:
    """``t_min`` and ``t_max`` as floats: finite, positive, normal (>= the smallest normal float64) and
    ``t_min < t_max``; a ``ValueError`` naming the offending bound otherwise.

    A subnormal ``t_min`` (e.g. 1e-320) has no finite reciprocal (the search works on ``1/T``)
    and would return T = 0; an infinite ``t_max`` has ``log(1/inf)`` = a math domain error.
    """
    out = []
    for name, v in (("t_min", t_min), ("t_max", t_max)):
        if isinstance(v, bool):
            raise TypeError(f"{name} must be a real number, got bool")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}") from None
        if not (math.isfinite(f) and f >= sys.float_info.min):
            raise ValueError(f"{name} must be a finite, positive, normal float (>= {sys.float_info.min:.4g}), got {v!r}")
        out.append(f)
    if not out[0] < out[1]:
        raise ValueError(f"need t_min < t_max, got t_min={t_min}, t_max={t_max}")
    return out[0], out[1]


def _nll_slope(z: Tensor, y: Tensor, t: float) -> float:
    """d/dt of mean_i [logsumexp(t z_i) - t z_{i,y_i}] = mean_i (E_{softmax(t z_i)}[z_i] - z_{i,y_i}).

    The softmax is taken of ``t (z - max z)`` (the same distribution), which stays finite for any
    finite ``t`` where ``t z`` itself could overflow.
    """
    p = torch.softmax(t * (z - z.amax(dim=1, keepdim=True)), dim=1)
    return float(((p * z).sum(dim=1) - z.gather(1, y[:, None]).squeeze(1)).mean())


def fit_temperature(logits: Tensor, target: Tensor, t_min: float = 1e-3, t_max: float = 1e3,
                    tol: float = 1e-10, max_iter: int = 200) -> float:
    """The temperature T in ``[t_min, t_max]`` minimising ``NLL(softmax(logits / T), target)``.

    The NLL is convex in the inverse temperature ``t = 1/T`` (a log-sum-exp of linear functions
    of t), so its minimiser is the root of the monotone slope above: found by bisection on
    ``log t`` in float64, bracketed by ``[1/t_max, 1/t_min]``, until the bracket is narrower than
    ``tol`` (relative). This is exact, unlike PyTorch's LBFGS with lr 0.01 and no line search
    (gpleiss/temperature_scaling's recipe, init T = 1.5), which can stop short of the optimum.
    When the optimum lies outside the bracket (e.g. every sample correct and separable: NLL falls
    towards T -> 0) the nearest bound is returned. The bounds must be finite, positive, normal
    floats with ``t_min < t_max`` (:func:`check_temperature_bounds`).
    """
    t_min, t_max = check_temperature_bounds(t_min, t_max)
    to_probs(logits, target, False)  # input checks
    z = logits.detach().to(torch.float64).cpu()
    y = target.detach().cpu().long()
    lo, hi = math.log(1.0 / t_max), math.log(1.0 / t_min)  # bracket on log t
    if _nll_slope(z, y, math.exp(lo)) >= 0:
        return t_max
    if _nll_slope(z, y, math.exp(hi)) <= 0:
        return t_min
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if _nll_slope(z, y, math.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo < tol:
            break
    return 1.0 / math.exp(0.5 * (lo + hi))


class TemperatureScaling:
    """Post-hoc temperature scaling: ``softmax(logits / T)`` with T fitted on held-out data.

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017: a single
    scalar T > 0 minimising the NLL on the validation split (never the test split); it leaves the
    argmax, hence the accuracy, unchanged. Fitting: :func:`fit_temperature` (exact 1-D search).

    Use: ``ts = TemperatureScaling().fit(val_logits, val_labels); p = ts.transform(test_logits).softmax(1)``.
    Attributes after ``fit``: ``temperature``, ``nll_before`` / ``nll_after`` (on the fit split).
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 1e3) -> None:
        self.t_min, self.t_max = check_temperature_bounds(t_min, t_max)
        self.temperature: Optional[float] = None
        self.nll_before: Optional[float] = None
        self.nll_after: Optional[float] = None

    def fit(self, logits: Tensor, target: Tensor) -> "TemperatureScaling":
        """Fit T on ``logits`` ``(N, C)`` and labels ``target`` ``(N,)``; returns ``self``."""
        from .metrics import negative_log_likelihood

        self.temperature = fit_temperature(logits, target, self.t_min, self.t_max)
        self.nll_before = negative_log_likelihood(logits, target)
        self.nll_after = negative_log_likelihood(self.transform(logits.detach().double()), target)
        return self

    @property
    def at_bound(self) -> bool:
        """Whether the fitted T sits on ``t_min`` or ``t_max`` (the optimum lies beyond the bracket)."""
        return self.temperature in (self.t_min, self.t_max)

    def transform(self, logits: Tensor) -> Tensor:
        """The scaled logits ``logits / T`` (same dtype and device); apply softmax for probabilities."""
        if self.temperature is None:
            raise RuntimeError("TemperatureScaling.transform called before fit(logits, target)")
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError("logits must be a floating-point tensor")
        return logits / self.temperature

    def fit_transform(self, logits: Tensor, target: Tensor) -> Tensor:
        """``fit(logits, target)`` then ``transform(logits)``."""
        return self.fit(logits, target).transform(logits)

    def __repr__(self) -> str:
        return f"TemperatureScaling(temperature={self.temperature})"
