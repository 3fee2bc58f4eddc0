"""Cut cross-entropy: ``F.cross_entropy(features @ weight.T + bias, target)`` without N x V logits.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009);
official code apple/ml-cross-entropy (``cut_cross_entropy/linear_cross_entropy.py``, ``cce.py``).
``loss_i = LSE_j(e_i . c_j + b_j) - (e_i . c_y + b_y)``, computed a block of rows at a time so
that only an R x V block of logits is ever held (R from a memory budget, see :func:`block_rows`,
or ``rows_per_block``). Also here: the evaluation reductions :func:`linear_logsumexp` (the
energy OOD score), :func:`linear_max_softmax` and :func:`linear_topk`.

Gradients. For float32/float64 inputs with a reduced loss ('mean'/'sum') and no differentiable
log-sum-exp, the gradients of E, C and bias are computed during the forward pass from the same
logits block (3 GEMMs instead of 4) and only scaled by the incoming gradient in backward.
Otherwise (``reduction='none'``, ``return_lse=True``, bf16/fp16 inputs, vocab-parallel) backward
recomputes each block (4 GEMMs) with the upstream gradient (e.g. a GradScaler's scale) applied in
float32 before anything is rounded to the input dtype. Double backward (``create_graph=True``)
is exact: the backward pass is then rebuilt from differentiable ops on materialised logits
(O(N V) memory, meant for gradient penalties on small problems, not for training at scale).

Low precision. bf16/fp16 features and weight are never copied whole to float32: on CPU a row
block of E and a piece of C (at most about one logits block) are converted at a time; on CUDA
the GEMMs run in the input dtype with float32 output. The row pass is float32, the gradient of a
row block of E is accumulated in float32 and rounded once; dC is accumulated across row blocks in
the input dtype (as apple's default) unless ``accum_c_fp32=True``, which holds a float32 V x D
accumulator (4 V D bytes more) and rounds once.

Gradient filtering (paper Sec. 4.3; ``filter_eps='auto'`` = ``torch.finfo(dtype).eps / 32`` as in
the official ``utils._handle_eps``). The vocabulary is cut into tiles of ``chunk_size`` classes;
with ``sort_vocab`` (default when filtering) the classes are first ordered by their batch-mean
logit ``mean_i(e_i) . c_j + b_j`` (descending), as in the paper, so that the classes no row needs
are contiguous. In a block of rows, a tile is left out of the gradient GEMMs when every live row
has softmax probability ``p < filter_eps`` for every non-target class in it; each row's target
entry of d loss / d logits is applied exactly outside the tiles (a gather-dot and an
index-add), so a target never forces its tile in. Each dropped entry is then
``|dZ_ij| <= (|g_i| |w_{y_i}| + |dlse_i|) p_ij`` with ``j != y_i``, so

    ||Delta dE_i||_2 <= filter_eps (|g_i| |w_{y_i}| + |dlse_i|) sum_{j skipped} ||c_j||_2,
    ||Delta dC_j||_2 <= filter_eps sum_i (|g_i| |w_{y_i}| + |dlse_i|) ||e_i||_2,

with ``g_i`` the per-row loss-gradient scale (e.g. ``grad / sum of target weights`` for 'mean')
and ``w`` the class weights (1 without; their absolute value when negative); the bias gradient is
exact. Filtering is off with label smoothing (its uniform term reaches every class) and with
``filter_eps=None``. Pass a dict as ``stats`` to receive the skipped and total tile counts.

Vocab-parallel (``process_group``): each rank holds a shard of the classifier -- consecutive
classes, rank r's block after those of the lower ranks -- as ``weight`` (and ``bias``,
``class_weight``), and the same features and (global) targets. The log-sum-exp, the target logit
and weight are combined across the ranks with all-reduces; the loss, the log-sum-exp and the
gradient of the features (all-reduced) equal the unsharded ones, and each rank gets the gradient
of its own shard.
"""

from __future__ import annotations

import math
import numbers
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_finite, check_float, checks_enabled
from . import ext
from .reference import RunResult, compute_dtype, torch_run

__all__ = [
    "linear_cross_entropy", "linear_logsumexp", "linear_max_softmax", "linear_topk",
    "block_rows", "resolve_impl", "DEFAULT_CHUNK_SIZE", "ROW_BLOCK_ELEMENTS",
]

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "ext")
DEFAULT_CHUNK_SIZE = 512
# Budget for the R x V logits block, in elements, per device type (float32: CPU 48 MiB, CUDA
# 256 MiB), and the fewest rows a block gets whatever V (below ~256 rows the CPU GEMMs lose
# 20-40 % of their rate), so above V = budget / MIN_BLOCK_ROWS (49,152 on CPU) the default block
# exceeds the budget; pass ``rows_per_block`` to cap it.
ROW_BLOCK_ELEMENTS: Dict[str, int] = {"cpu": 3 << 22, "cuda": 1 << 26}
MIN_BLOCK_ROWS: Dict[str, int] = {"cpu": 256, "cuda": 256}
MAX_BLOCK_ROWS: Dict[str, int] = {"cpu": 1024, "cuda": 8192}
_DEFAULT_BLOCK_ELEMENTS = 1 << 24

