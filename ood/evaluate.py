"""Score a model against several OOD sets with several scores and measure the separation."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .distributed import all_true, rank_share, shared_pass, world
from .metrics import CONVENTIONS, ood_metrics
from .registry import create_score, get_score_class
from .scores.base import OODScore, batches, eval_mode, model_device
from .search import check_groups, group_means, search_score
from .scores.feature_base import FeatureData, ScoreNotApplicable, collect_features, resolve_classifier


def _logits(model: nn.Module, loader: Iterable, what: str) -> Tensor:
    """``model(x)`` of every sample of ``loader`` (CPU), shared out over the ranks under ``torchrun``."""
    return shared_pass(lambda part: _local_logits(model, part, what), loader, what)


def _local_logits(model: nn.Module, loader: Iterable, what: str) -> Tensor:
    parts = []
    with eval_mode(model), torch.no_grad():
        for x, _ in batches(loader, model_device(model)):
            parts.append(model(x).detach().cpu())
    if not parts:
        raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
    return torch.cat(parts)


def _check_request(ood_loaders: Mapping[str, Iterable], scores: Sequence[str], convention: str,
                   score_kwargs: Mapping[str, Any], search: bool, val_loader: Optional[Iterable],
                   val_ood_loader: Optional[Iterable]) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(ood_loaders, Mapping) or not ood_loaders:
        raise ValueError("ood_loaders must be a non-empty dict {name: loader}")
    if isinstance(scores, str) or not scores:
        raise ValueError(f"scores must be a non-empty sequence of score names, got {scores!r}")
    unknown = sorted(set(score_kwargs) - set(scores))
    if unknown:
        raise ValueError(f"score_kwargs names scores not requested: {unknown}; requested {list(scores)}")
    if search and (val_loader is None or val_ood_loader is None):
        raise ValueError("search=True needs val_loader (ID validation data) and val_ood_loader (the validation "
                         "OOD set); the test sets are never used for the search")
    if val_ood_loader is not None and any(val_ood_loader is v for v in ood_loaders.values()):
        raise ValueError("val_ood_loader is also one of ood_loaders; the validation OOD set must not be a test set")


class FeaturePasses:
    """(features, logits, labels) per loader, computed once and reused by every score.

    ``cache`` (an :class:`ood.feature_cache.FeatureCache`, optional) keeps them on disk between
    evaluations; ``passes`` counts the loaders actually run through the model.
    """

    def __init__(self, model: nn.Module, cache: Optional[Any] = None):
        self.model, self.cache, self.passes = model, cache, 0
        self._memo: Dict[int, FeatureData] = {}

    def get(self, loader: Iterable, what: str) -> FeatureData:
        """The pass of ``loader``: memoised, else from the cache, else computed. Under ``torchrun``
        (:mod:`ood.distributed`) the ranks share the pass out and all get the whole result; they use
        the cache only when every rank finds it there, and rank 0 alone writes it."""
        key = id(loader)
        if key not in self._memo:
            data = self.cache.load(loader) if self.cache is not None else None
            shared = rank_share(loader) is not None
            if shared and self.cache is not None and not all_true(data is not None):
                data = None  # a pass shared out needs every rank in it
            if data is None:
                data = collect_features(self.model, loader, what)
                self.passes += 1
                if self.cache is not None and (not shared or world()[0] == 0):
                    self.cache.save(loader, data)
            self._memo[key] = data
        return self._memo[key]


def _fit_all(objs: Mapping[str, OODScore], model: nn.Module, fit_loader: Iterable, val_loader: Optional[Iterable],
             passes: FeaturePasses, skipped: Dict[str, str], bar) -> None:
    """Fit every score; feature scores from the shared training (and validation) pass."""
    feature_names = [n for n, s in objs.items() if s.needs == "features"]
    if feature_names:
        train = passes.get(fit_loader, "fit loader")
        classifier = resolve_classifier(model, train)
        wants_val = val_loader is not None and any(getattr(objs[n], "uses_val", False) for n in feature_names)
        val = passes.get(val_loader, "val loader") if wants_val else None
    for n, s in objs.items():
        if n in skipped:  # the search found no runnable grid point
            continue
        bar.set_postfix_str(f"fit {n}")
        try:
            if s.needs == "features":
                s.fit_data(train, classifier, val)
            else:
                s.fit(model, fit_loader, val_loader=val_loader)
        except ScoreNotApplicable as err:
            skipped[n] = str(err)
        bar.update()


def _search_all(names: Sequence[str], score_kwargs: Mapping[str, Mapping[str, Any]], model: nn.Module,
                fit_loader: Iterable, val_loader: Iterable, val_ood_loader: Iterable, passes: FeaturePasses,
                skipped: Dict[str, str], bar, memo: Dict[Any, Any]) -> Dict[str, Dict[str, Any]]:
    """:func:`ood.search.search_score` of every score with a grid, on (ID validation, validation OOD) only.

    The grid points share ``memo`` (:attr:`~ood.scores.base.OODScore.pass_memo`)."""
    cached: Dict[str, Any] = {}

    def train_and_classifier():
        if "train" not in cached:
            cached["train"] = passes.get(fit_loader, "fit loader")
            cached["classifier"] = resolve_classifier(model, cached["train"])
        return cached["train"], cached["classifier"]

    def evaluate_point(s: OODScore):
        s.pass_memo = memo
        if s.needs in ("features", "logits"):
            val = passes.get(val_loader, "val loader").float64()
            vood = passes.get(val_ood_loader, "validation OOD set").float64()
            if s.needs == "logits":
                return s.score_logits(val.logits), s.score_logits(vood.logits)
            train, classifier = train_and_classifier()
            s.fit_data(train, classifier, val)
            return s.score_features(val.features, val.logits), s.score_features(vood.features, vood.logits)
        s.fit(model, fit_loader, val_loader=val_loader)
        return s.evaluate(model, val_loader, {"val_ood": val_ood_loader})["val_ood"]

    out: Dict[str, Dict[str, Any]] = {}
    for n in names:
        bar.set_postfix_str(f"search {n}")
        try:
            record = search_score(n, score_kwargs.get(n, {}), evaluate_point)
        except ScoreNotApplicable as err:
            skipped[n] = str(err)
            continue
        if record is not None:
            out[n] = record
    return out


def evaluate_ood(model: nn.Module, fit_loader: Iterable, id_loader: Iterable,
                 ood_loaders: Mapping[str, Iterable], scores: Sequence[str] = ("msp", "energy"),
                 score_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 convention: str = "paper", val_loader: Optional[Iterable] = None,
                 progress: bool = False, feature_cache: Optional[Any] = None,
                 ood_groups: Optional[Mapping[str, Sequence[str]]] = None, val_ood_loader: Optional[Iterable] = None,
                 search: bool = False, feature_passes: Optional[FeaturePasses] = None) -> Dict[str, Any]:
    """Fit each score on ``fit_loader``, score ``id_loader`` and every OOD loader, and measure.

    One pass per loader (training, validation, ID test, each OOD set) collects (penultimate
    features, logits, labels) for every score with ``needs == 'features'`` (KNN, ViM, ReAct, ...)
    and every score with ``needs == 'logits'`` (MSP, energy, ...) together; the logits come from
    ``model.head.logits(features)`` when the model has a head. With logit scores only, the pass
    is ``model(x)`` alone. The others (ODIN, Mahalanobis) run their own passes through
    :meth:`~ood.scores.base.OODScore.evaluate` (a score with its own protocol, such as
    Mahalanobis' optimistic 'paper' protocol, defines it there). ``val_loader`` (in-distribution
    validation data) is handed to every ``fit``. ``feature_cache``
    (:class:`ood.feature_cache.FeatureCache`) keeps the passes on disk. A score that cannot run
    on this model or data (:class:`~ood.scores.feature_base.ScoreNotApplicable`, e.g. ViM on a
    non-linear head) is skipped: no results, its reason under ``'skipped'`` and in its ``info``.
    ``progress`` shows a tqdm bar over the scores. Under ``torchrun`` every rank calls this together and
    every per-loader pass is shared out over the ranks and gathered (:mod:`ood.distributed`), with
    the single-process result on every rank.

    OpenOOD's protocol (:mod:`ood.search`): ``ood_groups`` (``{'near': [...], 'far': [...]}``, names
    of ``ood_loaders``) adds each group's mean metrics; ``search=True`` chooses the grid point of every
    score with a ``GRID`` by AUROC of ``val_loader`` (ID validation) against ``val_ood_loader`` (the
    validation OOD set, never a test set) before anything touches ``id_loader`` or ``ood_loaders``.

    Returns ``{'convention', 'results': {score: {ood_set: metrics}}, 'scores': {score: {ood_set:
    {'id': array, 'ood': array}}}, 'info': {score: settings}, 'skipped': {score: reason},
    'feature_passes': loaders run for the shared pass, 'groups': {group: sets}, 'group_means':
    {score: {group: metrics}}, 'search': {score: {'chosen', 'val_auroc', 'grid'}}}``; higher =
    in-distribution. ``feature_passes`` (a :class:`FeaturePasses` of this model, instead of
    ``feature_cache``) shares passes the caller already ran, e.g. over the ID test split for accuracy.
    """
    if feature_passes is not None and feature_cache is not None:
        raise ValueError("give feature_cache or feature_passes (which holds its own cache), not both")
    if feature_passes is not None and feature_passes.model is not model:
        raise ValueError("feature_passes was built for another model")
    score_kwargs = dict(score_kwargs or {})
    _check_request(ood_loaders, scores, convention, score_kwargs, search, val_loader, val_ood_loader)
    groups = check_groups(ood_groups, list(ood_loaders))
    for n in scores:
        get_score_class(n)  # unknown names fail before any work
    from tqdm import tqdm

    bar = tqdm(total=(3 if search else 2) * len(scores), desc="OOD scores", disable=not progress, leave=False,
               dynamic_ncols=True)
    passes, skipped = feature_passes or FeaturePasses(model, feature_cache), {}
    memo: Dict[Any, Any] = {}  # model passes shared by the scores and grid points (NAC's states, ...)
    searched = _search_all(scores, score_kwargs, model, fit_loader, val_loader, val_ood_loader, passes, skipped,
                           bar, memo) if search else {}
    objs: Dict[str, OODScore] = {
        n: create_score(n, **dict(score_kwargs.get(n, {})), **(searched[n]["chosen"] if n in searched else {}))
        for n in scores}
    for s in objs.values():  # the chosen point's fit reuses the search's passes
        s.pass_memo = memo
    _fit_all(objs, model, fit_loader, val_loader, passes, skipped, bar)
    active = {n: s for n, s in objs.items() if n not in skipped}

    pairs = _shared_pass_scores(active, model, id_loader, ood_loaders, passes,
                                feature_cache is not None or feature_passes is not None, skipped, bar)
    for n, s in active.items():
        if n not in pairs and n not in skipped:
            bar.set_postfix_str(f"score {n}")
            pairs[n] = s.evaluate(model, id_loader, ood_loaders)
            bar.update()
    bar.close()
    for s in objs.values():
        s.pass_memo = None  # the states are not kept beyond this evaluation
    memo.clear()
    results, raw = _measure(objs, pairs, skipped, convention)
    info = {n: dict(s.info(), **({"skipped": skipped[n]} if n in skipped else {})) for n, s in objs.items()}
    for n, record in searched.items():
        info[n]["searched"] = record["chosen"]
    return {"convention": convention, "results": results, "scores": raw, "info": info,
            "skipped": dict(skipped), "feature_passes": passes.passes, "groups": groups,
            "group_means": group_means(results, groups), "search": searched}


def _shared_pass_scores(active: Mapping[str, OODScore], model: nn.Module, id_loader: Iterable,
                        ood_loaders: Mapping[str, Iterable], passes: "FeaturePasses", use_passes: bool,
                        skipped: Dict[str, str], bar) -> Dict[str, Dict[str, tuple]]:
    """``{score: {ood_set: (s_in, s_out)}}`` of the logit and feature scores, from one pass per loader."""
    pairs: Dict[str, Dict[str, tuple]] = {}
    shared = [n for n, s in active.items() if s.needs in ("logits", "features")]
    if not shared:
        return pairs
    if any(active[n].needs == "features" for n in shared) or use_passes:
        id_d = passes.get(id_loader, "id set")
        ood_d = {k: passes.get(v, f"{k} set") for k, v in ood_loaders.items()}
    else:
        id_d = FeatureData(None, _logits(model, id_loader, "id set"))
        ood_d = {k: FeatureData(None, _logits(model, v, f"{k} set")) for k, v in ood_loaders.items()}
    for n in shared:
        bar.set_postfix_str(f"score {n}")
        s = active[n]
        fn = s.score_logits if s.needs == "logits" else s.score_features
        args = (lambda d: (d.float64().logits,)) if s.needs == "logits" else (
            lambda d: (d.float64().features, d.float64().logits))
        try:
            s_in = fn(*args(id_d))
            pairs[n] = {k: (s_in, fn(*args(d))) for k, d in ood_d.items()}
        except ScoreNotApplicable as err:
            skipped[n] = str(err)
        bar.update()
    return pairs


def _measure(objs: Mapping[str, OODScore], pairs: Mapping[str, Mapping[str, tuple]], skipped: Mapping[str, str],
             convention: str):
    """Metrics and raw scores ``{score: {ood_set: ...}}`` of every score that ran."""
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    raw: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    for n in objs:
        if n in skipped:
            continue
        note = objs[n].result_note()
        results[n], raw[n] = {}, {}
        for set_name, (s_in, s_out) in pairs[n].items():
            s_in, s_out = np.asarray(s_in, dtype=np.float64), np.asarray(s_out, dtype=np.float64)
            raw[n][set_name] = {"id": s_in, "ood": s_out}
            results[n][set_name] = ood_metrics(s_in, s_out, convention)
            if note is not None:
                results[n][set_name]["protocol"] = note
    return results, raw
