"""OpenOOD's protocol pieces: named groups of OOD sets and a hyper-parameter search on validation data.

*Groups* (``{'near': [...], 'far': [...]}``; any names) only summarise: every set keeps its own
metrics and a group's entry is the plain mean over its sets (OpenOOD v1.5 ``evaluator.py``
averages the per-set metrics of ``nearood`` / ``farood`` the same way).

*Search* (OpenOOD's "APS", ``hyperparam_search`` in ``openood/evaluation_api/evaluator.py``): for a
score class with a non-empty ``GRID``, every point of the grid (the Cartesian product in the
grid's key order with the **first key varying fastest**, the order of OpenOOD's
``Evaluator.recursive_generator``; the reverse of ``itertools.product``) is fitted and scored on the ID
**validation** split against the **validation OOD** set; the point with the highest AUROC is kept
(ties: the first point in that order, as OpenOOD's strict ``>``; so ODIN's grid ``temperature`` x
``eps`` visits every temperature at the first ``eps`` before the second ``eps``). The test sets are never seen. A parameter the
caller fixes in ``score_kwargs`` is not searched. A grid point the score cannot run
(:class:`~ood.scores.feature_base.ScoreNotApplicable`, e.g. ViM with ``dim`` >= the feature width) is
recorded with its reason and skipped; when no point runs, the score is skipped.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .metrics import ood_metrics
from .registry import create_score, get_score_class
from .scores.feature_base import ScoreNotApplicable


def grid_of(name: str, fixed: Mapping[str, Any] = ()) -> Dict[str, Tuple[Any, ...]]:
    """The search grid of score ``name`` (its class's ``GRID``) without the parameters in ``fixed``."""
    grid = getattr(get_score_class(name), "GRID", None) or {}
    return {k: tuple(v) for k, v in grid.items() if k not in dict(fixed)}


def grid_points(grid: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """Every point of ``grid`` as a dict, the first key varying fastest (OpenOOD's enumeration order).

    OpenOOD v1.5 ``Evaluator.recursive_generator`` loops over the last parameter's values outermost,
    so ``{'a': (1, 2), 'b': ('x', 'y')}`` gives ``a=1,b=x; a=2,b=x; a=1,b=y; a=2,b=y``; with the
    strict ``>`` of its search this order decides which of two tied points is chosen.
    """
    keys = list(grid)
    for k in keys:
        if isinstance(grid[k], (str, bytes)) or not len(grid[k]):
            raise ValueError(f"grid[{k!r}] must be a non-empty sequence of values, got {grid[k]!r}")
    # itertools.product varies its last argument fastest: feed it the keys reversed
    points = (dict(zip(keys[::-1], values)) for values in itertools.product(*(grid[k] for k in keys[::-1])))
    return [{k: p[k] for k in keys} for p in points]


def _plain(v: Any) -> Any:
    """JSON-friendly scalar (numpy numbers to Python)."""
    return v.item() if isinstance(v, np.generic) else v


def search_score(name: str, fixed: Mapping[str, Any],
                 evaluate_point: Callable[[Any], Tuple[Any, Any]]) -> Optional[Dict[str, Any]]:
    """Search score ``name`` over its grid; ``None`` when it has no grid (after removing ``fixed``).

    ``evaluate_point(score_object)`` fits the (unfitted) score and returns its (ID validation, validation
    OOD) scores. Returns ``{'chosen': params, 'val_auroc': best, 'grid': [{'params', 'val_auroc'} or
    {'params', 'error'}, ...]}``; raises :class:`ScoreNotApplicable` when no grid point could run.
    """
    grid = grid_of(name, fixed)
    if not grid:
        return None
    trials: List[Dict[str, Any]] = []
    best: Optional[Tuple[float, Dict[str, Any]]] = None
    for point in grid_points(grid):
        params = {k: _plain(v) for k, v in point.items()}
        try:
            s_in, s_out = evaluate_point(create_score(name, **dict(fixed), **point))
            auroc = float(ood_metrics(np.asarray(s_in, dtype=np.float64), np.asarray(s_out, dtype=np.float64),
                                      "paper")["auroc"])
        except ScoreNotApplicable as err:
            trials.append({"params": params, "error": str(err)})
            continue
        trials.append({"params": params, "val_auroc": auroc})
        if best is None or auroc > best[0]:  # strict: ties keep the first point
            best = (auroc, params)
    if best is None:
        reasons = "; ".join(f"{t['params']}: {t['error']}" for t in trials)
        raise ScoreNotApplicable(f"no point of {name}'s search grid could run ({reasons})")
    return {"chosen": best[1], "val_auroc": best[0], "grid": trials}


def check_groups(groups: Optional[Mapping[str, Sequence[str]]], set_names: Sequence[str]) -> Dict[str, List[str]]:
    """``groups`` checked against the OOD sets: non-empty lists of known sets, each set in one group at most."""
    if groups is None:
        return {}
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"ood_groups must be a non-empty mapping {{group: [OOD set names]}}, got {groups!r}")
    seen: Dict[str, str] = {}
    out: Dict[str, List[str]] = {}
    for g, names in groups.items():
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"ood_groups[{g!r}] must be a non-empty list of OOD set names, got {names!r}")
        for n in names:
            if n not in set_names:
                raise ValueError(f"ood_groups[{g!r}] names {n!r}, which is not an OOD set; OOD sets: {list(set_names)}")
            if n in seen:
                raise ValueError(f"OOD set {n!r} is in two groups, {seen[n]!r} and {g!r}; each set belongs to one group")
            seen[n] = str(g)
        out[str(g)] = list(names)
    return out


def group_means(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                groups: Mapping[str, Sequence[str]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{score: {group: {metric: mean over the group's sets}}}`` of every numeric metric."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for score, per_set in results.items():
        out[score] = {}
        for g, names in groups.items():
            entries = [per_set[n] for n in names if n in per_set]
            if len(entries) != len(names):
                continue
            keys = [k for k, v in entries[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            out[score][g] = {k: float(np.mean([e[k] for e in entries])) for k in keys}
            out[score][g]["n_sets"] = len(entries)
    return out
