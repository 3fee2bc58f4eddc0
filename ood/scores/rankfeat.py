"""RankFeat: energy of the logits after removing the rank-1 component of the last two stage feature maps."""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lossbench.validation import check_positive

from ..features import backbone_layout, backbone_of, stage_info
from ..registry import register_score
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

    Implemented on any timm backbone with ``feature_info`` stages of 4-D (``NCHW`` or declared
    ``NHWC``) outputs, by a forward hook that replaces the stage output during ``model(x)``; for a
    ResNet that is exactly OpenOOD's ``layer4`` / ``avgpool`` / ``fc`` path. Others (no stages,
    token outputs) raise :class:`~ood.scores.feature_base.ScoreNotApplicable` at fit. Exact SVD
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

    def _stages(self, model: nn.Module) -> List[str]:
        try:
            info = stage_info(model)
        except TypeError as err:
            raise ScoreNotApplicable(f"rankfeat needs a timm backbone with feature_info stages; "
                                     f"{type(backbone_of(model)).__name__} has none") from err
        if len(info) < 2:
            raise ScoreNotApplicable(f"rankfeat needs at least two backbone stages, the backbone has {len(info)}")
        return [info[-1]["module"], info[-2]["module"]]

    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None) -> "RankFeat":
        """No statistics: checks on the first batch of ``loader`` that the model has the stages RankFeat modifies."""
        last, second = self._stages(model)
        channels_last = backbone_layout(model)[0] == "NHWC"
        with eval_mode(model), torch.no_grad():
            for x, _ in batches(loader, model_device(model)):
                for name in (last, second):
                    self._logits_with_removal(model, x[:1], name, channels_last)
                break
        return self

    def _logits_with_removal(self, model: nn.Module, x: Tensor, module_name: str, channels_last: bool) -> Tensor:
        def hook(_m, _inp, out):
            if not isinstance(out, Tensor) or out.dim() != 4:
                raise ScoreNotApplicable(f"rankfeat: stage {module_name!r} gives {getattr(out, 'shape', type(out))}, "
                                         "not a 4-D feature map")
            h, w = (out.shape[1], out.shape[2]) if channels_last else (out.shape[2], out.shape[3])
            if h * w == 1:  # a C x 1 matrix is its own rank-one part: the removal leaves zeros
                raise ScoreNotApplicable(f"rankfeat: stage {module_name!r} gives 1 x 1 maps at this input size; "
                                         "removing their rank-one part leaves nothing (that half of the score "
                                         "would be constant): use larger inputs")
            return remove_rank_one(out, channels_last)

        handle = backbone_of(model).get_submodule(module_name).register_forward_hook(hook)
        try:
            return model(x).double()
        finally:
            handle.remove()

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        last, second = self._stages(model)
        channels_last = backbone_layout(model)[0] == "NHWC"
        parts = []
        with eval_mode(model), torch.no_grad():
            for x, _ in batches(loader, model_device(model)):
                z4 = self._logits_with_removal(model, x, last, channels_last)
                z3 = self._logits_with_removal(model, x, second, channels_last)
                t = self.temperature
                parts.append(t * torch.logsumexp((z4 + z3) / 2.0 / t, dim=1))
        return concat_scores(parts, "rankfeat score")
