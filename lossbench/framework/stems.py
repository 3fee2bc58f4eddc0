"""Small-image stems for timm CNN backbones: a 3x3 stride-1 first convolution and no max-pool.

The CIFAR ResNets of He et al. 2016 (Sec. 4.2) and OpenOOD's CIFAR ResNet-18 (its reference model,
95.06 % test accuracy with cross-entropy) start with one 3x3 convolution of stride 1 and no
pooling, so a 32-px image is still 32 x 32 at the first stage; timm's ImageNet stem (7x7 stride-2
convolution + 3x3 stride-2 max-pool) leaves 8 x 8. timm's ``ResNet`` has no model argument for
this stem (its ``stem_type`` only chooses between the 7x7 and the deep 3x3 stride-2 stems), so the
stem modules are replaced after ``create_model``:

- plain stem: ``conv1`` becomes ``Conv2d(in_chans, stem_out, 3, stride=1, padding=1, bias=False)``;
- deep stems (``resnet*d``, ``resnet*t``): the first 3x3 convolution's stride becomes 1;
- ``maxpool`` (max-pool, or the stride-2 conv "stem pool") becomes ``nn.Identity``.

``feature_info`` reductions are divided by 4 (the stem entry's by 2), so multi-layer feature taps
(``ood.features``) keep naming the same modules with the right strides. Replaced layers are freshly
initialised (pretrained stem weights do not fit a different kernel or stride).
"""

from __future__ import annotations

import torch.nn as nn

SMALL_STEM_FAMILIES = ("timm ResNet family (resnet*, resnet*d, resnet*t, seresnet*, resnext*, wide_resnet*, ...)",)


def use_small_stem(backbone: nn.Module) -> nn.Module:
    """Replace ``backbone``'s stem (in place) by a 3x3 stride-1 convolution without max-pool; returns it."""
    from timm.models.resnet import ResNet

    if not isinstance(backbone, ResNet):
        raise ValueError(
            f"small_stem is supported for {SMALL_STEM_FAMILIES[0]}; got {type(backbone).__name__}. "
            f"Use a ResNet-family model or turn small_stem off"
        )
    conv1 = backbone.conv1
    if isinstance(conv1, nn.Conv2d):
        new = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # timm ResNet's conv init
        backbone.conv1 = new
    elif isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        conv1[0].stride = (1, 1)
    else:
        raise ValueError(f"unexpected ResNet stem {type(conv1).__name__}; cannot make it a small-image stem")
    backbone.maxpool = nn.Identity()
    for info in backbone.feature_info:
        if info["module"] == "act1":
            info["reduction"] = 1
        else:
            info["reduction"] = max(1, info["reduction"] // 4)
    return backbone
