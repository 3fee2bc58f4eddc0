"""The two kinds of loss in lossbench and the step hook the trainer calls.

* :class:`LogitLoss` -- ``loss(logits, target)``, like ``torch.nn.CrossEntropyLoss``.
* :class:`Head` -- owns the classifier weights: ``head(features, target) -> loss`` for training,
  ``head.logits(features)`` for inference and OOD scoring.

Both have ``on_step(step)``: the trainer calls it once per optimisation step (``step`` counts
from 0) so that schedules a paper anneals (temperatures, noise) also run in a user's own loop.
A head also says how its own parameters should be optimised (:meth:`Head.optim_settings`,
:meth:`Head.param_groups`): a scale or a temperature may need a larger learning rate or no weight
decay than the network's recipe gives it.

Conventions every loss and head follows (``tests/test_harness.py`` checks them for each
registered one): targets may be any integer dtype; bf16/fp16 inputs compute in float32, float64
stays float64; an empty batch is a ``ValueError`` (never NaN, never a silent 0); NaN/inf inputs,
wrong shapes, labels out of range and ``meta`` tensors are errors that name the argument.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, List, Optional

import torch.nn as nn
from torch import Tensor

from ..validation import check_features
from ._common import check_int, linear


class LogitLoss(nn.Module, metaclass=abc.ABCMeta):
    """Base class for losses computed from logits ``(N, C)`` and class indices ``(N,)``."""

    def on_step(self, step: int) -> None:  # noqa: D401 - hook
        """Advance any schedule to optimisation step ``step`` (no-op by default)."""

    @abc.abstractmethod
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Scalar (or per-sample, with ``reduction='none'``) loss."""


class Head(nn.Module, metaclass=abc.ABCMeta):
    """Base class for heads that own the classifier weights.

    Subclasses set ``in_features`` and ``num_classes`` and implement ``logits`` and ``forward``.
    """

    in_features: int
    num_classes: int

    def __init__(self, in_features: Optional[int] = None, num_classes: Optional[int] = None) -> None:
        super().__init__()
        if in_features is not None:
            self.in_features = check_int(in_features, "in_features")
        if num_classes is not None:
            self.num_classes = check_int(num_classes, "num_classes", minimum=2)

    def on_step(self, step: int) -> None:
        """Advance any schedule to optimisation step ``step`` (no-op by default)."""

    def check_features(self, features: Tensor) -> None:
        check_features(features, self.in_features, "features")

    def optim_settings(self) -> Dict[str, Dict[str, float]]:
        """Optimiser settings this head declares for its own parameters (default: none).

        ``{parameter name (as in named_parameters()): {"lr_scale": m, "weight_decay": wd}}``; any
        key may be left out (then the caller's value holds). ``lr_scale`` multiplies the base
        learning rate (and follows its schedule); ``"lr": x`` instead fixes the peak learning rate
        of that parameter whatever the base one (``lr_scale = x / base_lr``); ``weight_decay``
        replaces the base weight decay.
        Subclasses state each setting's source in their docstring.
        """
        return {}

    def param_groups(self, base_lr: float, weight_decay: float) -> List[Dict[str, Any]]:
        """``torch.optim`` parameter groups of this head's trainable parameters, with its declared settings.

        Undeclared parameters follow timm's rule (weight decay ``weight_decay`` for matrices, none
        for biases and other 1-D / scalar parameters); declared ones get
        :meth:`optim_settings`. Each group holds ``params``, ``lr`` (= ``base_lr * lr_scale``),
        ``weight_decay`` and the parameter ``names``. Schedulers that scale each group's initial lr
        (torch's ``LambdaLR`` / ``CosineAnnealingLR``, timm's) keep the ratios. (No ``lr_scale``
        key: timm's schedulers would apply it a second time.) Use in a user's own loop:
        ``torch.optim.AdamW(backbone_groups + head.param_groups(lr, wd), lr=lr)``.
        """
        settings = self.optim_settings()
        names = dict(self.named_parameters())
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"optim_settings names parameters this head does not have: {unknown}; "
                             f"its parameters are {sorted(names)}")
        groups: Dict[tuple, Dict[str, Any]] = {}
        for name, p in names.items():
            if not p.requires_grad:
                continue
            own = settings.get(name, {})
            bad = sorted(set(own) - {"lr", "lr_scale", "weight_decay"})
            if bad or ("lr" in own and "lr_scale" in own):
                raise ValueError(f"optim_settings[{name!r}] = {own}: expected keys lr or lr_scale (not both), weight_decay")
            default_wd = 0.0 if p.ndim <= 1 or name.endswith(".bias") else float(weight_decay)
            scale = float(own["lr"]) / float(base_lr) if "lr" in own else float(own.get("lr_scale", 1.0))
            key = (scale, float(own.get("weight_decay", default_wd)))
            g = groups.setdefault(key, {"params": [], "names": [], "lr": base_lr * key[0], "weight_decay": key[1]})
            g["params"].append(p)
            g["names"].append(name)
        return list(groups.values())

    @abc.abstractmethod
    def logits(self, features: Tensor) -> Tensor:
        """Class scores ``(N, num_classes)`` for inference and OOD scoring (no noise, no sampling)."""

    @abc.abstractmethod
    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        """Training loss from features ``(N, in_features)`` and class indices ``(N,)``."""


class LinearLayerHead(Head):
    """A head whose logits are one ``nn.Linear`` layer ``fc`` (subclasses define the loss)."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(in_features, num_classes)
        self.fc = nn.Linear(self.in_features, self.num_classes, bias=bias)

    def logits(self, features: Tensor) -> Tensor:
        """``fc(features)``; bf16/fp16 features outside autocast compute in float32 (see ``linear``)."""
        self.check_features(features)
        return linear(features, self.fc.weight, self.fc.bias)


class LinearHead(LinearLayerHead):
    """``nn.Linear`` followed by a :class:`LogitLoss`: how the trainer uses any loss on logits."""

    def __init__(self, in_features: int, num_classes: int, criterion: nn.Module, bias: bool = True):
        super().__init__(in_features, num_classes, bias=bias)
        self.criterion = criterion

    def on_step(self, step: int) -> None:
        hook = getattr(self.criterion, "on_step", None)
        if hook is not None:
            hook(step)

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        return self.criterion(self.logits(features), target)
