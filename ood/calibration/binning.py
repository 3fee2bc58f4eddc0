"""Non-parametric calibrators: histogram binning and isotonic regression, one-vs-rest per class.

Both map each class probability ``p_c = softmax(z)_c`` through a monotone step function fitted on
held-out (validation) data against ``1[y = c]`` -- one map per class, as torch-uncertainty's
``HistogramBinningScaler`` / ``IsotonicRegressionScaler`` and netcal's ``HistogramBinning`` /
``IsotonicRegression`` do for multiclass inputs -- then renormalise the row to sum to 1. (The
top-label variant, one map on the maximum probability only, is not what either library does.)

Same interface as :class:`~ood.calibration.TemperatureScaling`: ``fit(logits, target)``, then
``transform(logits)`` returns ``log`` of the calibrated probabilities, so ``softmax`` of it gives
them back. Each calibrated class probability is floored at ``eps`` (1e-6, torch-uncertainty's
clamp) *before* the renormalisation, so a row whose maps all give 0 becomes uniform and the
logarithm stays finite. (torch-uncertainty renormalises with +1e-12 in the denominator and clamps
afterwards; the two differ by at most about ``K * eps``.) Neither map keeps the argmax: accuracy
can change, and ties appear (a step function).
"""

from __future__ import annotations

import abc

from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from ._inputs import check_fitted_logits, check_n_bins, to_probs

__all__ = ["HistogramBinning", "IsotonicCalibration"]


def _probs_of(logits: Tensor, k: int, who: str) -> np.ndarray:
    """Float64 softmax of ``logits`` ``(N, k)`` after checking the type, the width and finiteness."""
    check_fitted_logits(logits, k, who)
    return torch.softmax(logits.detach().to(torch.float64).cpu(), dim=1).numpy()


