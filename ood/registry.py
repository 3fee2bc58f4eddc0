"""Name -> constructor registry for OOD scores: ``register_score``, ``create_score``, ``list_scores``."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Type

_SCORES: Dict[str, Type] = {}


def register_score(name: str) -> Callable[[Type], Type]:
    """Class decorator: register an :class:`~ood.scores.base.OODScore` subclass under ``name``."""
    key = name.lower()

    def deco(cls: Type) -> Type:
        if key in _SCORES and _SCORES[key] is not cls:
            raise ValueError(f"score name {name!r} is already registered to {_SCORES[key]}")
        _SCORES[key] = cls
        if not getattr(cls, "name", ""):
            cls.name = key
        return cls

    return deco


def list_scores() -> List[str]:
    """Sorted names of every registered score."""
    return sorted(_SCORES)


def get_score_class(name: str) -> Type:
    """The class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    key = str(name).lower()
    if key not in _SCORES:
        raise ValueError(f"unknown OOD score {name!r}; expected one of {list_scores()}")
    return _SCORES[key]


def create_score(name: str, **kwargs: Any):
    """Build the score registered as ``name``; an unknown keyword raises ``TypeError`` naming it."""
    cls = get_score_class(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [p for p in params if p != "self"]
        for key in kwargs:
            if key not in params:
                raise TypeError(
                    f"unknown hyper-parameter {key!r} for OOD score {name!r}; valid ones are {valid}"
                )
    return cls(**kwargs)
