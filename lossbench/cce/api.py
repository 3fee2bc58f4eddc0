"""Cut cross-entropy: ``F.cross_entropy(features @ weight.T + bias, target)`` without N x V logits.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009);
official code apple/ml-cross-entropy (``cut_cross_entropy/linear_cross_entropy.py``, ``cce.py``).
``loss_i = LSE_j(e_i . c_j + b_j) - (e_i . c_y + b_y)``, computed a block of rows at a time so
that only an R x V block of logits is ever held (R chosen from a memory budget, see
:func:`block_rows`). Also here: the evaluation reductions :func:`linear_logsumexp` (the energy OOD
score), :func:`linear_max_softmax` and :func:`linear_topk`, which never hold N x V either.

Gradients. When the loss is reduced (``'mean'``/``'sum'``) and no differentiable log-sum-exp is
returned, the gradients of E, C and bias are computed during the forward pass from the same
logits block (3 GEMMs instead of 4) and only scaled by the incoming gradient in backward (a
second backward through the same graph recomputes them). Otherwise (``reduction='none'`` or
``return_lse=True``) backward recomputes each block (4 GEMMs).

Gradient filtering (paper Sec. 4.3; ``filter_eps='auto'`` = ``torch.finfo(dtype).eps / 32`` as in
the official ``utils._handle_eps``). The vocabulary is cut into tiles of ``chunk_size`` classes;
in a block of rows, a tile is left out of the gradient GEMMs when every live row has softmax
probability ``p < filter_eps`` for every class in it and no row's target lies in it. Each dropped
entry of d loss / d logits is then ``|dZ_ij| <= (|g_i| w_{y_i} + |dlse_i|) * filter_eps``, so

    ||Delta dE_i||_2 <= filter_eps (|g_i| w_{y_i} + |dlse_i|) sum_{j skipped} ||c_j||_2,
    ||Delta dC_j||_2 <= filter_eps sum_i (|g_i| w_{y_i} + |dlse_i|) ||e_i||_2,

with ``g_i`` the per-row loss-gradient scale (e.g. ``1 / sum of target weights`` for 'mean') and
``w`` the class weights (1 without); the bias gradient is exact. Filtering is off with label
smoothing (its uniform term reaches every class) and with ``filter_eps=None``. Unlike the paper
the vocabulary is not re-sorted by average logit.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_finite, check_float, check_target, checks_enabled
from . import ext
from .reference import RunResult, torch_run

__all__ = [
    "linear_cross_entropy", "linear_logsumexp", "linear_max_softmax", "linear_topk",
    "block_rows", "resolve_impl", "DEFAULT_CHUNK_SIZE", "ROW_BLOCK_ELEMENTS",
]

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "ext")
DEFAULT_CHUNK_SIZE = 4096
# Budget for the R x V logits block, in elements, per device type (float32: CPU 48 MiB, CUDA
# 256 MiB), and the fewest rows a block gets whatever V (below ~256 rows the CPU GEMMs lose
# 20-40 % of their rate). The block is about R / (3 N) of what the materialised loss holds.
ROW_BLOCK_ELEMENTS: Dict[str, int] = {"cpu": 3 << 22, "cuda": 1 << 26}
MIN_BLOCK_ROWS: Dict[str, int] = {"cpu": 256, "cuda": 256}
MAX_BLOCK_ROWS: Dict[str, int] = {"cpu": 1024, "cuda": 8192}
_DEFAULT_BLOCK_ELEMENTS = 1 << 24


def block_rows(n: int, v: int, device: torch.device) -> int:
    """Rows per block: ``ROW_BLOCK_ELEMENTS // V`` within ``[MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]``."""
    budget = ROW_BLOCK_ELEMENTS.get(device.type, _DEFAULT_BLOCK_ELEMENTS)
    rows = max(1, budget // max(1, v))
    rows = max(MIN_BLOCK_ROWS.get(device.type, 1), min(MAX_BLOCK_ROWS.get(device.type, rows), rows))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(rows, max(1, n)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32 (bf16/fp16 GEMMs included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` resolves to on ``device``: 'torch' or 'ext'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if device.type not in ("cpu", "cuda"):
        if impl == "ext":
            ext.warn_fallback(f"it has no kernels for device {device}")
        return "torch"
    module = ext.load()
    if module is None:
        if impl == "ext":
            ext.warn_fallback("it could not be built")
        return "torch"
    if device.type == "cuda" and not module.has_cuda():
        ext.warn_fallback("it was built without CUDA kernels")
        return "torch"
    return "ext"


def _run(impl: str, *args: Any) -> RunResult:
    if impl == "ext":
        loss, lse, dE, dC, db, skipped = ext.load().run(*args)  # type: ignore[union-attr]
        return loss, lse, dE, dC, db, int(skipped)
    return torch_run(*args)


# --------------------------------------------------------------------------------------------
# validation


def _check_finite(x: Tensor, name: str) -> None:
    """``check_finite`` in one reduction: a float64 sum is finite iff every entry is (for
    float32/16 inputs); only when it is not does the exact check run (and raise)."""
    if checks_enabled() and not bool(torch.isfinite(x.sum(dtype=torch.float64))):
        check_finite(x, name)


def _check_same_device(ref: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but features is on {ref.device}; "
                             "expected every tensor on the same device")


def _check_contiguous(**tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape "
                             f"{tuple(t.shape)}); call .contiguous() first")


def _check_linear(features: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_float(features, "features", ndim=2)
    check_float(weight, "weight", ndim=2)
    if weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must have shape (V, D) with D = features width "
                         f"{features.shape[1]}, got weight shape {tuple(weight.shape)}")
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
    _check_contiguous(features=features, weight=weight, bias=bias)
    _check_finite(features, "features")
    _check_finite(weight, "weight")
    if bias is not None:
        _check_finite(bias, "bias")


def _check_softcap(softcap: Optional[float]) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0:
        raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}")
    return float(softcap)


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int > 0, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return int(chunk_size)


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


# --------------------------------------------------------------------------------------------
# autograd


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked linear cross-entropy; ``cfg`` holds the non-tensor options (see module doc)."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                class_weight: Optional[Tensor], cfg: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        cdt = _compute_dtype(features.dtype)
        E = features.to(cdt).contiguous()
        C = weight.to(cdt).contiguous()
        b = bias.to(cdt).contiguous() if bias is not None else None
        cw = class_weight.to(cdt).contiguous() if class_weight is not None else None
        ignore = target == cfg["ignore_index"]
        tgt = torch.where(ignore, torch.full_like(target, -1), target).contiguous()
        valid = (~ignore).to(cdt)
        if cw is not None:
            wy = cw[tgt.clamp_min(0)] * valid
        else:
            wy = valid
        denom = wy.sum()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        if not cfg["grad_enabled"]:  # under torch.no_grad() needs_input_grad still says True
            need = (False, False, False)
        eager = any(need) and cfg["reduction"] != "none" and not cfg["return_lse"]
        if eager:
            scale = 1.0 / denom if cfg["reduction"] == "mean" else torch.ones_like(denom)
            g = torch.where(valid > 0, scale, torch.zeros_like(scale))
            run_need = need
        else:
            g = valid
            run_need = (False, False, False)
        loss_rows, lse, dE, dC, db, skipped = _run(
            cfg["impl"], E, C, b, tgt, cw, g.contiguous(), None, cfg["label_smoothing"],
            cfg["softcap"], cfg["filter_eps"], cfg["chunk_size"], cfg["block_rows"], *run_need)
        if cfg["reduction"] == "mean":
            loss = loss_rows.sum() / denom
        elif cfg["reduction"] == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows
        ctx.cfg = cfg
        ctx.mode = "eager" if eager else "recompute"
        ctx.dtypes = (features.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if eager:
            ctx.grads = [
                dE.to(features.dtype) if dE is not None else None,
                dC.to(weight.dtype) if dC is not None else None,
                db.to(bias.dtype) if (db is not None and bias is not None) else None,
            ]
        if any(need):  # references only; lets a second backward (retain_graph) recompute
            ctx.save_for_backward(features, weight, bias, tgt, class_weight, valid, denom)
        return loss.to(features.dtype), lse

    @staticmethod
    def backward(ctx, grad_loss: Optional[Tensor], grad_lse: Optional[Tensor]):
        cfg = ctx.cfg
        if ctx.mode == "eager" and ctx.grads is not None:
            # Hand the eagerly computed gradients over (no copy); a later backward through the
            # same graph (retain_graph=True) recomputes them below.
            grads, ctx.grads = ctx.grads, None
            if grad_loss is None:
                return (None,) * 6
            if bool(grad_loss != 1):
                grads = [t.mul_(grad_loss.to(t.dtype)) if t is not None else None for t in grads]
            return grads[0], grads[1], grads[2], None, None, None

        features, weight, bias, tgt, class_weight, valid, denom = ctx.saved_tensors
        cdt = valid.dtype
        if grad_loss is None:
            g = torch.zeros_like(valid)
        elif cfg["reduction"] == "none":
            g = grad_loss.to(cdt) * valid
        elif cfg["reduction"] == "mean":
            scale = grad_loss.to(cdt) / denom
            g = torch.where(valid > 0, scale, torch.zeros_like(scale))
        else:
            g = valid * grad_loss.to(cdt)
        dlse = grad_lse.to(cdt).contiguous() if grad_lse is not None else None
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        E = features.to(cdt).contiguous()
        C = weight.to(cdt).contiguous()
        b = bias.to(cdt).contiguous() if bias is not None else None
        cw = class_weight.to(cdt).contiguous() if class_weight is not None else None
        _, _, dE, dC, db, _ = _run(
            cfg["impl"], E, C, b, tgt, cw, g.contiguous(), dlse, cfg["label_smoothing"],
            cfg["softcap"], cfg["filter_eps"], cfg["chunk_size"], cfg["block_rows"], *need)
        return (dE.to(features.dtype) if dE is not None else None,
                dC.to(weight.dtype) if dC is not None else None,
                db.to(bias.dtype) if db is not None else None, None, None, None)


# --------------------------------------------------------------------------------------------
# public API


def linear_cross_entropy(
    features: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    filter_eps: Union[str, float, None] = "auto",
    impl: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Cross-entropy of ``softcap(features @ weight.T + bias)`` without materialising the logits.

    Same meaning as ``F.cross_entropy(features @ weight.T + bias, target, weight=class_weight,
    ignore_index=..., reduction=..., label_smoothing=...)`` ('mean' divides by the sum of the
    target weights, i.e. the number of non-ignored rows without ``class_weight``; a batch with
    no such row gives ``nan`` for 'mean', as in torch). Cut cross-entropy, Wijmans et al. 2024
    (arXiv:2411.09009); soft-cap ``softcap * tanh(z / softcap)`` as in the official code.

    Args:
        features: (N, D) float tensor ``E``; bf16/fp16 are computed in float32.
        weight: (V, D) classifier ``C``, same dtype and device as ``features``.
        target: (N,) int64 class indices in ``[0, V)`` or ``ignore_index``.
        bias: optional (V,) bias.
        class_weight: optional (V,) per-class weights (torch's ``weight=``; receives no gradient).
        return_lse: also return the (N,) float32/float64 log-sum-exp of every row (ignored rows
            included), differentiable -- e.g. for a log-partition (z-loss) penalty.
        chunk_size: vocabulary tile width (classes) of the gradient filter.
        filter_eps: 'auto' (``finfo(features.dtype).eps / 32``), a float, or None (no filtering).
        impl: 'auto' (the compiled extension when available, else 'torch'), 'ext' or 'torch'.

    Returns:
        the loss (scalar, or (N,) with ``reduction='none'``) in ``features.dtype``; with
        ``return_lse`` the tuple ``(loss, lse)``.
    """
    _check_linear(features, weight, bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    N, V = features.shape[0], weight.shape[0]
    if not isinstance(target, Tensor):
        raise TypeError("target must be a torch.Tensor of class indices, "
                        f"got {type(target).__name__}")
    _check_same_device(features, target=target, class_weight=class_weight)
    check_target(target, V, N, "target", int(ignore_index))
    _check_contiguous(target=target, class_weight=class_weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or \
            not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if class_weight is not None:
        check_float(class_weight, "class_weight", ndim=1)
        if class_weight.shape[0] != V:
            raise ValueError(f"class_weight must have shape ({V},), "
                             f"got {tuple(class_weight.shape)}")
        check_finite(class_weight, "class_weight")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    cfg = {
        "ignore_index": int(ignore_index),
        "reduction": reduction,
        "label_smoothing": float(label_smoothing),
        "softcap": _check_softcap(softcap),
        "return_lse": return_lse,
        "chunk_size": _check_chunk_size(chunk_size),
        "filter_eps": (-1.0 if label_smoothing > 0
                       else _filter_threshold(filter_eps, features.dtype)),
        "impl": resolve_impl(impl, features.device),
        "block_rows": block_rows(N, V, features.device),
        "grad_enabled": torch.is_grad_enabled(),
    }
    loss, lse = _LinearCrossEntropy.apply(features, weight, bias, target, class_weight, cfg)
    return (loss, lse) if return_lse else loss


def _blocks(features: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
            temperature: float):
    """Yield ``(start, logits block / temperature)`` in the compute dtype, without autograd."""
    _check_linear(features, weight, bias)
    cap = _check_softcap(softcap)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    cdt = _compute_dtype(features.dtype)
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
        out = features.new_empty(0, dtype=_compute_dtype(features.dtype))
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
        out = features.new_empty(0, dtype=_compute_dtype(features.dtype))
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
        values = features.new_empty(0, int(k), dtype=_compute_dtype(features.dtype))
        indices = torch.empty(0, int(k), dtype=torch.long, device=features.device)
    return values, indices
