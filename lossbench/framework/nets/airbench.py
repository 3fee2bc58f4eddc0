"""The airbench fast small-image network (Jordan 2024, "94 % on CIFAR-10 in 3.29 seconds on a single GPU"),
registered with timm as ``lossbench_airbench94`` (widths 64/256/256) and ``lossbench_airbench95``
(128/384/384).

Architecture, every number from ``legacy/airbench94.py`` / ``legacy/airbench95.py`` of
KellerJordan/cifar10-airbench:

- ``stem``: a 2x2 convolution, no padding, ``2 * in_chans * 4`` filters (24 for RGB) = the
  eigenvectors of the training patches' covariance scaled by ``1/sqrt(eigenvalue + 5e-4)`` and
  their negatives (``init_whitening_conv``, eps 5e-4, the first 5,000 training images); its weight is
  frozen, its bias (zero-initialised) trains for the first 3 epochs (``whiten_bias_epochs``), then GELU;
- three ``ConvGroup`` s of widths 64/256/256: conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 ->
  BatchNorm -> GELU; the 3x3 convolutions are bias-free, ``padding='same'``, torch's default
  initialisation with ``dirac_`` on the first ``in_channels`` filters;
- BatchNorm: weight frozen at 1, eps 1e-12, running-statistics momentum 0.4 in torch's convention
  (the file's ``batchnorm_momentum`` 0.6 is ``1 - momentum``);
- head: a max-pool over the final 3x3 map (``MaxPool2d(3)``; a global max-pool here,
  ``adaptive_max_pool2d(x, 1)``, identical at 32 px with the same backward), flatten, the 1/9
  ``scaling_factor``, then a bias-free linear classifier.

The 1/9 scale is applied to the pooled features (``forward_head(pre_logits=True)`` returns them
scaled). For a bias-free linear layer ``W (f / 9) = (W f) / 9``, and its gradient is the same, so
any lossbench head put on these features sees airbench's parametrisation.

The data-dependent initialisation is the model hook :meth:`AirbenchNet.init_from_data` (the trainer
calls it on a fresh run with normalised, un-augmented training images) and the bias freeze the hook
:meth:`AirbenchNet.on_train_epoch`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

#: Values from ``legacy/airbench94.py``'s ``hyp`` and helpers (see the module docstring).
WHITEN_EPS = 5e-4
WHITEN_KERNEL = 2
WHITEN_IMAGES = 5000
WHITEN_BIAS_EPOCHS = 3
BN_MOMENTUM = 0.4  # torch convention; the file's 0.6 is 1 - momentum
BN_EPS = 1e-12
SCALING_FACTOR = 1.0 / 9.0


class _Conv3x3(nn.Conv2d):
    """Bias-free 3x3 ``'same'`` convolution; torch's default init with ``dirac_`` on the first ``in`` filters."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


