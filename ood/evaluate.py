"""Score a model against several OOD sets with several scores and measure the separation."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .metrics import CONVENTIONS, ood_metrics
from .registry import create_score
from .scores.base import LogitScore, batches, eval_mode, model_device
from .scores.mahalanobis import Mahalanobis


def _logits(model: nn.Module, loader: Iterable, what: str) -> Tensor:
    parts = []
    with eval_mode(model), torch.no_grad():
        for x, _ in batches(loader, model_device(model)):
            parts.append(model(x).detach().cpu())
    if not parts:
        raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
    return torch.cat(parts)


def _uses_logits_only(score) -> bool:
    return isinstance(score, LogitScore) and type(score).score is LogitScore.score


def evaluate_ood(model: nn.Module, fit_loader: Iterable, id_loader: Iterable,
                 ood_loaders: Mapping[str, Iterable], scores: Sequence[str] = ("msp", "energy"),
                 score_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 convention: str = "paper", val_loader: Optional[Iterable] = None) -> Dict[str, Any]:
    """Fit each score on ``fit_loader``, score ``id_loader`` and every OOD loader, and measure.

    The model runs once per loader for all logit-only scores (MSP, energy, max-logit); ODIN and
    Mahalanobis run their own passes (they differentiate through the input). ``val_loader``
    (in-distribution validation data) is handed to scores that use it (Mahalanobis'
    'validation' protocol). A Mahalanobis score with ``protocol='paper'`` is fitted per OOD set
    on part of the test sets themselves (optimistic; see :mod:`ood.scores.mahalanobis`) and its
    metrics use the remaining samples; its raw ``'id'`` entry is then ``{ood_set: array}``.

    Returns ``{'convention', 'results': {score: {ood_set: metrics}}, 'scores': {score: {'id':
    array, ood_set: array}}, 'info': {score: fitted settings}}``; higher = in-distribution.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(ood_loaders, Mapping) or not ood_loaders:
        raise ValueError("ood_loaders must be a non-empty dict {name: loader}")
    if "id" in ood_loaders:
        raise ValueError("'id' is reserved for the in-distribution set; rename that OOD set")
    if isinstance(scores, str) or not scores:
        raise ValueError(f"scores must be a non-empty sequence of score names, got {scores!r}")
    score_kwargs = dict(score_kwargs or {})
    unknown = sorted(set(score_kwargs) - set(scores))
    if unknown:
        raise ValueError(f"score_kwargs names scores not requested: {unknown}; requested {list(scores)}")
    objs = {name: create_score(name, **dict(score_kwargs.get(name, {}))) for name in scores}

    info: Dict[str, Dict[str, Any]] = {}
    for name, s in objs.items():
        if isinstance(s, Mahalanobis):
            s.fit(model, fit_loader, val_loader=val_loader)
            info[name] = {"protocol": s.protocol_, "layers": list(s.layer_names_),
                          "covariance": list(s.covariances_), "eps": s.eps_}
        else:
            s.fit(model, fit_loader)
            info[name] = {k: v for k, v in vars(s).items() if not k.endswith("_")}

    logit_names = [n for n, s in objs.items() if _uses_logits_only(s)]
    paper_names = [n for n, s in objs.items() if isinstance(s, Mahalanobis) and s.protocol_ == "paper"]
    other_names = [n for n in objs if n not in logit_names and n not in paper_names]

    raw: Dict[str, Dict[str, Any]] = {n: {} for n in objs}
    sets = [("id", id_loader)] + list(ood_loaders.items())
    for set_name, loader in sets:
        if logit_names:
            logits = _logits(model, loader, f"{set_name} set")
            for n in logit_names:
                raw[n][set_name] = objs[n].score_logits(logits).numpy()
        for n in other_names:
            raw[n][set_name] = objs[n].score(model, loader).numpy()

    results: Dict[str, Dict[str, Dict[str, Any]]] = {n: {} for n in objs}
    for n in logit_names + other_names:
        for set_name, _ in sets[1:]:
            results[n][set_name] = ood_metrics(raw[n]["id"], raw[n][set_name], convention)

    for n in paper_names:
        s = objs[n]
        grid = s.paper_grid()
        id_grid = s.layer_scores(model, id_loader, grid)
        raw[n]["id"] = {}
        info[n]["eps"] = {}
        for set_name, loader in sets[1:]:
            s_in, s_out = s.fit_paper_scores(id_grid, s.layer_scores(model, loader, grid))
            raw[n]["id"][set_name] = s_in.numpy()
            raw[n][set_name] = s_out.numpy()
            info[n]["eps"][set_name] = s.eps_
            results[n][set_name] = ood_metrics(s_in, s_out, convention)
            results[n][set_name]["protocol"] = "paper (optimistic: fitted on the test OOD set)"
    return {"convention": convention, "results": results, "scores": raw, "info": info}
