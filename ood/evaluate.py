"""Score a model against several OOD sets with several scores and measure the separation."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .metrics import CONVENTIONS, ood_metrics
from .registry import create_score
from .scores.base import OODScore, batches, eval_mode, model_device


def _logits(model: nn.Module, loader: Iterable, what: str) -> Tensor:
    parts = []
    with eval_mode(model), torch.no_grad():
        for x, _ in batches(loader, model_device(model)):
            parts.append(model(x).detach().cpu())
    if not parts:
        raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
    return torch.cat(parts)


def _check_request(ood_loaders: Mapping[str, Iterable], scores: Sequence[str], convention: str,
                   score_kwargs: Mapping[str, Any]) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(ood_loaders, Mapping) or not ood_loaders:
        raise ValueError("ood_loaders must be a non-empty dict {name: loader}")
    if isinstance(scores, str) or not scores:
        raise ValueError(f"scores must be a non-empty sequence of score names, got {scores!r}")
    unknown = sorted(set(score_kwargs) - set(scores))
    if unknown:
        raise ValueError(f"score_kwargs names scores not requested: {unknown}; requested {list(scores)}")


def evaluate_ood(model: nn.Module, fit_loader: Iterable, id_loader: Iterable,
                 ood_loaders: Mapping[str, Iterable], scores: Sequence[str] = ("msp", "energy"),
                 score_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 convention: str = "paper", val_loader: Optional[Iterable] = None,
                 progress: bool = False) -> Dict[str, Any]:
    """Fit each score on ``fit_loader``, score ``id_loader`` and every OOD loader, and measure.

    The model runs once per loader for all scores with ``needs == 'logits'`` (MSP, energy,
    max-logit); the others (ODIN, Mahalanobis) run their own passes through
    :meth:`~ood.scores.base.OODScore.evaluate` (a score with its own protocol, such as
    Mahalanobis' optimistic 'paper' protocol, defines it there). ``val_loader``
    (in-distribution validation data) is handed to every ``fit``. ``progress`` shows a tqdm bar
    over the scores.

    Returns ``{'convention', 'results': {score: {ood_set: metrics}}, 'scores': {score: {ood_set:
    {'id': array, 'ood': array}}}, 'info': {score: settings}}``; higher = in-distribution.
    """
    score_kwargs = dict(score_kwargs or {})
    _check_request(ood_loaders, scores, convention, score_kwargs)
    objs: Dict[str, OODScore] = {n: create_score(n, **dict(score_kwargs.get(n, {}))) for n in scores}
    from tqdm import tqdm

    bar = tqdm(total=2 * len(objs), desc="OOD scores", disable=not progress, leave=False, dynamic_ncols=True)
    for n, s in objs.items():
        bar.set_postfix_str(f"fit {n}")
        s.fit(model, fit_loader, val_loader=val_loader)
        bar.update()

    pairs: Dict[str, Dict[str, tuple]] = {}
    logit_names = [n for n, s in objs.items() if s.needs == "logits"]
    if logit_names:
        id_logits = _logits(model, id_loader, "id set")
        ood_logits = {k: _logits(model, v, f"{k} set") for k, v in ood_loaders.items()}
        for n in logit_names:
            s_in = objs[n].score_logits(id_logits)
            pairs[n] = {k: (s_in, objs[n].score_logits(v)) for k, v in ood_logits.items()}
            bar.update()
    for n, s in objs.items():
        if n not in pairs:
            bar.set_postfix_str(f"score {n}")
            pairs[n] = s.evaluate(model, id_loader, ood_loaders)
            bar.update()
    bar.close()

    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    raw: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    for n in objs:
        note = objs[n].result_note()
        results[n], raw[n] = {}, {}
        for set_name, (s_in, s_out) in pairs[n].items():
            s_in, s_out = np.asarray(s_in, dtype=np.float64), np.asarray(s_out, dtype=np.float64)
            raw[n][set_name] = {"id": s_in, "ood": s_out}
            results[n][set_name] = ood_metrics(s_in, s_out, convention)
            if note is not None:
                results[n][set_name]["protocol"] = note
    info = {n: s.info() for n, s in objs.items()}
    return {"convention": convention, "results": results, "scores": raw, "info": info}
