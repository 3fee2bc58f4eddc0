"""Cut cross-entropy in plain PyTorch: the chunked pass behind ``impl='torch'`` (any device).

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009),
Sec. 4; official code apple/ml-cross-entropy (``cut_cross_entropy/cce.py``,
``cce_lse_forward.py``, ``cce_backward.py``). Same algorithm and outputs as the C++/CUDA kernels in
``csrc/`` (which are tested against this and against ``F.cross_entropy``):

For a block of R rows, ``Z = softcap(E_b C^T + b)`` (R x V, the only large buffer), then per row
``lse = logsumexp(Z)``, ``loss = (1-eps) w_y (lse - z_y) + (eps/V) (W lse - sum_j w_j z_j)``
(label smoothing eps, class weights w, ``W = sum_j w_j``; an ignored row has loss 0). With
``p = softmax(Z)`` and per-row upstream scales ``g`` (loss) and ``dlse`` (log-sum-exp output)::

    dZ_ij = (g_i ((1-eps) w_y + eps W / V) + dlse_i) p_ij
            - g_i (eps/V) w_j - g_i (1-eps) w_y [j = y_i]

times the soft-cap derivative ``1 - (z/cap)^2``; then ``dE_b = dZ C``, ``dC += dZ^T E_b`` and
``db += sum_i dZ_i``; the target entry ``dZ_{i y_i}`` is applied by a gather / index-add
outside the GEMMs (and does not count for the filter). Gradient filtering: vocabulary tiles of ``tile`` classes
(consecutive in ``order`` when given) in which every live row has ``p < filter_eps`` are left out
of the two gradient GEMMs (the bias gradient and the one-hot term stay exact).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..validation import compute_dtype

RunResult = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], int, int]
# Most elements of a float32 piece of C converted at a time on the CPU (16 MiB), as the
# extension's ``kPieceElements``.
PIECE_ELEMENTS = 1 << 22


def _runs(need: List[bool], tile: int, V: int) -> List[Tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges of the tiles marked as needed."""
    runs: List[Tuple[int, int]] = []
    for t, keep in enumerate(need):
        if not keep:
            continue
        j0, j1 = t * tile, min(V, (t + 1) * tile)
        if runs and runs[-1][1] == j0:
            runs[-1] = (runs[-1][0], j1)
        else:
            runs.append((j0, j1))
    return runs


def _pieces(j0: int, j1: int, step: int):
    for k in range(j0, j1, step):
        yield k, min(j1, k + step)


