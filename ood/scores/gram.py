"""GRAM: deviations of higher-order Gram-matrix row sums of every conv / ReLU output from per-class training ranges."""

from __future__ import annotations

import numbers
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..registry import register_score
from .base import OODScore, batches, concat_scores, eval_mode, model_device
from .feature_base import ScoreNotApplicable
from .labelled_passes import loader_labels, ordered_batches

#: The ``1e-6`` the official and OpenOOD deviations add to the range ends before dividing by them.
RANGE_EPS = 1e-6
#: Most bytes of held-out Gram row sums :meth:`GRAM.fit` keeps from its ranges pass; above it the
#: held-out deviations take a second pass over the training data instead.
HELD_OUT_BYTES = 1 << 30


def gram_row_sums(f: Tensor, powers: Sequence[int]) -> Tensor:
    """``(N, P, C)``: per power p, ``g = sign(S) |S|^(1/p)``, ``S`` = the row sums of ``F^p (F^p)^T``.

    ``F`` = the layer output as ``C x (all other entries)`` per sample, in float64. The row sums
    are computed as ``F^p (F^p)^T 1 = F^p ((F^p)^T 1)`` (no ``C x C`` matrix). ``F^p`` is built by
    repeated multiplication up to the largest power (``x ** p`` took most of the score's time).
    """
    x = f.detach().double().reshape(f.shape[0], f.shape[1], -1)
    wanted = set(powers)
    sums = {}
    fp = x
    for k in range(1, max(powers) + 1):
        if k > 1:
            fp = fp * x
        if k in wanted:
            s = (fp @ fp.sum(dim=1)[:, :, None])[:, :, 0]
            sums[k] = torch.sign(s) * s.abs() ** (1.0 / k)
    return torch.stack([sums[p] for p in powers], dim=1)


