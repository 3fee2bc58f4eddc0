"""A timm backbone used as a feature extractor, with the classifier head owned by lossbench."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UserInputError
from ..registry import build_head
from .stems import use_small_stem


class PretrainedWeightsError(UserInputError, RuntimeError):
    """Pretrained weights could not be loaded (offline hub, missing or mismatched local file)."""


class Classifier(nn.Module):
    """``backbone`` (timm, ``num_classes=0``) -> penultimate features -> ``head``.

    ``model(x)`` gives logits (noise-free, for inference and OOD scores), ``model.features(x)`` the
    penultimate features and ``model.loss(x, y)`` the head's training loss with the logits of the
    same forward pass (so accuracy costs no second backbone pass).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head.logits(self.features(x))

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Training loss and (detached) logits for one batch."""
        f = self.features(x)
        loss = self.head(f, y)
        with torch.no_grad():
            logits = self.head.logits(f.detach())
        return loss, logits


def create_backbone(name: str, in_chans: int = 3, pretrained: bool = False,
                    pretrained_file: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``; local weights via timm's ``pretrained_cfg_overlay``.

    lossbench's own networks (:mod:`lossbench.framework.nets`, e.g. ``lossbench_airbench94``) are
    registered with timm first, so they are built like any timm name."""
    import timm

    from . import nets  # noqa: F401  (registers lossbench's networks with timm)

    if not timm.is_model(name):
        raise UserInputError(f"unknown timm model name {name!r} (--model; see timm.list_models())")
    if pretrained_file is not None:
        import os

        if not os.path.isfile(pretrained_file):
            raise PretrainedWeightsError(f"pretrained_file {pretrained_file!r} does not exist")
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans,
                                     pretrained_cfg_overlay={"file": pretrained_file}, **kwargs)
        except (RuntimeError, KeyError, ValueError) as err:
            raise PretrainedWeightsError(
                f"could not load pretrained_file {pretrained_file!r} into timm model {name!r}: {err}"
            ) from None
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans, **kwargs)
        except Exception as err:  # hub unreachable, no weights for this name, ...
            raise PretrainedWeightsError(
                f"pretrained weights for {name!r} come from timm's hub (Hugging Face), which could not "
                f"be used here ({type(err).__name__}: {err}). Offline, download the weights elsewhere and "
                f"pass --pretrained-file PATH instead."
            ) from None
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)


def penultimate_width(backbone: nn.Module) -> int:
    """Width of the features ``backbone(x)`` returns with ``num_classes=0``.

    timm's ``head_hidden_size`` where a pre-logits layer follows the stages (MobileNetV3's
    ``conv_head``, MambaOut's MLP), else ``num_features`` (the last stage's channels).
    """
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def create_model(model_name: str, num_classes: int, loss: str = "ce",
                 loss_args: Optional[Dict[str, Any]] = None, in_chans: int = 3,
                 pretrained: bool = False, pretrained_file: Optional[str] = None,
                 small_stem: bool = False, **backbone_kwargs: Any) -> Classifier:
    """A :class:`Classifier`: timm backbone ``model_name`` + the head for loss ``loss``.

    ``small_stem`` swaps the backbone's stem for the small-image one (:func:`use_small_stem`).
    """
    backbone = create_backbone(model_name, in_chans, pretrained, pretrained_file, **backbone_kwargs)
    if small_stem:
        use_small_stem(backbone)
    try:
        head = build_head(loss, num_classes=num_classes, in_features=penultimate_width(backbone), **(loss_args or {}))
    except UserInputError:
        raise
    except ValueError as err:  # the loss's own check of a hyper-parameter value
        raise UserInputError(f"loss {loss!r} with loss_args {dict(loss_args or {})}: {err}") from err
    return Classifier(backbone, head)
