"""ODIN: temperature-scaled softmax confidence after a small input-pre-processing step."""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lossbench.validation import check_positive

from ..registry import register_score
from .base import (
    LogitScore, batches, check_input_std, concat_scores, eval_mode, gradient_sign, input_step,
    model_device,
)

#: Most bytes of step directions (int8, one per input entry) kept per loader and temperature for the
#: other grid points of an evaluation (:attr:`~ood.scores.base.OODScore.pass_memo`); a larger loader
#: computes them inline at every point.
DIRECTION_MEMO_BYTES = 256 << 20

#: The paper's grids (Liang et al. 2018, Sec. 4.2 / Appendix): T and 21 evenly spaced eps in [0, 0.004].
ODIN_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
ODIN_EPS_GRID = tuple(round(0.0002 * i, 4) for i in range(21))


def _fingerprint(x: Tensor) -> Tuple[Any, ...]:
    """Shape, sum and first entries of a batch: tells a reshuffled or changed batch from the same one."""
    flat = x.detach().reshape(-1)
    return (tuple(x.shape), float(flat.double().sum()), tuple(flat[:8].tolist()))


@register_score("odin")
class ODIN(LogitScore):
    """ODIN score ``max_c softmax(f(x') / T)_c`` with ``x' = x - eps * sign(-grad_x log S_y(x; T))``.

    Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in
    Neural Networks", ICLR 2018, eqs. (1)-(2); official code facebookresearch/odin
    (``calData.py``): y = the predicted class, the gradient is that of the cross-entropy of
    ``f(x)/T`` with y, its sign taken as ``ge(grad, 0)``, divided by the normalisation std
    (``input_std``, optional here), and the step raises the softmax score.

    Defaults: T = 1000 (the paper's choice for every network), eps = 0.0014 (the official
    DenseNet/CIFAR-10 setting). Tune over ``ODIN_TEMPERATURES`` x ``ODIN_EPS_GRID`` on
    validation data as the paper does. ``score_logits`` is the no-pre-processing variant
    (temperature scaling only). Inputs ``(N, ...)`` -> scores ``(N,)``. Within an evaluation
    (:attr:`~ood.scores.base.OODScore.pass_memo` set, as ``evaluate_ood`` does) the step directions
    of a loader are computed once per temperature and shared by every ``eps`` of the search (up to
    :data:`DIRECTION_MEMO_BYTES` per loader; a batch that differs from the one they were computed
    on is pre-processed inline), with the same scores bit for bit.
    """

    needs = "model"  # differentiates through the input

    name = "odin"
    #: OpenOOD v1.5's search grid (``configs/postprocessors/odin.yml``); the paper's is
    #: ``ODIN_TEMPERATURES`` x ``ODIN_EPS_GRID``.
    GRID = {"temperature": (1.0, 10.0, 100.0, 1000.0), "eps": (0.0014, 0.0028)}

    def __init__(self, temperature: float = 1000.0, eps: float = 0.0014,
                 input_std: Optional[Sequence[float]] = None):
        check_positive(float(temperature), "temperature")
        check_positive(float(eps), "eps", allow_zero=True)
        check_input_std(input_std)
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.input_std = None if input_std is None else tuple(float(v) for v in input_std)

    def _score_logits(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits / self.temperature, dim=1).amax(dim=1)

    def input_gradient(self, model: nn.Module, x: Tensor) -> Tensor:
        """``d/dx`` of the cross-entropy of ``model(x) / T`` against its own prediction (summed)."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x) / self.temperature
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        return grad

    def step_direction(self, grad: Tensor) -> Tensor:
        """ODIN moves every entry against the gradient's sign (raising the softmax score)."""
        return -gradient_sign(grad)

    def preprocess(self, model: nn.Module, x: Tensor) -> Tensor:
        """The pre-processed input ``x'`` (same shape as ``x``); ``x`` itself when eps = 0."""
        if self.eps == 0:
            return x
        grad = self.input_gradient(model, x)
        return input_step(x.detach(), self.step_direction(grad), self.eps, self.input_std)

    def _directions(self, model: nn.Module, loader: Iterable) -> Optional[List[Tuple[Tuple[Any, ...], Tensor]]]:
        """``(fingerprint, step direction)`` of every batch of ``loader`` (int8, on the CPU), or
        ``None`` once they pass :data:`DIRECTION_MEMO_BYTES`. They depend on the temperature, not on
        ``eps``; the fingerprint tells a later pass whether the batch is the same."""
        out = []
        size = 0
        with eval_mode(model):
            for x, _ in batches(loader, model_device(model)):
                d = self.step_direction(self.input_gradient(model, x)).to("cpu", torch.int8)
                size += d.numel()
                if size > DIRECTION_MEMO_BYTES:
                    return None
                out.append((_fingerprint(x), d))
        return out

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        # Within an evaluation (pass_memo set) the directions are kept per loader and temperature,
        # so the grid's other eps values take one forward per batch instead of a backward as well.
        dirs = (self.memoised((self.name, "step direction", self.temperature), loader,
                              lambda: self._directions(model, loader))
                if self.pass_memo is not None and self.eps != 0 else None)
        parts = []
        with eval_mode(model):
            for i, (x, _) in enumerate(batches(loader, model_device(model))):
                if dirs is not None and i < len(dirs) and dirs[i][0] == _fingerprint(x):
                    x_hat = input_step(x.detach(), dirs[i][1].to(x.device, x.dtype), self.eps, self.input_std)
                else:  # no memo, or the loader yielded another batch than before (shuffled): inline
                    x_hat = self.preprocess(model, x)
                with torch.no_grad():
                    parts.append(self.score_logits(model(x_hat)))
        return concat_scores(parts, "odin score")
