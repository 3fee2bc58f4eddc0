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
block of E and a piece of C (at most about one logits block and 16 MiB) are converted at a time
into buffers held for the call; on CUDA the GEMMs run in the input dtype with float32 output. The
row pass is float32, the gradient of a row block of E is accumulated in float32 and rounded once;
dC is accumulated across row blocks in the input dtype (as apple's default; on CPU a piece at a
time through a float32 piece) unless ``accum_c_fp32=True``, which holds a float32 V x D
accumulator (4 V D bytes more) and rounds once. Beyond the gradients, the CPU pass then holds one
logits block, one piece of C and row-block-sized buffers, whatever V
(``tests/cce/test_cce_memory.py``).

Gradient filtering (paper Sec. 4.3; ``filter_eps='auto'`` = ``torch.finfo(dtype).eps / 32`` as in
the official ``utils._handle_eps``). The vocabulary is cut into tiles of ``chunk_size`` classes;
with ``sort_vocab`` (default when filtering on the CPU; off on CUDA, where the sort and gather
cost more than the skipped tiles save: 0.40 s against 0.23 s unsorted at the Gemma-2 head on an
H200, docs/cce.md) the classes are first ordered by their batch-mean
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
of its own shard. Label smoothing adds ``(eps / V) (W lse_i - S_i)`` per row with ``W = sum_j w_j``
and ``S_i = e_i . sum_j w_j c_j + sum_j w_j b_j`` (both all-reduced, one D + 2 vector per step), as
``F.cross_entropy`` defines it; soft-capping is refused there (it makes ``S_i`` non-linear).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from ..validation import compute_dtype
# The pieces live in one module each; the names below stay importable from here as before
# (tests and callers use ``api.<name>``, private ones included).
from .autograd import (_LinearCrossEntropy, _mean_logit_order, _record,  # noqa: F401
                       _reference_graph, _row_scales)
from .checks import (REDUCTIONS, _check_chunk_size, _check_finite, _check_linear,  # noqa: F401
                     _check_loss_args, _check_positive_int, _check_same_device, _check_softcap,
                     _check_target, _filter_threshold)
from .dispatch import (IMPLS, MAX_BLOCK_ROWS, MIN_BLOCK_ROWS, ROW_BLOCK_ELEMENTS,  # noqa: F401
                       _DEFAULT_BLOCK_ELEMENTS, _run, block_rows, resolve_impl,
                       sort_vocab_default)
from .reductions import _blocks, linear_logsumexp, linear_max_softmax, linear_topk  # noqa: F401
from .vocab_parallel import _shard_offset, _VocabParallelCrossEntropy

__all__ = [
    "linear_cross_entropy", "linear_logsumexp", "linear_max_softmax", "linear_topk",
    "block_rows", "resolve_impl", "DEFAULT_CHUNK_SIZE", "ROW_BLOCK_ELEMENTS",
]

DEFAULT_CHUNK_SIZE = 512

_compute_dtype = compute_dtype


def _global_vocab(V_local: int, process_group: Any, label_smoothing: float, softcap: Optional[float],
                  device: torch.device) -> Tuple[int, int]:
    """(first global class of this rank's shard, global V); ``(0, V_local)`` without a group."""
    if process_group is None:
        return 0, V_local
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group given but torch.distributed is not initialized")
    if label_smoothing > 0 and softcap is not None:
        raise ValueError(f"label_smoothing={label_smoothing} with softcap={softcap} cannot be combined with "
                         "process_group: the vocab-parallel smoothing term uses the logits' linearity "
                         "(sum_j w_j z_j = e . sum_j w_j c_j + sum_j w_j b_j), which soft-capping breaks; "
                         "pass softcap=None or label_smoothing=0.0")
    return _shard_offset(V_local, process_group, device)


def _shifted_targets(target: Tensor, lead: Tuple[int, ...], shift: int,
                     ignore_index: int) -> Tensor:
    """int64 targets, target ``t + shift`` at position t; the last ``shift`` of each sequence
    are ``ignore_index``."""
    t = target.long()
    if shift:
        T = lead[-1]
        pad = torch.full((*lead[:-1], min(shift, T)), ignore_index, dtype=torch.long,
                         device=t.device)
        t = torch.cat([t[..., shift:], pad], dim=-1)
    return t


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
    filtering and vocab-parallel. It stays one function over 60 lines because the signature and
    this docstring are most of it; its body (about 40 lines) hands the checks, the vocabulary
    shard and the target shift to helpers.

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
        sort_vocab: order the filter's tiles by batch-mean logit (default: when filtering, on
            the CPU only; ``True`` sorts on CUDA too).
        accum_c_fp32: accumulate dC across row blocks in float32 for bf16/fp16 inputs.
        process_group: a ``torch.distributed`` group over which ``weight`` is sharded by rows
            (label smoothing without soft-capping; double backward is refused with an error).
        stats: a dict that receives ``tiles_skipped`` / ``tiles_total`` of the gradient pass.
        impl: 'auto': for CPU tensors the compiled extension when it is built, else 'torch';
            for CUDA tensors 'torch' (the extension's CUDA kernels have not yet been verified
            on a GPU; they run only when asked for with 'ext'). 'ext' or 'torch' force one.

    Returns:
        the loss (scalar, or (...) with ``reduction='none'``) in ``features.dtype``; with
        ``return_lse`` the tuple ``(loss, lse)``.
    """
    opts = dict(ignore_index=ignore_index, shift=shift, reduction=reduction,
                label_smoothing=label_smoothing, return_lse=return_lse, accum_c_fp32=accum_c_fp32,
                sort_vocab=sort_vocab, stats=stats, chunk_size=chunk_size,
                rows_per_block=rows_per_block)
    shift, chunk, rows_per_block = _check_loss_args(features, weight, bias, target, class_weight,
                                                    opts)
    V_local = weight.shape[0]
    lead = tuple(features.shape[:-1])
    offset, vocab = _global_vocab(V_local, process_group, label_smoothing, softcap, features.device)
    _check_target(target, lead, vocab, int(ignore_index))

    N = math.prod(lead)
    E2 = features.reshape(N, features.shape[-1])
    t = _shifted_targets(target, lead, shift, int(ignore_index)).reshape(N)
    filt = -1.0 if label_smoothing > 0 else _filter_threshold(filter_eps, features.dtype)
    default_sort = filt > 0 and sort_vocab_default(features.device)  # CUDA: measured slower
    sort = default_sort if sort_vocab is None else (sort_vocab and filt > 0)
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