def range_deviation(g: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``sum_j ReLU(low_j - g_j) / |low_j + 1e-6| + ReLU(g_j - high_j) / |high_j + 1e-6|`` over the last axis."""
    return (torch.relu(low - g) / (low + RANGE_EPS).abs() + torch.relu(g - high) / (high + RANGE_EPS).abs()).sum(dim=-1)


class _Taps:
    """Forward hooks on every ``nn.Conv2d`` and ``nn.ReLU`` module; each call's Gram row sums, in call order."""

    def __init__(self, model: nn.Module, powers: Sequence[int]):
        self.modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ReLU))]
        self.powers = powers
        self.grams: List[Tensor] = []

    def __enter__(self) -> "_Taps":
        def hook(_m, _inp, out):  # computed at once: an in-place ReLU may overwrite the tensor later
            self.grams.append(gram_row_sums(out, self.powers).cpu())

        self.handles = [m.register_forward_hook(hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def run(self, model: nn.Module, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        self.grams = []
        logits = model(x)
        return logits.detach().cpu().double(), self.grams


@register_score("gram")
class GRAM(OODScore):
    """GRAM score ``s(x) = -(sum_l D_l(x) / n_l) / MSP(x)``, ``D_l = sum_p delta(g_{l,p}(x); yhat)``.

    Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020
    (official notebooks VectorInstitute/gram-ood-detection); this follows OpenOOD's rewrite
    (``gram_postprocessor.py``, by the author, 2024):

    * every call of every ``nn.Conv2d`` and ``nn.ReLU`` module is a layer l (a module called twice
      is two layers; a functional ReLU is not seen), with ``g_{l,p}`` = :func:`gram_row_sums` of
      its output for each power p (float64 here: ``F^p`` overflows float32 for large p);
    * per layer, power and class c, the element-wise min and max of ``g`` over a random 90 % of
      the training samples of **label** c (``holdout`` = 10 % per class, ``int(0.1 L_c)``, held
      out; OpenOOD's draw is unseeded, here ``seed``); ``delta`` = :func:`range_deviation` from the
      range of the predicted class ``yhat``;
    * ``n_l`` = the mean of ``sum_p delta`` over the held-out samples (each against its own label's
      range); ``MSP`` = max softmax of the logits.

    The official notebooks differ: powers 1..10, six taps per BasicBlock, class ranges from the
    *predicted* class of all training images, and ``n_l`` from 10 % of the **ID test** set (not
    reproducible without test data). Defaults: ``powers = (1, ..., 5)`` (OpenOOD; its sweep has this
    one point, ``GRID = {}``). Inputs: the model (one forward per batch with hooks), training
    data with labels (passes at fit: labels, then ranges; the held-out samples' row sums are kept
    from the ranges pass and scored once the ranges are final, or, when they would take more than
    ``held_out_bytes``, re-computed by a third pass; the loader must yield the same order each
    time). A model without such modules, a class without training samples, no held-out sample, or
    a layer whose held-out deviation is 0 (``n_l = 0``) raises
    :class:`~ood.scores.feature_base.ScoreNotApplicable`.
    """

    name = "gram"
    needs = "model"
    GRID: dict = {}

    def __init__(self, powers: Sequence[int] = (1, 2, 3, 4, 5), holdout: float = 0.1, seed: int = 0,
                 held_out_bytes: int = HELD_OUT_BYTES):
        if isinstance(powers, (str, bytes)) or not hasattr(powers, "__iter__"):
            raise ValueError(f"powers must be a sequence of integers >= 1, got {powers!r}")
        powers = tuple(powers)
        if not powers or not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 1 for p in powers):
            raise ValueError(f"powers must be a non-empty sequence of integers >= 1, got {powers!r}")
        if not isinstance(holdout, numbers.Real) or not 0.0 < float(holdout) < 1.0:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
        self.powers = tuple(int(p) for p in powers)
        self.holdout = float(holdout)
        self.seed = int(seed)
        if not isinstance(held_out_bytes, numbers.Integral) or isinstance(held_out_bytes, bool) or held_out_bytes < 0:
            raise ValueError(f"held_out_bytes must be an integer >= 0, got {held_out_bytes!r}")
        self.held_out_bytes = int(held_out_bytes)

    def _pass(self, model: nn.Module, loader: Iterable, labels: List[Tensor], fn: Callable) -> None:
        """``fn(batch index, labels, logits, grams)`` on every batch, checking the loader's order."""
        with eval_mode(model), torch.no_grad(), _Taps(model, self.powers) as taps:
            for i, x, y in ordered_batches(loader, labels, model_device(model), "gram fit"):
                logits, grams = taps.run(model, x)
                fn(i, y, logits, grams)

    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None) -> "GRAM":
        """Per-class ranges on 90 % of each class of ``loader``; ``n_l`` on the held-out 10 %."""
        if not any(isinstance(m, (nn.Conv2d, nn.ReLU)) for m in model.modules()):
            raise ScoreNotApplicable(f"gram needs nn.Conv2d or nn.ReLU modules; {type(model).__name__} has none")
        labels = loader_labels(loader, "gram fit")
        y_all = torch.cat(labels)
        num_classes: List[int] = []

        # the split: int(holdout * L_c) random samples of each class are held out
        held = torch.zeros(y_all.numel(), dtype=torch.bool)
        gen = torch.Generator().manual_seed(self.seed)
        if y_all.min() < 0:
            raise ValueError(f"gram fit: labels must be >= 0, got {int(y_all.min())}")
        for c in range(int(y_all.max()) + 1):
            idx = torch.nonzero(y_all == c).flatten()
            held[idx[torch.randperm(idx.numel(), generator=gen)[:int(self.holdout * idx.numel())]]] = True
        if not held.any():
            raise ScoreNotApplicable(f"gram: no class has 1 / {self.holdout} samples or more, so nothing is held out "
                                     "to normalise the deviations")
        offsets = torch.cumsum(torch.tensor([0] + [t.numel() for t in labels]), 0)
        lows: List[Tensor] = []
        highs: List[Tensor] = []
        # the held-out samples' row sums and labels, batch by batch, while they fit in the budget
        kept: List[Tuple[Tensor, List[Tensor]]] = []
        keep_held = [True]

        def ranges(i, y, logits, grams):
            if not lows:
                num_classes.append(logits.shape[1])
                if int(y_all.max()) >= logits.shape[1]:
                    raise ValueError(f"gram fit: labels must be < {logits.shape[1]} (the model's classes), "
                                     f"got {int(y_all.max())}")
                for g in grams:
                    lows.append(torch.full((num_classes[0],) + g.shape[1:], float("inf"), dtype=torch.float64))
                    highs.append(torch.full((num_classes[0],) + g.shape[1:], float("-inf"), dtype=torch.float64))
            if len(grams) != len(lows):
                raise ValueError(f"gram: the model's hooked calls changed between batches ({len(grams)} vs {len(lows)})")
            sel = held[offsets[i]:offsets[i + 1]]
            keep = ~sel
            for lo, hi, g in zip(lows, highs, grams):
                idx = y[keep][:, None, None].expand(-1, *g.shape[1:])
                lo.scatter_reduce_(0, idx, g[keep], reduce="amin")
                hi.scatter_reduce_(0, idx, g[keep], reduce="amax")
            if keep_held[0] and sel.any():
                per_sample = sum(g[0].numel() * g.element_size() for g in grams)
                if per_sample * int(held.sum()) > self.held_out_bytes:
                    keep_held[0] = False
                    kept.clear()
                else:
                    kept.append((y[sel], [g[sel] for g in grams]))

        self._pass(model, loader, labels, ranges)
        if not lows:
            raise ScoreNotApplicable(f"gram: no nn.Conv2d / nn.ReLU module of {type(model).__name__} ran in the forward pass")
        empty = torch.nonzero(torch.isinf(lows[0]).flatten(1).all(dim=1)).flatten().tolist()
        if empty:
            raise ScoreNotApplicable(f"gram: classes {empty[:10]} have no training sample outside the held-out part")
        self.lows_, self.highs_ = lows, highs

        dev_sum = torch.zeros(len(lows), dtype=torch.float64)
        count = [0]

        def heldout(i, y, logits, grams):
            sel = held[offsets[i]:offsets[i + 1]]
            if sel.any():
                dev_sum.add_(self._deviations(grams, y)[sel].sum(dim=0))
                count[0] += int(sel.sum())

        if keep_held[0]:  # the same rows and sums as the pass below, without the model
            for y_held, grams in kept:
                dev_sum.add_(self._deviations(grams, y_held).sum(dim=0))
                count[0] += y_held.numel()
            kept.clear()
        else:
            self._pass(model, loader, labels, heldout)
        norm = dev_sum / count[0]
        zero = torch.nonzero(norm <= 0).flatten().tolist()
        if zero:
            raise ScoreNotApplicable(f"gram: layers {zero[:10]} (hook order) have zero deviation on the held-out samples, "
                                     "so they cannot be normalised (n_l = 0)")
        self.norms_ = norm
        self.heldout_ = held
        self.num_layers_ = len(lows)
        return self

    def _deviations(self, grams: List[Tensor], classes: Tensor) -> Tensor:
        """``(N, L)``: per layer, ``sum_p delta`` against the range of each sample's class."""
        cols = []
        for lo, hi, g in zip(self.lows_, self.highs_, grams):
            cols.append(range_deviation(g, lo[classes], hi[classes]).sum(dim=1))
        return torch.stack(cols, dim=1)

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        if getattr(self, "norms_", None) is None:
            raise RuntimeError("GRAM is not fitted; call fit(model, loader) first")
        parts = []
        with eval_mode(model), torch.no_grad(), _Taps(model, self.powers) as taps:
            for x, _ in batches(loader, model_device(model)):
                logits, grams = taps.run(model, x)
                if len(grams) != self.num_layers_:
                    raise ValueError(f"gram: the model ran {len(grams)} hooked calls, the fit saw {self.num_layers_}; "
                                     "score with the model it was fitted on")
                total = (self._deviations(grams, logits.argmax(dim=1)) / self.norms_).sum(dim=1)
                parts.append(-total / torch.softmax(logits, dim=1).amax(dim=1))
        return concat_scores(parts, "gram score")
