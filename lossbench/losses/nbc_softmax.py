"""NBC-softmax (Kulatilleke, Chandra & Portmann 2022): softmax plus a negative block-contrastive term."""

from __future__ import annotations

import warnings
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_features, check_positive, check_target, compute_dtype
from .base import LinearLayerHead
from ._common import linear, safe_normalize

__all__ = ["NBCSoftmaxHead", "batch_class_sums", "nbc_loss", "nbc_loss_from_centres"]


def batch_class_sums(embeddings: Tensor, target: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Per-class sums ``(K, D)`` and counts ``(K,)`` of the batch embeddings (float32 or float64)."""
    dtype = compute_dtype(embeddings)
    z = embeddings.to(dtype)
    target = target.long()
    sums = z.new_zeros(num_classes, z.shape[1]).index_add(0, target, z)
    counts = torch.bincount(target, minlength=num_classes).to(dtype)
    return sums, counts


def nbc_loss_from_centres(centres: Tensor, num_classes: int, tau: float = 0.2, eps: float = 1e-8) -> Tensor:
    """L_NBC from the centres ``(m, D)`` of the m classes present: (1/(K m)) sum_k log sum_l exp(tau S_kl).

    S_kl = cos(mu_k, mu_l) with the diagonal set to 0 (as in the official code, so each row's sum
    includes exp(0) = 1 for l = k); tau *multiplies* S; K = ``num_classes``. Norms are clamped at
    ``eps`` (the official code has no guard): a centre of norm <= ``eps`` has similarity 0 to
    every other *and passes no gradient* (``safe_normalize``), instead of F.normalize's 1/eps
    blow-up at an exactly zero centre. One class present gives log(1) / K = 0.
    """
    m = centres.shape[0]
    if m == 0:
        return centres.new_zeros(())
    with torch.autocast(centres.device.type, enabled=False):  # cosines in the centres' dtype
        unit = safe_normalize(centres, eps)
        sim = unit @ unit.t()
        sim = sim * (1.0 - torch.eye(m, dtype=sim.dtype, device=sim.device))
        # The official code takes log(sum exp(.) + 1e-10); the sum is >= 1, so that eps is moot.
        return torch.logsumexp(tau * sim, dim=1).mean() / num_classes


def _gather_sums(sums: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """Sum class sums (differentiably) and counts over all ranks of the default process group."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.14 marks it deprecated; it is still the autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        sums = torch.stack(all_gather(sums)).sum(0)
    counts = counts.clone()
    dist.all_reduce(counts)
    return sums, counts


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nbc_loss(
    embeddings: Tensor, target: Tensor, num_classes: int, tau: float = 0.2,
    eps: float = 1e-8, gather: bool = True,
) -> Tensor:
    """Negative block-contrastive loss over the batch class centres (NBC-softmax, arXiv:2212.08184).

    mu_k = mean of the embeddings of class k in the batch (only the m classes present), then
    :func:`nbc_loss_from_centres`. Under ``torch.distributed`` (initialised, world size > 1) and
    ``gather=True``, the per-class sums and counts are summed over all ranks first
    (``torch.distributed.nn.functional.all_gather``, so gradients flow back to every rank's
    embeddings), so every rank uses the centres of the *global* batch and gets the same L_NBC.
    Computed in float32 (float64 stays float64). Shapes: embeddings ``(N, D)``, target ``(N,)``.
    """
    sums, counts = batch_class_sums(embeddings, target, num_classes)
    if gather and _distributed():
        sums, counts = _gather_sums(sums, counts)
    present = counts > 0
    centres = sums[present] / counts[present].unsqueeze(1)
    return nbc_loss_from_centres(centres, num_classes, tau, eps)


@register_loss("nbc_softmax", kind="head")
class NBCSoftmaxHead(LinearLayerHead):
    """Softmax classifier trained with NBC-softmax (Kulatilleke, Chandra & Portmann, arXiv:2212.08184).

    loss = (1 - r) * CE(Linear(z), y) + r * L_NBC(z, y),
    L_NBC = (1/(K m)) sum_{k present} log sum_{l present} exp(tau * cos(mu_k, mu_l)) (diag cos = 0)

    with mu_k the batch class centres of the embeddings ``z`` (the head's input features;
    the official runs use ``proj_dim=0``, no projection), m the number of classes present in
    the batch and K = ``num_classes``. Defaults r = 0.5 (``model2_ratio``) and tau = 0.2
    (single-dataset runs; 0.3 for multi-dataset) from the official README
    (gayanku/NBC-Softmax, ``code.py`` ``ProjContrastiveModel_BC1`` / ``NCE_Combiner2``);
    ``eps`` guards zero-norm centres. It needs >= 2 classes per batch to push anything apart
    (with one class L_NBC = 0); the official runs use batches of 2048.

    Distributed data parallel: the CE term is per-rank (its local mean; DDP averages the
    gradients over ranks). With ``gather_distributed=True`` the class sums and counts are
    gathered across ranks so L_NBC uses the global batch centres and is identical on every rank;
    all_gather's backward sums each rank's gradient, which DDP's averaging turns back into
    the gradient of the single global L_NBC. With ``False`` each rank uses its own centres.

    Shapes: features ``(N, in_features)``, target ``(N,)`` -> scalar loss;
    ``logits(features)`` -> ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        r: float = 0.5,
        tau: float = 0.2,
        eps: float = 1e-8,
        bias: bool = True,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(in_features, num_classes, bias=bias)
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"r must lie in [0, 1], got {r}")
        check_positive(float(tau), "tau", allow_zero=True)
        check_positive(float(eps), "eps")
        self.r, self.tau, self.eps = float(r), float(tau), float(eps)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        check_features(features, self.in_features, "features")
        target = check_target(target, self.num_classes, features.shape[0])
        logits = linear(features, self.fc.weight, self.fc.bias)
        logits = logits.to(compute_dtype(logits))
        ce = F.cross_entropy(logits, target)
        nbc = nbc_loss(features, target, self.num_classes, self.tau, self.eps, self.gather_distributed)
        return (1.0 - self.r) * ce + self.r * nbc.to(ce.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, r={self.r}, "
                f"tau={self.tau}, gather_distributed={self.gather_distributed}")
