"""Chunked evaluation reductions of ``softcap(features @ weight.T + bias)`` (no gradient).

:func:`linear_logsumexp` (the energy OOD score), :func:`linear_max_softmax` (MSP) and
:func:`linear_topk`, computed a block of rows at a time (:func:`~lossbench.cce.dispatch.block_rows`)
so that the N x V logits are never held.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import compute_dtype
from .checks import _check_linear, _check_softcap
from .dispatch import block_rows


def _blocks(features: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
            temperature: float):
    """Yield ``(start, logits block / temperature)`` in the compute dtype, without autograd."""
    _check_linear(features, weight, bias)
    cap = _check_softcap(softcap)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    cdt = compute_dtype(features.dtype)
    N, V = features.shape[0], weight.shape[0]
    rows = block_rows(N, V, features.device)
    with torch.no_grad():
        C = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        for r0 in range(0, N, rows):
            Eb = features[r0:r0 + rows].to(cdt)
            Z = F.linear(Eb, C, b)
            if cap > 0:
                Z.div_(cap).tanh_().mul_(cap)
            if temperature != 1:
                Z.div_(temperature)
            yield r0, Z


def linear_logsumexp(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                     softcap: Optional[float] = None, temperature: float = 1.0) -> Tensor:
    """``T * logsumexp(z / T)`` per row of ``z = softcap(features @ weight.T + bias)``, chunked.

    With ``T = 1`` this is the energy OOD score ``-E(x)`` of Liu et al. 2020 (NeurIPS),
    higher = more in-distribution. Shapes: features (N, D), weight (V, D) -> (N,) in the
    compute dtype (float32, or float64 for float64 input); no gradient.
    """
    N = features.shape[0] if isinstance(features, Tensor) and features.dim() == 2 else 0
    out = None
    for r0, Z in _blocks(features, weight, bias, softcap, temperature):
        if out is None:
            out = Z.new_empty(N)
        out[r0:r0 + Z.shape[0]] = torch.logsumexp(Z, dim=1) * temperature
    if out is None:
        out = features.new_empty(0, dtype=compute_dtype(features.dtype))
    return out


def linear_max_softmax(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                       softcap: Optional[float] = None, temperature: float = 1.0) -> Tensor:
    """``max_c softmax(z / T)_c`` per row (MSP score, Hendrycks & Gimpel 2017), chunked.

    Shapes: features (N, D), weight (V, D) -> (N,) in the compute dtype; no gradient.
    """
    N = features.shape[0] if isinstance(features, Tensor) and features.dim() == 2 else 0
    out = None
    for r0, Z in _blocks(features, weight, bias, softcap, temperature):
        if out is None:
            out = Z.new_empty(N)
        out[r0:r0 + Z.shape[0]] = torch.exp(Z.amax(dim=1) - torch.logsumexp(Z, dim=1))
    if out is None:
        out = features.new_empty(0, dtype=compute_dtype(features.dtype))
    return out


def linear_topk(features: Tensor, weight: Tensor, k: int, bias: Optional[Tensor] = None, *,
                softcap: Optional[float] = None, largest: bool = True) -> Tuple[Tensor, Tensor]:
    """``torch.topk`` of each row of ``softcap(features @ weight.T + bias)``, chunked.

    Shapes: features (N, D), weight (V, D) -> values (N, k) in the compute dtype and
    indices (N, k) int64, sorted; no gradient.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {k!r}")
    if isinstance(weight, Tensor) and weight.dim() == 2 and not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must lie in [1, {weight.shape[0]}] (number of classes), got {k}")
    N = features.shape[0] if isinstance(features, Tensor) and features.dim() == 2 else 0
    values = indices = None
    for r0, Z in _blocks(features, weight, bias, softcap, 1.0):
        if values is None:
            values = Z.new_empty(N, int(k))
            indices = torch.empty(N, int(k), dtype=torch.long, device=Z.device)
        v, i = torch.topk(Z, int(k), dim=1, largest=largest, sorted=True)
        values[r0:r0 + Z.shape[0]] = v
        indices[r0:r0 + Z.shape[0]] = i
    if values is None:
        values = features.new_empty(0, int(k), dtype=compute_dtype(features.dtype))
        indices = torch.empty(0, int(k), dtype=torch.long, device=features.device)
    return values, indices
