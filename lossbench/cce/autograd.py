"""The autograd function of (single-device) cut cross-entropy and its shared helpers.

:class:`_LinearCrossEntropy` runs the chunked pass (:func:`~lossbench.cce.dispatch._run`) in
forward and, depending on the mode, hands over the eagerly computed gradients or recomputes them in
backward; the gradient, precision and filtering rules are in :mod:`lossbench.cce.api`'s docstring.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import compute_dtype
from .dispatch import _run


def _mean_logit_order(E: Tensor, C: Tensor, b: Optional[Tensor], piece: int) -> Tensor:
    """Classes by descending batch-mean logit ``mean_i(e_i) . c_j + b_j`` (paper Sec. 4.3)."""
    cdt = compute_dtype(E.dtype)
    m = E.mean(0, dtype=cdt) if E.shape[0] else E.new_zeros(E.shape[1], dtype=cdt)
    V = C.shape[0]
    score = torch.empty(V, dtype=cdt, device=E.device)
    # a piece of C at a time; bf16/fp16 pieces are converted into one buffer (no temporaries)
    buf = (torch.empty(min(piece, V), C.shape[1], dtype=cdt, device=E.device)
           if C.dtype != cdt else None)
    for j0 in range(0, V, piece):
        part = C[j0:j0 + piece]
        if buf is not None:
            part = buf[:part.shape[0]].copy_(part)
        torch.mv(part, m, out=score[j0:j0 + piece])
    if b is not None:
        score += b.nan_to_num(neginf=torch.finfo(cdt).min)
    return torch.argsort(score, descending=True)


def _reduce_rows(rows: Tensor, reduction: str, denom: Tensor) -> Tensor:
    """Per-row losses reduced as ``reduction``: ``'mean'`` divides the sum by ``denom`` (the weight sum)."""
    if reduction == "mean":
        return rows.sum() / denom
    if reduction == "sum":
        return rows.sum()
    return rows


def _record(stats: Optional[dict], skipped: int, blocks: int, ntiles: int) -> None:
    if stats is not None:
        stats["tiles_skipped"] = stats.get("tiles_skipped", 0) + int(skipped)
        stats["tiles_total"] = stats.get("tiles_total", 0) + int(blocks * ntiles)


def _row_scales(grad_loss: Optional[Tensor], cfg: Dict[str, Any], valid: Tensor,
                denom: Tensor, cdt: torch.dtype) -> Tensor:
    """Per-row scale of d loss / d row-loss; exactly 0 on ignored rows (even for an inf grad)."""
    zero = torch.zeros((), dtype=cdt, device=valid.device)
    if grad_loss is None:
        return torch.zeros(valid.shape, dtype=cdt, device=valid.device)
    if cfg["reduction"] == "none":
        return torch.where(valid, grad_loss.to(cdt), zero)
    scale = grad_loss.to(cdt) / denom if cfg["reduction"] == "mean" else grad_loss.to(cdt)
    return torch.where(valid, scale, zero)


def _reference_graph(features: Tensor, weight: Tensor, bias: Optional[Tensor], tgt: Tensor,
                     class_weight: Optional[Tensor], cfg: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    """Differentiable loss and lse on materialised logits (used for double backward only)."""
    cdt = compute_dtype(features.dtype)
    z = F.linear(features.to(cdt), weight.to(cdt), bias.to(cdt) if bias is not None else None)
    if cfg["softcap"] > 0:
        z = cfg["softcap"] * torch.tanh(z / cfg["softcap"])
    cw = class_weight.to(cdt) if class_weight is not None else None
    loss = F.cross_entropy(z, tgt, weight=cw, ignore_index=-1, reduction=cfg["reduction"],
                           label_smoothing=cfg["label_smoothing"])
    return loss, torch.logsumexp(z, dim=1)


# --------------------------------------------------------------------------------------------
# autograd


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked linear cross-entropy; ``cfg`` holds the non-tensor options (api docstring)."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                class_weight: Optional[Tensor], cfg: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        cdt = compute_dtype(features.dtype)
        V = weight.shape[0]
        b = bias.to(cdt).contiguous() if bias is not None else None
        cw = class_weight.to(cdt).contiguous() if class_weight is not None else None
        ignore = target == cfg["ignore_index"]
        # -1 marks an ignored row; any other negative becomes -2, which the kernels reject
        tgt = torch.where(ignore, torch.full_like(target, -1),
                          torch.where(target < 0, torch.full_like(target, -2), target))
        tgt = tgt.contiguous()
        valid = (tgt >= 0) & (tgt < V)
        if cw is not None:
            wy = torch.where(valid, cw[tgt.clamp(0, V - 1)], torch.zeros((), dtype=cdt,
                                                                          device=cw.device))
        else:
            wy = valid.to(cdt)
        denom = wy.sum()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        if not cfg["grad_enabled"]:  # under torch.no_grad() needs_input_grad still says True
            need = (False, False, False)
        eager = (any(need) and cfg["reduction"] != "none" and not cfg["return_lse"]
                 and cdt == features.dtype)
        order = None
        if any(need) and cfg["sort"]:
            order = _mean_logit_order(features, weight, b, max(256, cfg["chunk_size"]))
        ctx.order = order
        if eager:
            g = torch.where(valid, (1.0 / denom if cfg["reduction"] == "mean"
                                    else torch.ones_like(denom)), torch.zeros_like(denom))
            run_need = need
        else:
            g = valid.to(cdt)
            run_need = (False, False, False)
        loss_rows, lse, dE, dC, db, skipped, _ = _run(
            cfg["impl"], features, weight, b, tgt, cw, g.contiguous(), None, None, order,
            cfg["label_smoothing"], cfg["softcap"], cfg["filter_eps"], cfg["chunk_size"],
            cfg["block_rows"], *run_need, cfg["accum_c_fp32"])
        if eager:
            _record(cfg["stats"], skipped, -(-features.shape[0] // cfg["block_rows"]),
                    -(-V // cfg["chunk_size"]))
        loss = _reduce_rows(loss_rows, cfg["reduction"], denom)
        ctx.cfg = cfg
        ctx.mode = "eager" if eager else "recompute"
        ctx.grads = [dE, dC, db if bias is not None else None] if eager else None
        if any(need):  # references only; lets a second backward (retain_graph) recompute
            ctx.save_for_backward(features, weight, bias, tgt, class_weight, valid, denom)
        return loss.to(features.dtype), lse

    @staticmethod
    def backward(ctx, grad_loss: Optional[Tensor], grad_lse: Optional[Tensor]):
        cfg = ctx.cfg
        features, weight, bias, tgt, class_weight, valid, denom = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        if torch.is_grad_enabled():
            # create_graph=True: exact double backward through a differentiable rebuild.
            loss, lse = _reference_graph(features, weight, bias, tgt, class_weight, cfg)
            outs, gos = [], []
            if grad_loss is not None:
                outs.append(loss)
                gos.append(grad_loss.to(loss.dtype))
            if grad_lse is not None:
                outs.append(lse)
                gos.append(grad_lse.to(lse.dtype))
            inputs = [x for x, n in zip((features, weight, bias), need) if n]
            got = list(torch.autograd.grad(outs, inputs, gos, create_graph=True,
                                           allow_unused=True)) if outs and inputs else []
            res = [got.pop(0) if n else None for n in need]
            return (*[r.to(x.dtype) if r is not None else None
                      for r, x in zip(res, (features, weight, bias))], None, None, None)
        if ctx.mode == "eager" and ctx.grads is not None:
            # Hand the eagerly computed gradients over (no copy); a later backward through the
            # same graph (retain_graph=True) recomputes them below.
            grads, ctx.grads = ctx.grads, None
            if grad_loss is None:
                return (None,) * 6
            if bool(grad_loss != 1):
                grads = [t.mul_(grad_loss.to(t.dtype)) if t is not None else None for t in grads]
            return grads[0], grads[1], grads[2], None, None, None

        cdt = compute_dtype(features.dtype)
        g = _row_scales(grad_loss, cfg, valid, denom, cdt)
        dlse = grad_lse.to(cdt).contiguous() if grad_lse is not None else None
        b = bias.to(cdt).contiguous() if bias is not None else None
        cw = class_weight.to(cdt).contiguous() if class_weight is not None else None
        _, _, dE, dC, db, skipped, _ = _run(
            cfg["impl"], features, weight, b, tgt, cw, g.contiguous(), dlse, None, ctx.order,
            cfg["label_smoothing"], cfg["softcap"], cfg["filter_eps"], cfg["chunk_size"],
            cfg["block_rows"], *need, cfg["accum_c_fp32"])
        _record(cfg["stats"], skipped, -(-features.shape[0] // cfg["block_rows"]),
                -(-weight.shape[0] // cfg["chunk_size"]))
        return (dE.to(features.dtype) if dE is not None else None,
                dC.to(weight.dtype) if dC is not None else None,
                db.to(bias.dtype) if db is not None else None, None, None, None)