_compute_dtype = compute_dtype


def block_rows(n: int, v: int, device: torch.device) -> int:
    """Rows per block: ``ROW_BLOCK_ELEMENTS // V`` within ``[MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]``."""
    budget = ROW_BLOCK_ELEMENTS.get(device.type, _DEFAULT_BLOCK_ELEMENTS)
    rows = max(1, budget // max(1, v))
    rows = max(MIN_BLOCK_ROWS.get(device.type, 1), min(MAX_BLOCK_ROWS.get(device.type, rows), rows))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(rows, max(1, n)))


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


# --------------------------------------------------------------------------------------------
# threads under load


def _other_runnable() -> Optional[int]:
    """Runnable tasks on the machine that are not threads of this process (None if unknown)."""
    try:
        with open("/proc/loadavg") as fh:
            running = int(fh.read().split()[3].split("/")[0])
        ours = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "R":
                    ours += 1
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - ours)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for_load(threads: int, cpus: int, others: Optional[int]) -> int:
    """Threads to run with when ``others`` runnable tasks compete for ``cpus`` CPUs.

    OpenMP's default wait policy spins at every barrier; when the threads outnumber the free
    CPUs a spinning thread holds the CPU its late peer needs, and a small step slows ~10x. So
    only as many threads as there are free CPUs (at least 1) are used; on a quiet machine
    nothing changes.
    """
    if others is None or threads <= 1:
        return threads
    return max(1, min(threads, cpus - others))


@contextmanager
def _load_aware_threads(device: torch.device) -> Iterator[None]:
    if device.type != "cpu" or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        yield
        return
    old = torch.get_num_threads()
    n = threads_for_load(old, _available_cpus(), _other_runnable())
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run(impl: str, *args: Any) -> RunResult:
    if impl == "ext":
        loss, lse, dE, dC, db, skipped, bad = ext.load().run(*args)  # type: ignore[union-attr]
        return loss, lse, dE, dC, db, int(skipped), int(bad)
    return torch_run(*args)


# --------------------------------------------------------------------------------------------
# validation


def _check_finite(x: Tensor, name: str, allow_neg_inf: bool = False) -> None:
    """``check_finite`` in one reduction: a float64 sum is finite iff every entry is (for
    float32/16 inputs); only when it is not does the exact check run (and raise)."""
    if not checks_enabled() or bool(torch.isfinite(x.sum(dtype=torch.float64))):
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
        raise ValueError(f"target must have shape {tuple(lead)} (features' leading dims), "
                         f"got {tuple(target.shape)}")
    if checks_enabled() and target.numel():
        t = target.long()
        live = t[t != ignore_index]
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= V):
            raise ValueError(f"target values must lie in [0, {V}) (or ignore_index="
                             f"{ignore_index}); got min {int(live.min())}, max {int(live.max())}")


# --------------------------------------------------------------------------------------------
# shared pieces