class _OneVsRest(abc.ABC):
    """One monotone map per class (subclasses: how a class's map is fitted and applied)."""

    name = ""

    def __init__(self, eps: float = 1e-6) -> None:
        if not 0.0 < float(eps) < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {eps}")
        self.eps = float(eps)
        self.num_classes: Optional[int] = None
        self.nll_before: Optional[float] = None
        self.nll_after: Optional[float] = None

    @abc.abstractmethod
    def _fit_class(self, p: np.ndarray, hit: np.ndarray, c: int) -> None:
        """Fit class ``c``'s map from its probabilities ``p`` and 0/1 targets ``hit``."""

    @abc.abstractmethod
    def _map_class(self, p: np.ndarray, c: int) -> np.ndarray:
        """Class ``c``'s calibrated probabilities for ``p``."""

    def fit(self, logits: Tensor, target: Tensor):
        """Fit one map per class on ``logits`` ``(N, C)`` and labels ``target`` ``(N,)``; returns ``self``."""
        probs, y = to_probs(logits, target, False)  # checks, errors naming the argument
        p, yn = probs.numpy(), y.numpy()
        self.num_classes = p.shape[1]
        self._start(self.num_classes)
        for c in range(self.num_classes):
            self._fit_class(p[:, c], (yn == c).astype(np.float64), c)
        z = logits.detach().to(torch.float64).cpu()
        self.nll_before = float(torch.nn.functional.cross_entropy(z, y))
        self.nll_after = float(torch.nn.functional.cross_entropy(self.transform(z), y))
        return self

    def _start(self, k: int) -> None:
        pass

    def predict_proba(self, logits: Tensor) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` (float64 numpy), each row summing to 1."""
        if self.num_classes is None:
            raise RuntimeError(f"{type(self).__name__}.transform called before fit(logits, target)")
        p = _probs_of(logits, self.num_classes, self.name)
        q = np.stack([self._map_class(p[:, c], c) for c in range(self.num_classes)], axis=1)
        q = np.maximum(q, self.eps)
        return q / q.sum(axis=1, keepdims=True)

    def transform(self, logits: Tensor) -> Tensor:
        """``log`` of the calibrated probabilities (input's dtype and device); apply softmax for them."""
        q = self.predict_proba(logits)
        return torch.from_numpy(np.log(q)).to(device=logits.device, dtype=logits.dtype)

    def fit_transform(self, logits: Tensor, target: Tensor) -> Tensor:
        """``fit(logits, target)`` then ``transform(logits)``."""
        return self.fit(logits, target).transform(logits)


class HistogramBinning(_OneVsRest):
    """Histogram binning (Zadrozny & Elkan, ICML 2001), one-vs-rest per class, then renormalised.

    For class c, the probability axis is cut into ``n_bins`` equal-width bins ``((b-1)/B, b/B]``
    (a probability of exactly 0 goes into the first; the same bins as this package's ECE and
    torch-uncertainty's ``torch.bucketize``); a bin's calibrated value is the share of the fit
    samples in it whose label is c, ``mean 1[y = c]``; an empty bin keeps its centre
    ``(b - 1/2) / B`` (as torch-uncertainty and netcal). Default ``n_bins = 15`` (torch-uncertainty's;
    netcal's is 10). Attribute after ``fit``: ``bin_values`` ``(C, n_bins)`` and ``bin_counts``.
    """

    name = "histogram"

    def __init__(self, n_bins: int = 15, eps: float = 1e-6) -> None:
        super().__init__(eps)
        self.n_bins = check_n_bins(n_bins)
        self.bin_values: Optional[np.ndarray] = None
        self.bin_counts: Optional[np.ndarray] = None

    def _bin(self, p: np.ndarray) -> np.ndarray:
        return np.clip(np.ceil(p * self.n_bins).astype(np.int64) - 1, 0, self.n_bins - 1)

    def _start(self, k: int) -> None:
        centres = (np.arange(self.n_bins) + 0.5) / self.n_bins
        self.bin_values = np.tile(centres, (k, 1))
        self.bin_counts = np.zeros((k, self.n_bins), dtype=np.int64)

    def _fit_class(self, p: np.ndarray, hit: np.ndarray, c: int) -> None:
        idx = self._bin(p)
        count = np.bincount(idx, minlength=self.n_bins)
        total = np.bincount(idx, weights=hit, minlength=self.n_bins)
        self.bin_counts[c] = count
        self.bin_values[c] = np.where(count > 0, total / np.maximum(count, 1), self.bin_values[c])

    def _map_class(self, p: np.ndarray, c: int) -> np.ndarray:
        return self.bin_values[c][self._bin(p)]

    def __repr__(self) -> str:
        return f"HistogramBinning(n_bins={self.n_bins}, fitted={self.num_classes is not None})"


class IsotonicCalibration(_OneVsRest):
    """Isotonic regression (Zadrozny & Elkan, KDD 2002), one-vs-rest per class, then renormalised.

    For class c, scikit-learn's ``IsotonicRegression(y_min=0, y_max=1, out_of_bounds='clip')`` is
    fitted on ``(p_c, 1[y = c])`` -- the non-decreasing step function minimising the squared error
    (pool-adjacent-violators) -- exactly as torch-uncertainty's ``IsotonicRegressionScaler`` and
    netcal's ``IsotonicRegression``; probabilities outside the fitted range take the nearest end
    value. A class absent from the fit labels maps to 0 (the floor ``eps`` then applies), where
    netcal leaves it out. Attribute after ``fit``: ``models`` (one fitted regressor per class).
    """

    name = "isotonic"

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__(eps)
        self.models: List = []

    def _start(self, k: int) -> None:
        self.models = []

    def _fit_class(self, p: np.ndarray, hit: np.ndarray, c: int) -> None:
        from sklearn.isotonic import IsotonicRegression

        self.models.append(IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, hit))

    def _map_class(self, p: np.ndarray, c: int) -> np.ndarray:
        return np.asarray(self.models[c].predict(p), dtype=np.float64)

    def __repr__(self) -> str:
        return f"IsotonicCalibration(fitted={self.num_classes is not None})"
