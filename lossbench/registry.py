"""Name -> constructor registries: one :class:`Registry` class, used for losses here and scores in ``ood``.

Every loss or head registers itself with :func:`register_loss`; scripts and users build one with
:func:`create_loss` and list them with :func:`list_losses`. A registered loss is either a *logit
loss* (``loss(logits, target)``) or a *head* that owns the classifier weights (``head(features,
target)`` and ``head.logits(features)``); :func:`build_head` turns either into a head.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar

import torch.nn as nn

from .errors import UnknownArgumentError, UnknownNameError

T = TypeVar("T")
LOGITS = "logits"
HEAD = "head"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered constructor: its name, the callable and a kind tag (``None`` if unused)."""

    name: str
    constructor: Callable[..., T]
    kind: Optional[str] = None




class Registry(Generic[T]):
    """Case-insensitive ``name -> constructor`` table of one kind of object (``what``: 'loss', 'OOD score')."""

    def __init__(self, what: str, kinds: Optional[tuple] = None) -> None:
        self.what = what
        self.kinds = kinds
        self._entries: Dict[str, Entry[T]] = {}

    def register(self, name: str, kind: Optional[str] = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Class decorator: register the class under ``name`` (with ``kind`` if this registry has kinds)."""
        if self.kinds is not None and kind not in self.kinds:
            raise ValueError(f"kind must be one of {self.kinds}, got {kind!r}")
        key = str(name).lower()

        def deco(cls: Callable[..., T]) -> Callable[..., T]:
            old = self._entries.get(key)
            if old is not None and old.constructor is not cls:
                raise ValueError(f"{self.what} name {name!r} is already registered to {old.constructor}")
            self._entries[key] = Entry(key, cls, kind)
            return cls

        return deco

    def names(self) -> List[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; :class:`~lossbench.errors.UnknownNameError` listing the valid names otherwise."""
        key = str(name).lower()
        if key not in self._entries:
            raise UnknownNameError(f"unknown {self.what} name {name!r}; expected one of {self.names()}")
        return self._entries[key]

    def create(self, name: str, **kwargs: Any) -> T:
        """Build ``name`` with ``kwargs``; an unknown keyword raises ``TypeError`` naming it and the valid ones."""
        entry = self.entry(name)
        check_kwargs(f"{self.what} {entry.name!r}", entry.constructor, kwargs)
        return entry.constructor(**kwargs)


def check_kwargs(what: str, ctor: Callable, kwargs: Dict[str, Any]) -> None:
    """:class:`~lossbench.errors.UnknownArgumentError` (a ``TypeError``) naming the first keyword of
    ``kwargs`` that ``ctor`` does not take."""
    params = inspect.signature(ctor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in params:
            raise UnknownArgumentError(f"unknown hyper-parameter {key!r} for {what}; valid ones are {valid}")


LOSSES: Registry[nn.Module] = Registry("loss", kinds=(LOGITS, HEAD))


def register_loss(name: str, kind: str = LOGITS) -> Callable:
    """Class decorator: register ``cls`` under ``name`` as a ``kind`` ('logits' or 'head')."""
    return LOSSES.register(name, kind)


def list_losses() -> List[str]:
    """Sorted names of every registered loss and head."""
    return LOSSES.names()


def get_loss_entry(name: str) -> Entry:
    """The registry entry of loss ``name`` (its constructor and kind)."""
    return LOSSES.entry(name)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss or head registered as ``name``.

    Unknown names raise ``ValueError``; unknown hyper-parameters raise ``TypeError`` naming the key
    and the valid ones. ``num_classes``/``in_features`` are passed to heads; a logit loss that does
    not take them ignores them, so scripts can pass both uniformly.
    """
    entry = LOSSES.entry(name)
    if entry.kind == LOGITS:
        params = inspect.signature(entry.constructor).parameters
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_features") or k in params}
    return LOSSES.create(name, **kwargs)


def build_head(name: str, num_classes: int, in_features: int, **kwargs: Any) -> nn.Module:
    """A :class:`~lossbench.losses.base.Head` for ``name``, whatever its kind.

    A head is built directly; a loss on logits is wrapped in a ``LinearHead`` (``nn.Linear`` + the
    loss), so a trainer always calls ``head(features, target)`` and ``head.logits(features)``.
    """
    from .losses.base import LinearHead  # local import: losses import this module

    entry = LOSSES.entry(name)
    if entry.kind == HEAD:
        return create_loss(name, num_classes=num_classes, in_features=in_features, **kwargs)
    criterion = create_loss(name, num_classes=num_classes, **kwargs)
    return LinearHead(in_features, num_classes, criterion)