def _mean_logit_order(E: Tensor, C: Tensor, b: Optional[Tensor], piece: int) -> Tensor:
    """Classes by descending batch-mean logit ``mean_i(e_i) . c_j + b_j`` (paper Sec. 4.3)."""
    cdt = compute_dtype(E.dtype)
    m = E.mean(0, dtype=cdt) if E.shape[0] else E.new_zeros(E.shape[1], dtype=cdt)
    V = C.shape[0]
    score = torch.empty(V, dtype=cdt, device=E.device)
    for j0 in range(0, V, piece):
        score[j0:j0 + piece] = C[j0:j0 + piece].to(cdt) @ m
    if b is not None:
        score += b.nan_to_num(neginf=torch.finfo(cdt).min)
    return torch.argsort(score, descending=True)


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
    """Chunked linear cross-entropy; ``cfg`` holds the non-tensor options (see module doc)."""

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
        with _load_aware_threads(features.device):
            loss_rows, lse, dE, dC, db, skipped, _ = _run(
                cfg["impl"], features, weight, b, tgt, cw, g.contiguous(), None, None, order,
                cfg["label_smoothing"], cfg["softcap"], cfg["filter_eps"], cfg["chunk_size"],
                cfg["block_rows"], *run_need, cfg["accum_c_fp32"])
        if eager:
            _record(cfg["stats"], skipped, -(-features.shape[0] // cfg["block_rows"]),
                    -(-V // cfg["chunk_size"]))
        if cfg["reduction"] == "mean":
            loss = loss_rows.sum() / denom
        elif cfg["reduction"] == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows
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
        with _load_aware_threads(features.device):
            _, _, dE, dC, db, skipped, _ = _run(
                cfg["impl"], features, weight, b, tgt, cw, g.contiguous(), dlse, None, ctx.order,
                cfg["label_smoothing"], cfg["softcap"], cfg["filter_eps"], cfg["chunk_size"],
                cfg["block_rows"], *need, cfg["accum_c_fp32"])
        _record(cfg["stats"], skipped, -(-features.shape[0] // cfg["block_rows"]),
                -(-weight.shape[0] // cfg["chunk_size"]))
        return (dE.to(features.dtype) if dE is not None else None,
                dC.to(weight.dtype) if dC is not None else None,
                db.to(bias.dtype) if db is not None else None, None, None, None)


def _shard_offset(V_local: int, group: Any, device: torch.device) -> Tuple[int, int]:
    """(first global class of this rank's shard, global V) from every rank's shard size."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([V_local], dtype=torch.long, device=device), group=group)
    sizes_i = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes_i[:rank]), sum(sizes_i)


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
        with _load_aware_threads(features.device):
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
        # out-of-range targets (value checks off): a NaN row, never a silently skipped one
        rows = torch.where(~ignore & ~valid, torch.full_like(rows, float("nan")), rows)
        denom = wy.sum()
        if cfg["reduction"] == "mean":
            loss = rows.sum() / denom
        elif cfg["reduction"] == "sum":
            loss = rows.sum()
        else:
            loss = rows
        ctx.cfg = cfg
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
        # Rows whose target lives on another rank: the kernel sees no target there, so the
        # target's weight enters through the softmax coefficient (see the module doc).
        dl = (dl + torch.where(valid & ~local, g * wy, torch.zeros_like(g))).contiguous()
        b = bias.to(cdt).contiguous() if bias is not None else None
        cw = class_weight.to(cdt).contiguous() if class_weight is not None else None
        need_de = ctx.needs_input_grad[0]
        need = (need_de, ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        # every rank must join the all-reduce of dE, so all compute it when any rank may need it
        need = (True, need[1], need[2])
        with _load_aware_threads(features.device):
            _, _, dE, dC, db, skipped, _ = _run(
                cfg["impl"], features, weight, b, tl, cw, g.contiguous(), dl,
                lse.contiguous(), None, 0.0, cfg["softcap"], cfg["filter_eps"],
                cfg["chunk_size"], cfg["block_rows"], *need, cfg["accum_c_fp32"])
        _record(cfg["stats"], skipped, -(-features.shape[0] // cfg["block_rows"]),
                -(-weight.shape[0] // cfg["chunk_size"]))
        dEf = dE.to(cdt)
        dist.all_reduce(dEf, group=cfg["group"])
        return (dEf.to(features.dtype) if need_de else None,
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
    shift: Union[int, bool] = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rows_per_block: Optional[int] = None,
    filter_eps: Union[str, float, None] = "auto",
    sort_vocab: Optional[bool] = None,
    accum_c_fp32: bool = False,
    process_group: Any = None,
    stats: Optional[dict] = None,
    impl: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Cross-entropy of ``softcap(features @ weight.T + bias)`` without materialising the logits.

    Same meaning as ``F.cross_entropy(features @ weight.T + bias, target, weight=class_weight,
    ignore_index=..., reduction=..., label_smoothing=...)`` ('mean' divides by the sum of the
    target weights; a batch with no such row gives ``nan`` for 'mean', as in torch). Cut
    cross-entropy, Wijmans et al. 2024 (arXiv:2411.09009); soft-cap ``softcap * tanh(z /
    softcap)`` as in the official code. See the module docstring for gradients, precision,
    filtering and vocab-parallel.

    Args:
        features: (..., D) float tensor ``E`` (any strides; bf16/fp16 stay in their dtype).
        weight: (V, D) classifier ``C`` (this rank's shard with ``process_group``), same dtype
            and device as ``features``, any strides.
        target: (...) class indices (any integer dtype) in ``[0, V)`` or ``ignore_index``.
        bias: optional (V,) bias; ``-inf`` entries mask classes out.
        class_weight: optional (V,) per-class weights (torch's ``weight=``; no gradient).
        return_lse: also return the (...) float32/float64 log-sum-exp of every row of features
            (ignored rows included), differentiable -- e.g. for a log-partition penalty.
        shift: k >= 0 (True = 1): row t of a sequence (features' dim -2, target's last dim) is
            scored against target t + k (next-token prediction, apple's ``shift``); the last k
            rows of each sequence are ignored. With ``reduction='none'`` the loss of target t is
            placed at position t (zeros at the first k), as apple does; ``lse`` stays aligned
            with the rows of features.
        chunk_size: vocabulary tile width (classes) of the gradient filter.
        rows_per_block: rows per logits block (default :func:`block_rows`: a memory budget).
        filter_eps: 'auto' (``finfo(features.dtype).eps / 32``), a float, or None (no filtering).
        sort_vocab: order the filter's tiles by batch-mean logit (default: when filtering).
        accum_c_fp32: accumulate dC across row blocks in float32 for bf16/fp16 inputs.
        process_group: a ``torch.distributed`` group over which ``weight`` is sharded by rows.
        stats: a dict that receives ``tiles_skipped`` / ``tiles_total`` of the gradient pass.
        impl: 'auto' (the compiled extension when available, else 'torch'), 'ext' or 'torch'.

    Returns:
        the loss (scalar, or (...) with ``reduction='none'``) in ``features.dtype``; with
        ``return_lse`` the tuple ``(loss, lse)``.
    """
    _check_linear(features, weight, bias, any_lead=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(target, Tensor):
        raise TypeError("target must be a torch.Tensor of class indices, "
                        f"got {type(target).__name__}")
    _check_same_device(features, target=target, class_weight=class_weight)
    V_local = weight.shape[0]
    lead = tuple(features.shape[:-1])
    if isinstance(shift, bool):
        shift = int(shift)
    if not isinstance(shift, numbers.Integral) or shift < 0:
        raise ValueError(f"shift must be an int >= 0 (or a bool), got {shift!r}")
    shift = int(shift)
    if shift and len(lead) < 1:
        raise ValueError("shift needs features of shape (..., T, D) with a sequence dim T")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or \
            not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if class_weight is not None:
        check_float(class_weight, "class_weight", ndim=1)
        if class_weight.shape[0] != V_local:
            raise ValueError(f"class_weight must have shape ({V_local},), "
                             f"got {tuple(class_weight.shape)}")
        check_finite(class_weight, "class_weight")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if not isinstance(accum_c_fp32, bool):
        raise TypeError(f"accum_c_fp32 must be a bool, got {accum_c_fp32!r}")
    if sort_vocab is not None and not isinstance(sort_vocab, bool):
        raise TypeError(f"sort_vocab must be None or a bool, got {sort_vocab!r}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be None or a dict, got {type(stats).__name__}")
    chunk = _check_chunk_size(chunk_size)
    if rows_per_block is not None:
        rows_per_block = _check_positive_int(rows_per_block, "rows_per_block")

    vocab, offset = V_local, 0
    if process_group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group given but torch.distributed is not initialized")
        if label_smoothing > 0:
            raise NotImplementedError("label_smoothing is not supported with process_group")
        offset, vocab = _shard_offset(V_local, process_group, features.device)
    _check_target(target, lead, vocab, int(ignore_index))

    D = features.shape[-1]
    N = math.prod(lead)
    E2 = features.reshape(N, D)
    t = target.long()
    if shift:
        T = lead[-1]
        pad = torch.full((*lead[:-1], min(shift, T)), int(ignore_index), dtype=torch.long,
                         device=t.device)
        t = torch.cat([t[..., shift:], pad], dim=-1)
    t = t.reshape(N)
    filt = -1.0 if label_smoothing > 0 else _filter_threshold(filter_eps, features.dtype)
    sort = (filt > 0) if sort_vocab is None else (sort_vocab and filt > 0)
    rows = rows_per_block if rows_per_block is not None else block_rows(N, V_local,
                                                                        features.device)
    cfg = {
        "ignore_index": int(ignore_index),
        "reduction": reduction,
        "label_smoothing": float(label_smoothing),
        "softcap": _check_softcap(softcap),
        "return_lse": return_lse,
        "chunk_size": chunk,
        "filter_eps": filt,
        "sort": sort and V_local > chunk and process_group is None,
        "impl": resolve_impl(impl, features.device),
        "block_rows": max(1, min(rows, max(N, 1))),
        "grad_enabled": torch.is_grad_enabled(),
        "accum_c_fp32": accum_c_fp32,
        "stats": stats,
        "group": process_group,
        "offset": offset,
        "vocab": vocab,
    }
    fn = _VocabParallelCrossEntropy if process_group is not None else _LinearCrossEntropy
    loss, lse = fn.apply(E2, weight, bias, t, class_weight, cfg)
    if reduction == "none":
        loss = loss.reshape(lead)
        if shift:
            loss = torch.roll(loss, shifts=shift, dims=-1)  # the last `shift` entries are 0
    lse = lse.reshape(lead)
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
