"""RankFeat: energy of the logits after removing the rank-1 component of the last two stage feature maps."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lossbench.validation import check_positive

from ..registry import register_score
from ..stages import Stages, find_stages
from .base import OODScore, batches, concat_scores, eval_mode, model_device
from .feature_base import ScoreNotApplicable


def remove_rank_one(x: Tensor, channels_last: bool = False) -> Tensor:
    """``X - s_1 u_1 v_1^T`` per sample, ``X`` = the map as ``C x HW``; exact SVD in float64, same shape and dtype back."""
    t = x.permute(0, 3, 1, 2) if channels_last else x
    b, c, h, w = t.shape
    m = t.reshape(b, c, h * w).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    out = (m - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).reshape(b, c, h, w).to(x.dtype)
    return out.permute(0, 2, 3, 1) if channels_last else out


@register_score("rankfeat")
class RankFeat(OODScore):
    """RankFeat score ``s(x) = T logsumexp(((z_4 + z_3) / 2) / T)``.

    Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection",
    NeurIPS 2022 (arXiv 2209.08590); official code KingJamesSong/RankFeat
    (``test_ood_resnetv2.py::iterate_data_rankfeat``); OpenOOD ``rankfeat_postprocessor.py``.
    ``z_4``: the logits after the **last** stage's output ``X`` (a ``C x HW`` matrix per sample)
    is replaced by ``X - s_1 u_1 v_1^T`` (its largest singular value and vectors removed) and the
    network is run on from there (pooling, head); ``z_3``: the same removal on the
    **second-to-last** stage's output, then the last stage, pooling and head.

    Implemented by a forward hook that replaces the stage output during the forward pass, on the
    stages :func:`ood.stages.find_stages` gives: a timm backbone's ``feature_info`` stages (4-D
    ``NCHW`` or declared ``NHWC`` outputs), or the stage maps of a classifier adapted by
    :func:`ood.adapt_classifier` (torchvision's ResNet: ``layer4`` and ``layer3``; MobileNet,
    EfficientNet, ConvNeXt, DenseNet, VGG, Swin, ``nn.Sequential`` conv nets: their last two stage
    maps). For a ResNet that is exactly OpenOOD's ``layer4`` / ``avgpool`` / ``fc`` path. Others (fewer
    than two stage maps, token models such as ViT) raise
    :class:`~ood.scores.feature_base.ScoreNotApplicable` at fit, saying what was found. Exact SVD
    (float64), as OpenOOD's default ``accelerate: False``; the official power-iteration variant
    (20 iterations, random start) is not implemented. Defaults: ``T = 1``
    (``--temperature_rankfeat 1``); OpenOOD: APS off, ``GRID = {}``. A stage map with one
    spatial position (``HW = 1``) loses everything to the removal; use inputs large enough.
    """

    name = "rankfeat"
    needs = "model"  # two extra forward passes with modified stage outputs
    GRID: dict = {}

    def __init__(self, temperature: float = 1.0):
        check_positive(temperature, "temperature")
        self.temperature = float(temperature)

    def _stages(self, model: nn.Module, x: Tensor) -> Tuple[Stages, List[Tuple[str, str]]]:
        """The stages (:func:`ood.stages.find_stages`) and ``[(last, layout), (second-to-last, layout)]``."""
        stages = find_stages(model, x, "rankfeat")
        if len(stages.names) < 2:
            raise ScoreNotApplicable(f"rankfeat needs at least two stages with 4-D maps; found {list(stages.names)} "
                                     f"({stages.source})")
        return stages, [(stages.names[-1], stages.layouts[-1]), (stages.names[-2], stages.layouts[-2])]

    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None) -> "RankFeat":
        """No statistics: checks on the first batch of ``loader`` that the model has the stages RankFeat modifies."""
        with eval_mode(model), torch.no_grad():
            for x, _ in batches(loader, model_device(model)):
                stages, taps = self._stages(model, x)
                for name, fmt in taps:
                    self._logits_with_removal(stages, x[:1], name, fmt == "NHWC")
                break
        return self

    @staticmethod
    def _logits_with_removal(stages: Stages, x: Tensor, module_name: str, channels_last: bool) -> Tensor:
        calls = []

        def hook(_m, _inp, out):
            calls.append(1)
            if not isinstance(out, Tensor) or out.dim() != 4:
                raise ScoreNotApplicable(f"rankfeat: stage {module_name!r} gives {getattr(out, 'shape', type(out))}, "
                                         "not a 4-D feature map")
            h, w = (out.shape[1], out.shape[2]) if channels_last else (out.shape[2], out.shape[3])
            if h * w == 1:  # a C x 1 matrix is its own rank-one part: the removal leaves zeros
                raise ScoreNotApplicable(f"rankfeat: stage {module_name!r} gives 1 x 1 maps at this input size; "
                                         "removing their rank-one part leaves nothing (that half of the score "
                                         "would be constant): use larger inputs")
            return remove_rank_one(out, channels_last)

        handle = stages.module(module_name).register_forward_hook(hook)
        try:
            z = stages.forward(x).double()
        finally:
            handle.remove()
        if len(calls) != 1:  # the removal must happen exactly once, or the logits are not z_3 / z_4
            raise ScoreNotApplicable(f"rankfeat: stage {module_name!r} ran {len(calls)} times in one forward pass "
                                     f"({stages.source}); expected once")
        return z

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        parts = []
        with eval_mode(model), torch.no_grad():
            for x, _ in batches(loader, model_device(model)):
                stages, ((last, fmt4), (second, fmt3)) = self._stages(model, x)
                z4 = self._logits_with_removal(stages, x, last, fmt4 == "NHWC")
                z3 = self._logits_with_removal(stages, x, second, fmt3 == "NHWC")
                t = self.temperature
                parts.append(t * torch.logsumexp((z4 + z3) / 2.0 / t, dim=1))
        return concat_scores(parts, "rankfeat score")
