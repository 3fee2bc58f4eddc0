"""Affine calibrators beyond one temperature: vector scaling and matrix scaling with ODIR.

Both map the logits ``z`` to ``z' = W z + b`` and are fitted on held-out (validation) logits by
minimising the mean NLL of ``softmax(z')``, in float64, with scipy's L-BFGS-B on the analytic
gradient (``(softmax(z') - onehot(y)) / N`` back through the affine map). The objective is convex in (W, b) (a multinomial logistic regression on the
features z), so the optimum does not depend on the initialisation.
Interface as :class:`~ood.calibration.TemperatureScaling`: ``fit(logits, target)`` then
``transform(logits)`` -> calibrated logits (apply softmax).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from lossbench.validation import check_number
from ._inputs import check_fitted_logits, to_probs

__all__ = ["VectorScaling", "MatrixScaling", "odir_grid"]


def _checked(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    to_probs(logits, target, False)  # shape / finiteness / label checks, errors naming the argument
    return logits.detach().to(torch.float64).cpu(), target.detach().cpu().long()


#: L-BFGS-B stopping rule: relative decrease of the objective below FTOL, or every gradient entry below GTOL.
FTOL, GTOL = 1e-10, 1e-6


def _minimise(fun, x0: np.ndarray, max_iter: int) -> Tuple[np.ndarray, bool, int]:
    """L-BFGS-B on ``fun(x) -> (value, gradient)``; returns (x, converged, iterations)."""
    res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "maxfun": 4 * max_iter, "ftol": FTOL, "gtol": GTOL})
    return res.x, bool(res.success), int(res.nit)


def _minimise_scaled(fun, x0: np.ndarray, hess_diag: np.ndarray, max_iter: int) -> Tuple[np.ndarray, bool]:
    """:func:`_minimise` after the change of variables ``x = d * u``, ``d = 1 / sqrt(hess_diag)``.

    Diagonal preconditioning: the logits' scale (z^2 against 1 for a bias) and a strong penalty make
    some directions far stiffer than others; rescaled, L-BFGS-B needs a few dozen iterations instead
    of thousands. The stopping rule (``GTOL``) then applies to the rescaled gradient.
    """
    d = 1.0 / np.sqrt(np.maximum(hess_diag, 1e-12))

    def fun_u(u: np.ndarray) -> Tuple[float, np.ndarray]:
        value, grad = fun(d * u)
        return value, d * grad

    u, ok, _ = _minimise(fun_u, x0 / d, max_iter)
    return d * u, ok


def _curvature(s: np.ndarray) -> np.ndarray:
    """``p (1 - p) / N`` for ``p = softmax(s)``: the NLL's curvature along each logit."""
    e = np.exp(s - s.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return p * (1.0 - p) / s.shape[0]


def _nll_grad(s: np.ndarray, y: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean NLL of softmax(s) against labels y, and its gradient (softmax(s) - onehot(y)) / N w.r.t. s."""
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - m)
    tot = e.sum(axis=1, keepdims=True)
    n = s.shape[0]
    rows = np.arange(n)
    nll = float(np.mean(np.log(tot[:, 0]) + m[:, 0] - s[rows, y]))
    g = e / tot
    g[rows, y] -= 1.0
    return nll, g / n


class VectorScaling:
    """Vector scaling: ``z' = v * z + b`` (one scale and one bias per class), fitted by NLL.

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017, Sec. 4.2
    (matrix scaling with W restricted to a diagonal); the intercept is theirs and dirichletcal's
    ``calib/vectorscaling.py`` (diagonal plus intercept). torch-uncertainty's ``VectorScaler``
    learns the scales only: ``bias=False`` gives that variant. No regularisation.
    Defaults: init v = 1, b = 0; L-BFGS-B (scipy), float64, at most ``max_iter`` = 1000 iterations.
    With all scales equal and b = 0 this is temperature scaling with T = 1 / v; its fitted NLL is
    never above temperature scaling's on the fit split (a superset of that model).
    Attributes after ``fit``: ``scale`` (v), ``bias`` (b), ``converged``, ``nll_before``, ``nll_after``.
    """

    name = "vector"

    def __init__(self, bias: bool = True, max_iter: int = 1000) -> None:
        self.use_bias = bool(bias)
        self.max_iter = int(max_iter)
        self.scale: Optional[Tensor] = None
        self.bias: Optional[Tensor] = None
        self.converged: Optional[bool] = None
        self.nll_before: Optional[float] = None
        self.nll_after: Optional[float] = None

    def fit(self, logits: Tensor, target: Tensor) -> "VectorScaling":
        """Fit v (and b) on ``logits`` ``(N, C)`` and labels ``target`` ``(N,)``; returns ``self``."""
        z, y = _checked(logits, target)
        k = z.shape[1]
        zn, yn = z.numpy(), y.numpy()

        def fun(p: np.ndarray) -> Tuple[float, np.ndarray]:
            nll, g = _nll_grad(zn * p[:k] + (p[k:] if self.use_bias else 0.0), yn)
            grad = (g * zn).sum(axis=0)
            return nll, (np.r_[grad, g.sum(axis=0)] if self.use_bias else grad)

        x0 = np.r_[np.ones(k), np.zeros(k if self.use_bias else 0)]
        c = _curvature(zn)
        h = (c * zn * zn).sum(axis=0)
        x, self.converged = _minimise_scaled(fun, x0, np.r_[h, c.sum(axis=0)] if self.use_bias else h, self.max_iter)
        self.scale = torch.from_numpy(x[:k].copy())
        self.bias = torch.from_numpy(x[k:].copy()) if self.use_bias else torch.zeros(k, dtype=torch.float64)
        self.nll_before = float(torch.nn.functional.cross_entropy(z, y))
        self.nll_after = float(torch.nn.functional.cross_entropy(self.transform(z), y))
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """``v * logits + b`` (float64 when the input is, else the input's dtype); apply softmax for probabilities."""
        if self.scale is None:
            raise RuntimeError("VectorScaling.transform called before fit(logits, target)")
        check_fitted_logits(logits, self.scale.numel(), "vector scaling")
        v, b = self.scale.to(logits), self.bias.to(logits)
        return logits * v + b

    def fit_transform(self, logits: Tensor, target: Tensor) -> Tensor:
        """``fit(logits, target)`` then ``transform(logits)``."""
        return self.fit(logits, target).transform(logits)

    def __repr__(self) -> str:
        return f"VectorScaling(bias={self.use_bias}, fitted={self.scale is not None})"


def odir_grid(num_classes: int) -> List[float]:
    """The ODIR regularisation strengths searched when none is given: ``10^i`` for ``i = s..6``.

    The powers of ten of the official tuning grid (dirichletcal/experiments_dnn
    ``scripts/tune_cal_odir.py``: lambda in {1, 0.25, 0.5} x 10^i, mu in 10^i, i from s to 6, with
    s = -5 for the 10-class sets and -2 for CIFAR-100); here s = -5 below 100 classes and -2 from
    100 on, and mu = lambda (that script's ``--no_mus`` mode), which keeps the search to 12 or 9 fits
    per fold instead of 432 or 243.
    """
    start = -5 if num_classes < 100 else -2
    return [10.0 ** i for i in range(start, 7)]


class MatrixScaling:
    """Matrix scaling with off-diagonal and intercept regularisation (MS-ODIR): ``z' = W z + b``.

    Kull, Perello-Nieto, Kängsepp, Silva Filho, Song & Flach, "Beyond temperature scaling: Obtaining
    well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019: matrix
    scaling on the logits (their MS-ODIR; Dir-ODIR is the same on log-probabilities), fitted by

        mean_i NLL(softmax(W z_i + b), y_i) + lam / (K (K - 1)) * sum_{i != j} W_ij^2 + mu / K * sum_j b_j^2

    (the normalisation of dirichletcal ``calib/multinomial.py`` with ``reg_norm=True`` and of
    torch-uncertainty's ``DirichletScaler``). The diagonal is not penalised, so large lam / mu
    shrink the map towards vector scaling without intercept. Init W = I, b = 0 (as both).

    ``lam`` / ``mu``: ``None`` (default) chooses them by ``folds``-fold cross-validation (NLL on the
    held-out folds, folds drawn with ``seed``; 5 folds and seed 15 as the official tuning script)
    over :func:`odir_grid` with mu = lambda, then refits on all the data. Give both numbers to skip
    the search. ``lam = mu = 0`` is plain matrix scaling (Guo et al. 2017), whose optimum diverges
    when the fit set is separable (then ``converged`` is False after ``max_iter`` iterations).
    Attributes after ``fit``: ``weight`` (W), ``bias`` (b), ``lam``, ``mu``, ``cv_nll`` (grid value
    -> mean held-out NLL, when searched), ``converged``, ``nll_before``, ``nll_after``.
    """

    name = "matrix_odir"

    def __init__(self, lam: Optional[float] = None, mu: Optional[float] = None, folds: int = 5, seed: int = 15,
                 grid: Optional[Sequence[float]] = None, max_iter: int = 1000) -> None:
        if (lam is None) != (mu is None):
            raise ValueError(f"lam and mu are chosen together: give both or neither, got lam={lam}, mu={mu}")
        for value, arg in ((lam, "lam"), (mu, "mu")):
            if value is not None and check_number(value, arg) < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an int >= 2, got {folds!r}")
        if grid is not None and (len(grid) == 0 or any(check_number(g, "grid") < 0 for g in grid)):
            raise ValueError(f"grid must be a non-empty list of values >= 0, got {grid!r}")
        self.lam_arg, self.mu_arg = lam, mu
        self.folds, self.seed, self.grid, self.max_iter = folds, int(seed), grid, int(max_iter)
        self.weight: Optional[Tensor] = None
        self.bias: Optional[Tensor] = None
        self.lam: Optional[float] = None
        self.mu: Optional[float] = None
        self.cv_nll: Optional[Dict[float, float]] = None
        self.converged: Optional[bool] = None
        self.nll_before: Optional[float] = None
        self.nll_after: Optional[float] = None

    @staticmethod
    def _solve(z: Tensor, y: Tensor, lam: float, mu: float, max_iter: int,
               x0: Optional[np.ndarray] = None) -> Tuple[np.ndarray, bool]:
        k = z.shape[1]
        zn, yn = z.numpy(), y.numpy()
        off = 1.0 - np.eye(k)
        c_w = lam / (k * (k - 1))
        c_b = mu / k

        def fun(p: np.ndarray) -> Tuple[float, np.ndarray]:
            w, b = p[: k * k].reshape(k, k), p[k * k:]
            nll, g = _nll_grad(zn @ w.T + b, yn)
            wo = w * off
            value = nll + c_w * float((wo * wo).sum()) + c_b * float(b @ b)
            return value, np.r_[(g.T @ zn + 2 * c_w * wo).ravel(), g.sum(axis=0) + 2 * c_b * b]

        if x0 is None:
            x0 = np.r_[np.eye(k).ravel(), np.zeros(k)]
        c = _curvature(zn @ x0[: k * k].reshape(k, k).T + x0[k * k:])
        h = np.r_[(c.T @ (zn * zn) + 2 * c_w * off).ravel(), c.sum(axis=0) + 2 * c_b]
        return _minimise_scaled(fun, x0, h, max_iter)

    def _folds(self, n: int) -> List[np.ndarray]:
        order = np.random.RandomState(self.seed).permutation(n)
        return np.array_split(order, self.folds)

    def fit(self, logits: Tensor, target: Tensor) -> "MatrixScaling":
        """Fit W and b on ``logits`` ``(N, C)`` and labels ``target`` ``(N,)`` (searching lam = mu first
        when not given); returns ``self``."""
        z, y = _checked(logits, target)
        k = z.shape[1]
        if self.lam_arg is None:
            grid = sorted({float(g) for g in (self.grid if self.grid is not None else odir_grid(k))}, reverse=True)
            if z.shape[0] < self.folds:
                raise ValueError(f"logits has {z.shape[0]} rows, fewer than folds={self.folds}; "
                                 "give lam and mu, or fewer folds")
            parts = self._folds(z.shape[0])
            scores = {g: 0.0 for g in grid}
            for held in parts:
                train = np.setdiff1d(np.arange(z.shape[0]), held)
                zt, yt, zh, yh = z[train], y[train], z[held], y[held]
                x = None
                for g in grid:  # strongest first, each fit warm-started from the previous one
                    x, _ = self._solve(zt, yt, g, g, self.max_iter, x)
                    w, b = torch.from_numpy(x[: k * k]).view(k, k), torch.from_numpy(x[k * k:])
                    scores[g] += float(torch.nn.functional.cross_entropy(zh @ w.T + b, yh)) * len(held) / z.shape[0]
            best = min(grid, key=lambda g: (scores[g], -g))  # ties: the stronger regularisation
            self.cv_nll = scores
            self.lam = self.mu = best
        else:
            self.lam, self.mu = float(self.lam_arg), float(self.mu_arg)
        x, self.converged = self._solve(z, y, self.lam, self.mu, self.max_iter)
        self.weight = torch.from_numpy(x[: k * k].copy()).view(k, k)
        self.bias = torch.from_numpy(x[k * k:].copy())
        self.nll_before = float(torch.nn.functional.cross_entropy(z, y))
        self.nll_after = float(torch.nn.functional.cross_entropy(self.transform(z), y))
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """``logits @ W.T + b`` (in the input's dtype); apply softmax for probabilities."""
        if self.weight is None:
            raise RuntimeError("MatrixScaling.transform called before fit(logits, target)")
        check_fitted_logits(logits, self.bias.numel(), "matrix scaling")
        return logits @ self.weight.to(logits).T + self.bias.to(logits)

    def fit_transform(self, logits: Tensor, target: Tensor) -> Tensor:
        """``fit(logits, target)`` then ``transform(logits)``."""
        return self.fit(logits, target).transform(logits)

    def __repr__(self) -> str:
        return f"MatrixScaling(lam={self.lam}, mu={self.mu}, fitted={self.weight is not None})"