def _batch_norm(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)  # fixed at 1
    return bn


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU (airbench's ``ConvGroup``)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = _Conv3x3(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _batch_norm(c_out)
        self.conv2 = _Conv3x3(c_out, c_out)
        self.norm2 = _batch_norm(c_out)
        self.activ = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def image_patches(images: Tensor, size: int) -> Tensor:
    """Every ``size x size`` patch (stride 1) of ``images`` (N, C, H, W) as rows of (N', C*size*size)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    c = images.shape[1]
    p = images.float().unfold(2, size, 1).unfold(3, size, 1)  # N, C, H', W', s, s
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size)


def whitening_filters(images: Tensor, size: int = WHITEN_KERNEL, eps: float = WHITEN_EPS) -> Tensor:
    """The patch-whitening filters: eigenvectors of the (uncentred) patch covariance ``P^T P / n``,
    largest eigenvalue first, each divided by ``sqrt(eigenvalue + eps)``, followed by their negatives.

    Returns ``(2 * C * size * size, C, size, size)``. The convolution of an image with the first half
    gives patch coordinates in the eigenbasis with unit second moment (up to eps).
    """
    rows = image_patches(images, size).double()
    if rows.shape[0] == 0:
        raise ValueError("images must hold at least one patch for the whitening initialisation")
    cov = rows.T @ rows / rows.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.T.flip(0)  # descending
    c = images.shape[1]
    scaled = (evecs / torch.sqrt(evals.clamp_min(0) + eps).unsqueeze(1)).reshape(-1, c, size, size)
    return torch.cat([scaled, -scaled]).float()


class AirbenchNet(nn.Module):
    """airbench's network as a timm-style model (``num_classes=0``: pooled, scaled 256-d features).

    timm interface: ``forward_features`` -> (N, C, H/8, W/8) map, ``forward_head(x, pre_logits)``,
    ``reset_classifier``, ``get_classifier``, ``num_features``, ``feature_info`` (stem and the three
    groups, for multi-layer OOD scores).
    """

    def __init__(self, widths: Sequence[int] = (64, 256, 256), num_classes: int = 10, in_chans: int = 3,
                 scaling_factor: float = SCALING_FACTOR, whiten_bias_epochs: int = WHITEN_BIAS_EPOCHS,
                 drop_rate: float = 0.0, **_: Any):
        super().__init__()
        if len(widths) != 3 or any(int(w) <= 0 for w in widths):
            raise ValueError(f"widths must be three positive integers, got {widths}")
        self.in_chans, self.widths = int(in_chans), tuple(int(w) for w in widths)
        self.scaling_factor = float(scaling_factor)
        self.whiten_bias_epochs = int(whiten_bias_epochs)
        self.drop_rate = float(drop_rate)
        stem_width = 2 * self.in_chans * WHITEN_KERNEL ** 2
        self.stem = nn.Conv2d(self.in_chans, stem_width, WHITEN_KERNEL, padding=0, bias=True)
        nn.init.zeros_(self.stem.bias)
        self.stem.weight.requires_grad_(False)
        self.stem_act = nn.GELU()
        self.layer1 = ConvGroup(stem_width, self.widths[0])
        self.layer2 = ConvGroup(self.widths[0], self.widths[1])
        self.layer3 = ConvGroup(self.widths[1], self.widths[2])
        self.num_features = self.head_hidden_size = self.widths[2]
        self.feature_info = [
            dict(num_chs=stem_width, reduction=1, module="stem_act"),
            dict(num_chs=self.widths[0], reduction=2, module="layer1"),
            dict(num_chs=self.widths[1], reduction=4, module="layer2"),
            dict(num_chs=self.widths[2], reduction=8, module="layer3"),
        ]
        self.num_classes = 0
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        self.whitened = False

    # -- timm interface --------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(self.num_features, self.num_classes, bias=False) if self.num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem_act(self.stem(x))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        # A max-pool over the whole map (airbench's MaxPool2d(3) on its 3x3 map), whose backward
        # routes each gradient to one position as max-pooling does; torch.amax would split it
        # among ties (frequent in bf16), and torch.compile's CPU backward of amax under bf16
        # autocast returned NaN gradients (torch 2.14).
        x = F.adaptive_max_pool2d(x, 1).flatten(1) * self.scaling_factor
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- hooks the trainer calls -----------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """Set the stem to the whitening filters of ``images`` (normalised training images, N, C, H, W).

        airbench uses the first 5,000 training images (:data:`WHITEN_IMAGES`); the caller chooses.
        """
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must be (N, {self.in_chans}, H, W), got shape {tuple(images.shape)}")
        self.stem.weight.copy_(whitening_filters(images, WHITEN_KERNEL, WHITEN_EPS))
        self.whitened = True

    def on_train_epoch(self, epoch: int) -> None:
        """Train the stem's bias during the first ``whiten_bias_epochs`` epochs (0-based ``epoch``), then freeze it."""
        self.stem.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    #: How many training images :meth:`init_from_data` wants (the trainer reads it).
    init_data_size = WHITEN_IMAGES


def _register():
    from timm.models import register_model

    def make(name: str, widths: Tuple[int, int, int], doc: str):
        def entry(pretrained: bool = False, **kwargs: Any) -> AirbenchNet:
            if pretrained:
                raise ValueError(f"{name} has no pretrained weights (train it: configs/cifar10_fast.yaml)")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
                kwargs.pop(key, None)
            kwargs.pop("global_pool", None)
            return AirbenchNet(widths=widths, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        entry.__doc__ = doc
        entry.__module__ = __name__
        return register_model(entry)

    return (make("lossbench_airbench94", (64, 256, 256),
                 "airbench94's network (widths 64/256/256; legacy/airbench94.py)."),
            make("lossbench_airbench95", (128, 384, 384),
                 "airbench95's network (widths 128/384/384; legacy/airbench95.py)."))


lossbench_airbench94, lossbench_airbench95 = _register()
