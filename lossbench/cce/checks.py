"""Argument checks of the cut cross-entropy API: clear ValueError/TypeError for bad input."""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..validation import check_finite, check_float, checks_enabled

REDUCTIONS = ("mean", "sum", "none")


# Elements per piece of the float64 sum of :func:`_check_finite` (an 8 MiB float64 buffer).
FINITE_SUM_PIECE = 1 << 20


def _float64_sum(x: Tensor) -> Tensor:
    """``x.sum(dtype=torch.float64)`` a piece of at most ``FINITE_SUM_PIECE`` elements at a time.

    A reduction with ``dtype=`` first converts the whole input to that dtype, so the plain call
    holds a float64 copy of ``x`` (four times a bf16 weight, twice a float32 one). Here each piece
    is copied into one float64 buffer, allocated once (a temporary per piece would leave the
    allocator's heap fragmented by that size).
    """
    if x.dtype == torch.float64 or x.numel() <= FINITE_SUM_PIECE:
        return x.sum(dtype=torch.float64)
    flat = x.reshape(-1, 1) if x.dim() < 2 else x.flatten(0, -2)  # a view for a 2-D weight
    rows = max(1, FINITE_SUM_PIECE // max(1, flat.shape[1]))
    buf = torch.empty(min(rows, flat.shape[0]), flat.shape[1], dtype=torch.float64,
                      device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for part in flat.split(rows):
        total += buf[:part.shape[0]].copy_(part).sum()
    return total


def _check_finite(x: Tensor, name: str, allow_neg_inf: bool = False) -> None:
    """``check_finite`` in one reduction: a float64 sum is finite iff every entry is (for
    float32/16 inputs); only when it is not does the exact check run (and raise). The sum is
    taken a piece at a time (:func:`_float64_sum`): no float64 copy of a whole weight."""
    if not checks_enabled() or bool(torch.isfinite(_float64_sum(x))):
        return
    if allow_neg_inf:
        bad = int((torch.isnan(x) | (x == float("inf"))).sum())
        if bad:
            raise ValueError(f"{name} contains {bad} NaN/+inf value(s); expected finite values "
                             "or -inf (masked classes)")
        return
    check_finite(x, name)


def _check_same_device(ref: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but features is on {ref.device}; "
                             "expected every tensor on the same device")


def _check_linear(features: Tensor, weight: Tensor, bias: Optional[Tensor],
                  any_lead: bool = False) -> None:
    check_float(features, "features", ndim=None if any_lead else 2)
    if any_lead and features.dim() < 1:
        raise ValueError("features must have shape (..., D), got a 0-d tensor")
    check_float(weight, "weight", ndim=2)
    D = features.shape[-1]
    if weight.shape[1] != D:
        raise ValueError(f"weight must have shape (V, D) with D = features width "
                         f"{D}, got weight shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must hold at least one class, got shape {tuple(weight.shape)}")
    if weight.dtype != features.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match features dtype {features.dtype}")
    if bias is not None:
        check_float(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != features.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match features dtype {features.dtype}")
    _check_same_device(features, weight=weight, bias=bias)
    _check_finite(features, "features")
    _check_finite(weight, "weight")
    if bias is not None:
        _check_finite(bias, "bias", allow_neg_inf=True)


def _check_softcap(softcap: Optional[float]) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0:
        raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}")
    return float(softcap)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def _check_chunk_size(chunk_size: int) -> int:
    return _check_positive_int(chunk_size, "chunk_size")


def _filter_threshold(filter_eps: Union[str, float, None], dtype: torch.dtype) -> float:
    if filter_eps is None:
        return -1.0
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be 'auto', None or a float >= 0, got {filter_eps!r}")
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, numbers.Real) or filter_eps < 0:
        raise ValueError(f"filter_eps must be 'auto', None or a float >= 0, got {filter_eps!r}")
    return float(filter_eps) if filter_eps > 0 else -1.0


def _check_target(target: Tensor, lead: Tuple[int, ...], V: int, ignore_index: int) -> None:
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError("target must hold integer class indices (any integer dtype), "
                        f"got dtype {target.dtype}")
    if tuple(target.shape) != tuple(lead):
        raise ValueError(f"target must have shape {tuple(lead)} (features' leading dims: the batch size), "
                         f"got {tuple(target.shape)}")
    if checks_enabled() and target.numel():
        t = target.long()
        live = t[t != ignore_index]
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= V):
            raise ValueError(f"target values must lie in [0, {V}) (or ignore_index="
                             f"{ignore_index}); got min {int(live.min())}, max {int(live.max())}")


def _check_shift(shift: Union[int, bool], lead: Tuple[int, ...]) -> int:
    if isinstance(shift, bool):
        shift = int(shift)
    if not isinstance(shift, numbers.Integral) or shift < 0:
        raise ValueError(f"shift must be an int >= 0 (or a bool), got {shift!r}")
    shift = int(shift)
    if shift and len(lead) < 1:
        raise ValueError("shift needs features of shape (..., T, D) with a sequence dim T")
    return shift


def _check_class_weight(class_weight: Optional[Tensor], V: int) -> None:
    if class_weight is None:
        return
    check_float(class_weight, "class_weight", ndim=1)
    if class_weight.shape[0] != V:
        raise ValueError(f"class_weight must have shape ({V},), got {tuple(class_weight.shape)}")
    check_finite(class_weight, "class_weight")


def _check_flags(return_lse: Any, accum_c_fp32: Any, sort_vocab: Any, stats: Any) -> None:
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if not isinstance(accum_c_fp32, bool):
        raise TypeError(f"accum_c_fp32 must be a bool, got {accum_c_fp32!r}")
    if sort_vocab is not None and not isinstance(sort_vocab, bool):
        raise TypeError(f"sort_vocab must be None or a bool, got {sort_vocab!r}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be None or a dict, got {type(stats).__name__}")


def _check_loss_args(features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Any,
                     class_weight: Optional[Tensor], opts: Dict[str, Any]) -> Tuple[int, int,
                                                                                   Optional[int]]:
    """Every check of ``linear_cross_entropy``'s arguments but the target values, in order.

    ``opts`` holds its keyword arguments by name; returns ``(shift, chunk_size, rows_per_block)``
    as plain ints (``rows_per_block`` may stay None).
    """
    _check_linear(features, weight, bias, any_lead=True)
    ignore_index = opts["ignore_index"]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(target, Tensor):
        raise TypeError("target must be a torch.Tensor of class indices, "
                        f"got {type(target).__name__}")
    _check_same_device(features, target=target, class_weight=class_weight)
    shift = _check_shift(opts["shift"], tuple(features.shape[:-1]))
    if opts["reduction"] not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {opts['reduction']!r}")
    ls = opts["label_smoothing"]
    if isinstance(ls, bool) or not isinstance(ls, numbers.Real) or not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {ls!r}")
    _check_class_weight(class_weight, weight.shape[0])
    _check_flags(opts["return_lse"], opts["accum_c_fp32"], opts["sort_vocab"], opts["stats"])
    chunk = _check_chunk_size(opts["chunk_size"])
    rows = opts["rows_per_block"]
    if rows is not None:
        rows = _check_positive_int(rows, "rows_per_block")
    return shift, chunk, rows
