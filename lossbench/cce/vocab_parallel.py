"""Vocab-parallel cut cross-entropy: the classifier's rows sharded over a process group.

Each rank runs the chunked pass on its own shard; the log-sum-exp, the target logit and its
weight are combined with all-reduces (see :mod:`lossbench.cce.api`'s docstring).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..validation import compute_dtype
from .autograd import _record, _reduce_rows, _row_scales
from .dispatch import _run


def _shard_offset(V_local: int, group: Any, device: torch.device) -> Tuple[int, int]:
    """(first global class of this rank's shard, global V) from every rank's shard size."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([V_local], dtype=torch.long, device=device), group=group)
    sizes_i = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes_i[:rank]), sum(sizes_i)


def _smoothing_sums(features: Tensor, weight: Tensor, b: Optional[Tensor], cw: Optional[Tensor],
                    cdt: torch.dtype, group: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """(local ``u = sum_j w_j c_j``, global ``W = sum_j w_j``, global ``S_i = e_i . u + sum_j w_j b_j``)."""
    w = cw if cw is not None else torch.ones(weight.shape[0], dtype=cdt, device=weight.device)
    u = w @ weight.to(cdt)
    beta = (w * b).sum() if b is not None else torch.zeros((), dtype=cdt, device=weight.device)
    import torch.distributed as dist

    both = torch.cat([u, beta[None], w.sum()[None]])
    dist.all_reduce(both, group=group)
    S = features.to(cdt) @ both[:-2] + both[-2]
    return u, both[-1], S


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Linear cross-entropy with the classifier's rows sharded over ``cfg['group']``."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                class_weight: Optional[Tensor], cfg: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
        import torch.distributed as dist

        ctx.set_materialize_grads(False)
        group = cfg["group"]
        cdt = compute_dtype(features.dtype)
        Vl = weight.shape[0]
        off = cfg["offset"]
        b = bias.to(cdt).contiguous() if bias is not None else None
        cw = class_weight.to(cdt).contiguous() if class_weight is not None else None
        ignore = target == cfg["ignore_index"]
        valid = ~ignore & (target >= 0) & (target < cfg["vocab"])
        local = valid & (target >= off) & (target < off + Vl)
        tl = torch.where(local, target - off, torch.full_like(target, -1)).contiguous()
        zeros = torch.zeros(target.shape, dtype=cdt, device=features.device)
        _, lse_l, *_ = _run(cfg["impl"], features, weight, b, tl, cw, zeros, None, None,
                            None, 0.0, cfg["softcap"], -1.0, cfg["chunk_size"],
                            cfg["block_rows"], False, False, False, False)
        # target logit and weight by a gather-dot on the owning rank, summed over the ranks
        idx = tl.clamp_min(0)
        zy = (features.to(cdt) * weight[idx].to(cdt)).sum(1)
        if b is not None:
            zy = zy + b[idx]
        if cfg["softcap"] > 0:
            zy = cfg["softcap"] * torch.tanh(zy / cfg["softcap"])
        wy = cw[idx] if cw is not None else torch.ones_like(zy)
        both = torch.stack([torch.where(local, zy, zeros), torch.where(local, wy, zeros)])
        dist.all_reduce(both, group=group)
        zy, wy = both[0], torch.where(valid, both[1], zeros)
        M = lse_l.clone()
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
        S = torch.exp(lse_l - M)
        dist.all_reduce(S, group=group)
        lse = M + torch.log(S)
        rows = torch.where(valid, wy * (lse - zy), zeros)
        eps = cfg["label_smoothing"]
        u = W = None
        if eps > 0:
            # F.cross_entropy's smoothing: (1 - eps) w_y (lse - z_y) + (eps / V) sum_j w_j (lse - z_j); the
            # sum over the sharded classes is linear in the logits: W lse_i - (e_i . u + beta)
            u, W, S = _smoothing_sums(features, weight, b, cw, cdt, group)
            rows = torch.where(valid, (1.0 - eps) * rows + (eps / cfg["vocab"]) * (W * lse - S), zeros)
        # out-of-range targets (value checks off): a NaN row, never a silently skipped one
        rows = torch.where(~ignore & ~valid, torch.full_like(rows, float("nan")), rows)
        denom = wy.sum()
        loss = _reduce_rows(rows, cfg["reduction"], denom)
        ctx.cfg = cfg
        ctx.u_local, ctx.W = u, W  # the smoothing sums, reused by backward (no second all-reduce)
        ctx.save_for_backward(features, weight, bias, tl, class_weight, valid, local, wy, lse,
                              denom)
        return loss.to(features.dtype), lse

    @staticmethod
    def backward(ctx, grad_loss: Optional[Tensor], grad_lse: Optional[Tensor]):
        import torch.distributed as dist

        if torch.is_grad_enabled():
            raise RuntimeError("linear_cross_entropy: double backward (create_graph=True) is not "
                               "supported with process_group (vocab-parallel)")
        cfg = ctx.cfg
        features, weight, bias, tl, class_weight, valid, local, wy, lse, denom = ctx.saved_tensors
        cdt = compute_dtype(features.dtype)
        g = _row_scales(grad_loss, cfg, valid, denom, cdt)
        dl = grad_lse.to(cdt) if grad_lse is not None else torch.zeros_like(g)
        b = bias.to(cdt).contiguous() if bias is not None else None
        cw = class_weight.to(cdt).contiguous() if class_weight is not None else None
        eps = cfg["label_smoothing"]
        g_row = g
        if eps > 0:
            # d row / d z_j = (1 - eps) w_y (p_j - [j = y]) + (eps / V) (W p_j - w_j): the kernel takes the
            # target part at scale (1 - eps) g, the softmax part eps W / V through dl, and the dense
            # -(eps / V) w_j part is added below
            dl = dl + torch.where(valid, g * (eps * ctx.W / cfg["vocab"]), torch.zeros_like(g))
            g_row = g * (1.0 - eps)
        # Rows whose target lives on another rank: the kernel sees no target there, so the
        # target's weight enters through the softmax coefficient (see the api docstring).
        dl = (dl + torch.where(valid & ~local, g_row * wy, torch.zeros_like(g))).contiguous()
        need_de = ctx.needs_input_grad[0]
        need = (need_de, ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        # every rank must join the all-reduce of dE, so all compute it when any rank may need it
        need = (True, need[1], need[2])
        _, _, dE, dC, db, skipped, _ = _run(
            cfg["impl"], features, weight, b, tl, cw, g_row.contiguous(), dl,
            lse.contiguous(), None, 0.0, cfg["softcap"], cfg["filter_eps"],
            cfg["chunk_size"], cfg["block_rows"], *need, cfg["accum_c_fp32"])
        _record(cfg["stats"], skipped, -(-features.shape[0] // cfg["block_rows"]),
                -(-weight.shape[0] // cfg["chunk_size"]))
        dEf = dE.to(cdt)
        if eps > 0:
            # the dense part -(eps / V) g_i w_j of d loss / d z_ij
            c = eps / cfg["vocab"]
            dEf = dEf - c * g[:, None] * ctx.u_local[None, :]
            wj = cw if cw is not None else torch.ones(weight.shape[0], dtype=cdt, device=g.device)
            if dC is not None:
                dC = (dC.to(cdt) - c * wj[:, None] * (g @ features.to(cdt))[None, :])
            if db is not None:
                db = db.to(cdt) - c * wj * g.sum()
        dist.all_reduce(dEf, group=cfg["group"])
        return (dEf.to(features.dtype) if need_de else None,
                dC.to(weight.dtype) if dC is not None else None,
                db.to(bias.dtype) if db is not None else None, None, None, None)
