"""Name -> constructor registry for OOD scores (the same :class:`lossbench.registry.Registry` as losses)."""

from __future__ import annotations

from typing import Any, Callable, List, Type

from lossbench.registry import Registry

SCORES: Registry = Registry("OOD score")


def register_score(name: str) -> Callable[[Type], Type]:
    """Class decorator: register an :class:`~ood.scores.base.OODScore` subclass under ``name``."""
    inner = SCORES.register(name)

    def deco(cls: Type) -> Type:
        inner(cls)
        if not getattr(cls, "name", ""):
            cls.name = str(name).lower()
        return cls

    return deco


def list_scores() -> List[str]:
    """Sorted names of every registered score."""
    return SCORES.names()


def get_score_class(name: str) -> Type:
    """The class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    return SCORES.entry(name).constructor


def create_score(name: str, **kwargs: Any):
    """Build the score registered as ``name``; an unknown keyword raises ``TypeError`` naming it."""
    return SCORES.create(name, **kwargs)