def torch_run(
    E: Tensor, C: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    g: Tensor, dlse: Optional[Tensor], lse_in: Optional[Tensor], order: Optional[Tensor],
    label_smoothing: float, softcap: float, filter_eps: float, tile: int, block_rows: int,
    need_de: bool, need_dc: bool, need_db: bool, accum_c_fp32: bool = False,
) -> RunResult:
    """Per-row loss and log-sum-exp and, when asked, the gradients for E, C and bias.

    ``E`` (N, D) and ``C`` (V, D) in their own dtype (bf16/fp16 are converted a row block / a
    piece of the vocabulary at a time); ``bias``, ``class_weight`` (V), ``g`` (N) per-row
    loss-gradient scale, ``dlse`` (N), ``lse_in`` (N, the normaliser to use instead of each
    row's own log-sum-exp: vocab-parallel) in the compute dtype; ``target`` (N) int64 with -1
    for ignored rows (anything else outside ``[0, V)`` raises on CPU and gives a NaN row on
    other devices); ``order`` (V) a vocabulary order whose consecutive ``tile`` classes form the
    filter's tiles; ``softcap <= 0`` and ``filter_eps <= 0`` mean off.
    Returns ``(loss, lse, dE (E's dtype), dC, db, skipped_tiles, bad_rows)``; dC is in the
    compute dtype when ``accum_c_fp32`` or E is float32/64, else in C's dtype.
    It stays one function over 60 lines because it is the reference the kernels' ``run`` in
    ``csrc/cce.cpp`` is checked against, and follows it step by step in one loop over row blocks
    (logits, row loss, d logits, tile filter, gradient GEMMs) whose steps share the block's buffers.
    """
    N, D = E.shape
    V = C.shape[0]
    cdt = compute_dtype(E.dtype)
    lowp = cdt != E.dtype
    grads = need_de or need_dc or need_db
    loss = torch.empty(N, dtype=cdt, device=E.device)
    lse = torch.empty_like(loss)
    dE = torch.empty(N, D, dtype=E.dtype, device=E.device) if need_de else None
    dC = (torch.zeros(V, D, dtype=C.dtype if lowp and not accum_c_fp32 else cdt,
                      device=C.device) if need_dc else None)
    db = torch.zeros(V, dtype=cdt, device=C.device) if need_db else None
    ntiles = -(-V // tile)
    W = float(class_weight.sum()) if class_weight is not None else float(V)
    ls = float(label_smoothing)
    skipped = 0
    nbad = 0
    rank = None
    if order is not None:
        rank = torch.empty_like(order)
        rank[order] = torch.arange(V, device=order.device)
    R0 = min(block_rows, max(N, 1))
    piece = max(min(V, 256), min(V, R0 * V // max(1, D),
                                 V if E.device.type != "cpu" else PIECE_ELEMENTS // max(1, D)))
    for r0 in range(0, N, block_rows):
        r1 = min(N, r0 + block_rows)
        Eb = E[r0:r1].to(cdt)
        if lowp:
            Z = torch.empty(r1 - r0, V, dtype=cdt, device=E.device)
            for j0, j1 in _pieces(0, V, piece):
                torch.mm(Eb, C[j0:j1].to(cdt).t(), out=Z[:, j0:j1])
            if bias is not None:
                Z.add_(bias)
        else:
            Z = torch.addmm(bias, Eb, C.t()) if bias is not None else Eb @ C.t()
        if softcap > 0:
            Z.div_(softcap).tanh_().mul_(softcap)
        y = target[r0:r1]
        bad = (y < -1) | (y >= V)
        if bool(bad.any()):
            if E.device.type == "cpu":
                raise ValueError(f"target values must lie in [0, {V}) or equal ignore_index; "
                                 f"{int(bad.sum())} row(s) of this block are out of range")
            nbad += int(bad.sum())
        valid = (y >= 0) & ~bad
        y0 = torch.where(valid, y, torch.zeros_like(y))
        zy = Z.gather(1, y0[:, None]).squeeze(1)
        wy = class_weight[y0] if class_weight is not None else torch.ones_like(zy)
        wy = torch.where(valid, wy, torch.zeros_like(wy))
        l = torch.logsumexp(Z, dim=1)
        lse[r0:r1] = l
        row = (1.0 - ls) * wy * (l - zy)
        if ls > 0:
            sw = Z @ class_weight if class_weight is not None else Z.sum(1)
            row = row + (ls / V) * (W * l - sw)
        row = torch.where(valid, row, torch.zeros_like(row))
        loss[r0:r1] = torch.where(bad, torch.full_like(row, float("nan")), row)
        if not grads:
            continue

        gi = torch.where(bad, torch.zeros_like(g[r0:r1]), g[r0:r1])
        dl = dlse[r0:r1] if dlse is not None else torch.zeros_like(gi)
        dl = torch.where(bad, torch.zeros_like(dl), dl)
        lp = lse_in[r0:r1] if lse_in is not None else l
        P = torch.exp(Z - lp[:, None])
        coef_p = gi * ((1.0 - ls) * wy + ls * W / V) + dl
        G = P * coef_p[:, None]
        if ls > 0:
            wj = class_weight if class_weight is not None else torch.ones_like(l[:1]).expand(V)
            G.sub_((gi * ls / V)[:, None] * wj[None, :])
        ycoef = gi * (1.0 - ls) * wy  # the one-hot term
        if softcap > 0:
            G.mul_(1.0 - (Z / softcap).square())
            ycoef = ycoef * (1.0 - (zy / softcap).square())
        # the whole target entry dZ_iy = G_iy - ycoef is applied exactly below, outside the
        # tiles, so it never forces a tile in
        rows = torch.nonzero(valid).squeeze(1)
        ycoef = ycoef - torch.where(valid, G.gather(1, y0[:, None]).squeeze(1),
                                    torch.zeros_like(ycoef))
        G[rows, y0[rows]] = 0
        P[rows, y0[rows]] = 0
        G[bad] = float("nan")
        del Z

        live = (gi != 0) | (dl != 0) | bad
        if filter_eps > 0:
            Pl = P[live] if rank is None else P[live][:, order]
            need = [bool((Pt >= filter_eps).any()) if Pt.numel() else False
                    for Pt in Pl.split(tile, dim=1)]
            if bool(bad.any()):
                need = [True] * ntiles
        else:
            need = [bool(live.any())] * ntiles
        del P
        kept = sum(need)
        gather = rank is not None and filter_eps > 0 and 5 * kept <= 4 * ntiles
        if rank is not None and filter_eps > 0 and not gather:
            runs = [(0, V)] if kept else []
        else:
            skipped += ntiles - kept
            runs = _runs(need, tile, V)
        if db is not None:
            db.add_(G.sum(0))
        dEb = torch.zeros(r1 - r0, D, dtype=cdt, device=E.device) if dE is not None else None
        for j0, j1 in runs:
            step = piece if (lowp or gather) else j1 - j0
            for k0, k1 in _pieces(j0, j1, step):
                if gather:
                    idx = order[k0:k1]
                    Gs, Cs = G[:, idx], C[idx].to(cdt)
                else:
                    Gs, Cs = G[:, k0:k1], C[k0:k1].to(cdt)
                if dEb is not None:
                    dEb.addmm_(Gs, Cs)
                if dC is not None:
                    part = Gs.t() @ Eb
                    if gather:
                        dC.index_add_(0, idx, part.to(dC.dtype))
                    elif dC.dtype == part.dtype:
                        dC[k0:k1] += part
                    else:
                        # the same float32 sum rounded once into dC; ``dC[k0:k1] += part`` would
                        # make two float32 temporaries of the piece on the CPU, this one
                        dC[k0:k1] = part.add_(dC[k0:k1])
        # the one-hot target term dZ_iy -= ycoef_i, outside the tiles (never forces one in)
        if dEb is not None:
            dEb.sub_(C[y0].to(cdt) * ycoef[:, None])
        if dC is not None:
            dC.index_add_(0, y0, (Eb * -ycoef[:, None]).to(dC.dtype))
        if db is not None:
            db.index_add_(0, y0, -ycoef)
        if dE is not None:
            dE[r0:r1] = dEb
    return loss, lse, dE, dC, db, skipped, nbad
