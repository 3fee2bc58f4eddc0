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
``db += sum_i dZ_i``. Gradient filtering: vocabulary tiles of ``tile`` classes in which every live
row has ``p < filter_eps`` and no target are left out of the two gradient GEMMs (the bias gradient
stays exact).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

RunResult = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], int]


def _runs(need: List[bool], tile: int, V: int) -> List[Tuple[int, int]]:
    """Contiguous ``[start, stop)`` class ranges of the tiles marked as needed."""
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


def torch_run(
    E: Tensor, C: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    g: Tensor, dlse: Optional[Tensor], label_smoothing: float, softcap: float, filter_eps: float,
    tile: int, block_rows: int, need_de: bool, need_dc: bool, need_db: bool,
) -> RunResult:
    """Per-row loss and log-sum-exp and, when asked, the gradients for E, C and bias.

    Inputs are already validated and in the compute dtype: ``E`` (N, D), ``C`` (V, D), ``bias``
    (V) or None, ``target`` (N) int64 with -1 for ignored rows, ``class_weight`` (V) or None,
    ``g`` (N) per-row loss-gradient scale, ``dlse`` (N) or None; ``softcap <= 0`` and
    ``filter_eps <= 0`` mean off. Returns ``(loss (N), lse (N), dE, dC, db, skipped_tiles)``.
    """
    N, D = E.shape
    V = C.shape[0]
    grads = need_de or need_dc or need_db
    loss = E.new_empty(N)
    lse = E.new_empty(N)
    dE = E.new_empty(N, D) if need_de else None
    dC = C.new_zeros(V, D) if need_dc else None
    db = C.new_zeros(V) if need_db else None
    ntiles = -(-V // tile)
    W = float(class_weight.sum()) if class_weight is not None else float(V)
    ls = float(label_smoothing)
    skipped = 0
    Ct = C.t()
    for r0 in range(0, N, block_rows):
        r1 = min(N, r0 + block_rows)
        Eb = E[r0:r1]
        Z = torch.addmm(bias, Eb, Ct) if bias is not None else Eb @ Ct
        if softcap > 0:
            Z.div_(softcap).tanh_().mul_(softcap)
        y = target[r0:r1]
        valid = y >= 0
        y0 = y.clamp_min(0)
        zy = Z.gather(1, y0[:, None]).squeeze(1)
        wy = class_weight[y0] if class_weight is not None else torch.ones_like(zy)
        wy = torch.where(valid, wy, torch.zeros_like(wy))
        l = torch.logsumexp(Z, dim=1)
        lse[r0:r1] = l
        row = (1.0 - ls) * wy * (l - zy)
        if ls > 0:
            sw = Z @ class_weight if class_weight is not None else Z.sum(1)
            row = row + (ls / V) * (W * l - sw)
        loss[r0:r1] = torch.where(valid, row, torch.zeros_like(row))
        if not grads:
            continue

        gi = g[r0:r1]
        dl = dlse[r0:r1] if dlse is not None else torch.zeros_like(gi)
        P = torch.exp(Z - l[:, None])
        coef_p = gi * ((1.0 - ls) * wy + ls * W / V) + dl
        G = P * coef_p[:, None]
        if ls > 0:
            wj = class_weight if class_weight is not None else torch.ones_like(l[:1]).expand(V)
            G.sub_((gi * ls / V)[:, None] * wj[None, :])
        G.scatter_add_(1, y0[:, None], (-(gi * (1.0 - ls) * wy))[:, None])
        if softcap > 0:
            G.mul_(1.0 - (Z / softcap).square())
        del Z

        live = (gi != 0) | (dl != 0)
        if filter_eps > 0:
            need = []
            rows_y = y[live]
            for t, Pt in enumerate(P[live].split(tile, dim=1)):
                hit = bool((Pt >= filter_eps).any()) if Pt.numel() else False
                hit = hit or bool(((rows_y >= t * tile) & (rows_y < (t + 1) * tile)).any())
                need.append(hit)
        else:
            need = [bool(live.any())] * ntiles
        del P
        skipped += sum(1 for keep in need if not keep)
        runs = _runs(need, tile, V)
        if db is not None:
            db.add_(G.sum(0))
        if dE is not None:
            dE[r0:r1] = 0
            for j0, j1 in runs:
                dE[r0:r1].addmm_(G[:, j0:j1], C[j0:j1])
        if dC is not None:
            for j0, j1 in runs:
                dC[j0:j1].addmm_(G[:, j0:j1].t(), Eb)
    return loss, lse, dE, dC, db, skipped
