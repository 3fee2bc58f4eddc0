"""Cut cross-entropy: the linear + cross-entropy loss without the N x V logits (CPU/CUDA).

Public API: :func:`linear_cross_entropy`, the chunked evaluation reductions
:func:`linear_logsumexp` (energy score), :func:`linear_max_softmax`, :func:`linear_topk`, and the
head registered as ``'cce'`` (:class:`CutCrossEntropyHead`). Build the extension ahead of time with
``python -m lossbench.cce.build``.
"""

from .api import linear_cross_entropy, linear_logsumexp, linear_max_softmax, linear_topk
from .head import CutCrossEntropyHead

__all__ = [
    "linear_cross_entropy", "linear_logsumexp", "linear_max_softmax", "linear_topk",
    "CutCrossEntropyHead",
]
