"""Name -> constructor registry for losses and heads.

Every loss or head registers itself with :func:`register_loss`; scripts and users build one
with :func:`create_loss` and list them with :func:`list_losses`. A registered entry is either a
*logit loss* (``loss(logits, target)``) or a *head* that owns the classifier weights
(``head(features, target)`` and ``head.logits(features)``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch.nn as nn

LOGITS = "logits"
HEAD = "head"


@dataclass(frozen=True)
class LossEntry:
    name: str
    constructor: Callable[..., nn.Module]
    kind: str  # LOGITS or HEAD


_LOSSES: Dict[str, LossEntry] = {}


def register_loss(name: str, kind: str = LOGITS) -> Callable:
    """Class decorator: register ``cls`` under ``name`` as a ``kind`` ('logits' or 'head')."""
    if kind not in (LOGITS, HEAD):
        raise ValueError(f"kind must be {LOGITS!r} or {HEAD!r}, got {kind!r}")

    def deco(cls):
        key = name.lower()
        if key in _LOSSES and _LOSSES[key].constructor is not cls:
            raise ValueError(f"loss name {name!r} is already registered to {_LOSSES[key].constructor}")
        _LOSSES[key] = LossEntry(key, cls, kind)
        return cls

    return deco


def list_losses() -> List[str]:
    """Sorted names of every registered loss and head."""
    return sorted(_LOSSES)


def get_loss_entry(name: str) -> LossEntry:
    key = str(name).lower()
    if key not in _LOSSES:
        raise ValueError(f"unknown loss name {name!r}; expected one of {list_losses()}")
    return _LOSSES[key]


def _check_kwargs(name: str, ctor: Callable, kwargs: Dict[str, Any]) -> None:
    sig = inspect.signature(ctor)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in params:
            raise TypeError(
                f"unknown hyper-parameter {key!r} for loss {name!r}; valid ones are {valid}"
            )


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss or head registered as ``name``.

    Unknown names raise ``ValueError``; unknown hyper-parameters raise ``TypeError`` naming
    the key and the valid ones. ``num_classes``/``in_features`` are passed to heads; a logit
    loss that does not take them ignores them, so scripts can pass both uniformly.
    """
    entry = get_loss_entry(name)
    ctor = entry.constructor
    params = inspect.signature(ctor).parameters
    if entry.kind == LOGITS:
        for k in ("num_classes", "in_features"):
            if k in kwargs and k not in params:
                kwargs.pop(k)
    _check_kwargs(name, ctor, kwargs)
    return ctor(**kwargs)


def build_head(name: str, num_classes: int, in_features: int, **kwargs: Any) -> nn.Module:
    """A :class:`~lossbench.losses.base.Head` for ``name``, whatever its kind.

    A head is built directly; a loss on logits is wrapped in a ``LinearHead`` (``nn.Linear`` +
    the loss), so a trainer always calls ``head(features, target)`` and ``head.logits(features)``.
    """
    from .losses.base import LinearHead  # local import: losses import this module

    entry = get_loss_entry(name)
    if entry.kind == HEAD:
        return create_loss(name, num_classes=num_classes, in_features=in_features, **kwargs)
    criterion = create_loss(name, num_classes=num_classes, **kwargs)
    return LinearHead(in_features, num_classes, criterion)
