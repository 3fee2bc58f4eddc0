"""Evaluate a trained model: accuracy, calibration and OOD detection, with its report files.

:func:`evaluate_model` takes a model and its data (so a caller that already holds them, like the
benchmark, builds nothing twice): top-1 accuracy and ECE (15 bins) on the test split, optionally
the embedding quality of the penultimate test features, and every requested OOD score on every
requested OOD set through :func:`ood.evaluate_ood`, and the calibration block (:func:`calibration_block`:
every metric of :mod:`ood.calibration` on the test split before and after temperature scaling
fitted on the validation split, and after the other calibrators), and the failure-detection block
(:func:`failure_block`: AURC, AUGRC, ... of four confidences on the test predictions).
:func:`evaluate_checkpoint` rebuilds a saved run first; :func:`write_report` writes ``metrics.json``,
``results.md``, ``roc.png``, ``hist.png``, ``reliability.png`` and ``risk_coverage.png``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

import torch

from ood import (
    MSP, Energy, FeatureCache, FeaturePasses, MaxLogit, create_score, evaluate_ood, failure_metrics, list_scores,
)
from ood.calibration import (
    HistogramBinning, IsotonicCalibration, MatrixScaling, TemperatureScaling, VectorScaling, calibration_metrics,
    reliability_bins,
)
from ood.distributed import shared_pass

from ..errors import UserInputError
from ..framework.builders import classification_metrics, load_run, make_loader, predict
from ..framework.data import DataBundle
from ..framework.ood_sets import check_ood_sets, get_ood_dataset
from ..framework.io import atomic_save_npz, atomic_write_json, atomic_write_text
from .embedding import embedding_quality
from .report import (
    calibration_markdown, failure_markdown, markdown_table, plot_histograms, plot_reliability, plot_risk_coverage,
    plot_roc,
)

DEFAULT_SYNTHETIC = ("gaussian", "uniform")
#: Scores evaluated when none are named: the classic five (``'all'`` asks for every registered score).
DEFAULT_SCORES = ("energy", "mahalanobis", "maxlogit", "msp", "odin")
#: Scores whose input pre-processing step is in pixel units (divided by the normalisation std).
PIXEL_STEP_SCORES = ("odin", "iodin", "mahalanobis")
#: The files :func:`write_report` writes (the plots only with ``plots=True``; the reliability diagram
#: and risk-coverage curves where the result has calibration / failure blocks).
REPORT_FILES = ("metrics.json", "results.md", "scores.npz", "roc.png", "hist.png", "reliability.png",
                "risk_coverage.png")


def resolve_scores(scores: Optional[Sequence[str]]) -> list:
    """``scores`` as a list: :data:`DEFAULT_SCORES` when empty, every registered score for ``['all']``."""
    if not scores:
        return list(DEFAULT_SCORES)
    if list(scores) == ["all"]:
        return list_scores()
    return list(scores)


def check_score_kwargs(scores: Sequence[str], score_kwargs: Any, what: str = "score_kwargs") -> None:
    """:class:`UserInputError` (named ``what``) unless ``score_kwargs`` maps requested scores to arguments
    each score accepts: every score is built once with its arguments (cheap; nothing is fitted), so
    an unknown name, an unknown key or a value the score rejects is reported before any work."""
    if score_kwargs is None:
        return
    if not isinstance(score_kwargs, Mapping):
        raise UserInputError(f"{what} must map score names to {{argument: value}} mappings, got {score_kwargs!r}")
    for name, kwargs in score_kwargs.items():
        if name not in scores:
            raise UserInputError(f"{what} names {name!r}, which is not among the scores evaluated: {list(scores)}")
        if not isinstance(kwargs, Mapping):
            raise UserInputError(f"{what}[{name!r}] must be a mapping of arguments, got {kwargs!r}")
        try:
            create_score(name, **kwargs)
        except UserInputError as err:
            raise UserInputError(f"{what}[{name!r}]: {err}") from None
        except (TypeError, ValueError) as err:  # the score's own check of a value
            raise UserInputError(f"{what}[{name!r}] = {dict(kwargs)}: {err}") from None


def default_ood_sets(has_heldout: bool) -> list:
    """``heldout`` (when the data has held-out classes), then Gaussian and uniform noise."""
    return (["heldout"] if has_heldout else []) + list(DEFAULT_SYNTHETIC)


#: The calibrators of the calibration block besides temperature scaling (name -> a fresh, unfitted one).
CALIBRATORS = {"vector": VectorScaling, "matrix_odir": MatrixScaling, "histogram": HistogramBinning,
               "isotonic": IsotonicCalibration}


def calibration_block(test_logits: torch.Tensor, test_labels: torch.Tensor, val_logits: torch.Tensor,
                      val_labels: torch.Tensor, n_bins: int = 15) -> Dict[str, Any]:
    """Calibration of the test logits before and after temperature scaling fitted on the validation logits.

    ``{'n_bins', 'temperature', 'temperature_at_bound', 'fit_split': 'val', 'n_fit', 'val_nll_before',
    'val_nll_after', 'before': {...}, 'after': {...}, 'reliability': {'before': bins, 'after': bins},
    'calibrators': {name: {...}}, 'calibrator_fit': {name: {...}}}``, the metric dicts being
    :func:`ood.calibration.calibration_metrics`. ``calibrators``: the test metrics after each of
    :data:`CALIBRATORS` (defaults; fitted on the validation split like the temperature);
    ``calibrator_fit``: what each fit chose (ODIR's lambda = mu, ...) and its validation NLL after.
    """
    ts = TemperatureScaling().fit(val_logits, val_labels)
    scaled = ts.transform(test_logits.double())
    calibrators, fits = {}, {}
    for name, make in CALIBRATORS.items():
        cal = make().fit(val_logits, val_labels)
        calibrators[name] = calibration_metrics(cal.transform(test_logits.double()), test_labels, n_bins)
        fit = {"val_nll_after": cal.nll_after}
        if isinstance(cal, MatrixScaling):
            fit.update(lam=cal.lam, mu=cal.mu, converged=cal.converged)
        elif isinstance(cal, VectorScaling):
            fit.update(converged=cal.converged)
        elif isinstance(cal, HistogramBinning):
            fit.update(n_bins=cal.n_bins)
        fits[name] = fit
    return {"n_bins": n_bins, "temperature": ts.temperature, "temperature_at_bound": ts.at_bound,
            "fit_split": "val", "n_fit": int(val_labels.numel()), "val_nll_before": ts.nll_before,
            "val_nll_after": ts.nll_after,
            "before": calibration_metrics(test_logits, test_labels, n_bins),
            "after": calibration_metrics(scaled, test_labels, n_bins),
            "reliability": {"before": reliability_bins(test_logits, test_labels, n_bins),
                            "after": reliability_bins(scaled, test_labels, n_bins)},
            "calibrators": calibrators, "calibrator_fit": fits}


def failure_block(test_logits: torch.Tensor, test_labels: torch.Tensor, temperature: float,
                  ties: str = "group") -> Dict[str, Any]:
    """Failure detection on the test split: how well each confidence ranks the wrong predictions last.

    correct = ``1[argmax = y]``; confidences (float64, higher = more trusted): ``msp`` (max softmax),
    ``energy`` (negative energy, ``logsumexp`` of the logits), ``maxlogit``, ``msp_ts`` (max softmax
    of ``logits / temperature``, the calibration block's temperature fitted on the validation split).
    Returns ``{'split': 'test', 'n', 'error_rate', 'ties', 'temperature', 'scores': {name:
    ood.failure_metrics(...)}, 'raw': {'correct': array, 'confidence': {name: array}}}``; ``raw``
    feeds the risk-coverage plot and is left out of ``metrics.json``.
    """
    z = test_logits.detach().double().cpu()
    correct = (z.argmax(dim=1) == test_labels.detach().cpu()).numpy()
    conf = {"msp": MSP(), "energy": Energy(), "maxlogit": MaxLogit(), "msp_ts": MSP(temperature=temperature)}
    conf = {name: score.score_logits(z).numpy() for name, score in conf.items()}
    return {"split": "test", "n": int(correct.size), "error_rate": float(1.0 - correct.mean()), "ties": ties,
            "temperature": float(temperature),
            "scores": {name: failure_metrics(c, correct, ties=ties) for name, c in conf.items()},
            "raw": {"correct": correct, "confidence": conf}}


def split_ood_sets(ood_sets: Union[None, Sequence[str], Mapping[str, Sequence[str]]],
                   has_heldout: bool) -> Tuple[List[str], Optional[Dict[str, List[str]]]]:
    """(flat list of OOD set names, groups or ``None``) from a list or a ``{group: [sets]}`` mapping."""
    if isinstance(ood_sets, Mapping):
        if not ood_sets:
            raise UserInputError("ood_sets must name at least one OOD set, got an empty mapping")
        groups = {}
        for g, names in ood_sets.items():
            if isinstance(names, str) or not isinstance(names, Sequence) or not names:
                raise UserInputError(f"ood_sets[{g!r}] must be a non-empty list of OOD set names, got {names!r}")
            groups[str(g)] = [str(n) for n in names]
        flat = [n for names in groups.values() for n in names]
    else:
        groups, flat = None, list(ood_sets) if ood_sets else default_ood_sets(has_heldout)
    dup = sorted({n for n in flat if flat.count(n) > 1})
    if dup:
        raise UserInputError(f"ood_sets names {dup} more than once; each OOD set is evaluated once (and in one group)")
    return flat, groups


def evaluate_model(model: nn.Module, bundle: DataBundle,
                   ood_sets: Union[None, Sequence[str], Mapping[str, Sequence[str]]] = None,
                   scores: Optional[Sequence[str]] = None,
                   score_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   convention: str = "paper", data_root: Optional[str] = None, seed: int = 0,
                   batch_size: int = 256, max_ood_samples: Optional[int] = 2000, n_noise: int = 1000,
                   embedding_distance: Optional[str] = None, progress: bool = False,
                   val_ood: Optional[str] = None, search: bool = False,
                   feature_cache_dir: Optional[str] = None, tta: int = 0) -> Dict[str, Any]:
    """Accuracy, ECE, (embedding quality) and OOD metrics of ``model`` on ``bundle`` (see module docstring).

    ``tta`` > 0 adds ``test.acc_tta`` (and its ECE and NLL), the accuracy of the logits averaged over
    that test-time augmentation level's views (:mod:`lossbench.framework.tta`); every other figure,
    OOD scores included, is of the model without TTA (OpenOOD's convention).

    ``ood_sets``: a list of OOD set names, or ``{group: [names]}`` (OpenOOD's near / far; each group's
    mean is reported too). ``val_ood``: the validation OOD set (never a test set) on which
    ``search=True`` chooses each score's grid point against the ID validation split
    (:mod:`ood.search`). ``feature_cache_dir``: keep the shared feature pass of every loader there
    (:class:`ood.FeatureCache`, keyed by the weights and the data), so a second evaluation of the
    same run does no forward pass for the feature and logit scores.
    OOD sets are drawn with ``seed`` (noise, subsets of large sets); ``embedding_distance``
    ('cosine' or 'euclidean') adds P@1 / MAP@R of the test features under ``'embedding'``.
    """
    scores = resolve_scores(scores)
    check_score_kwargs(scores, score_kwargs)
    ood_sets, groups = split_ood_sets(ood_sets, "heldout" in bundle.ood)
    if search and val_ood is None:
        raise UserInputError("search=True needs val_ood, the validation OOD set the grid search is run on")
    if val_ood is not None and val_ood in ood_sets:
        raise UserInputError(f"val_ood {val_ood!r} is also a test OOD set; the validation OOD set must be another set")
    check_ood_sets(list(ood_sets) + ([val_ood] if val_ood is not None else []), data_root, data=bundle.name,
                   has_heldout="heldout" in bundle.ood)  # before the forward passes
    cache = FeatureCache(feature_cache_dir, model) if feature_cache_dir else None
    passes = FeaturePasses(model, cache)  # one pass per loader, shared with (and cached for) the OOD scores
    test_loader, val_loader = make_loader(bundle.test, batch_size), make_loader(bundle.val, batch_size)
    test_d, val_d = passes.get(test_loader, "test split"), passes.get(val_loader, "validation split")
    logits, feats, labels = test_d.logits, test_d.features, test_d.labels
    test = dict(classification_metrics(logits, labels), n=int(labels.numel()))
    calibration = calibration_block(logits, labels, val_d.logits, val_d.labels)
    failure = failure_block(logits, labels, calibration["temperature"])
    if tta:
        device = next(model.parameters()).device  # under torchrun the ranks share the pass out, as the others
        tta_logits, tta_labels = shared_pass(lambda part: predict(model, part, device, tta=tta), test_loader,
                                             "test-time augmentation pass")
        m = classification_metrics(tta_logits, tta_labels)
        test.update(acc_tta=m["acc"], ece_tta=m["ece"], loss_tta=m["loss"], tta_level=int(tta))
    ood_loaders = {}
    for name in ood_sets:
        ds = get_ood_dataset(name, bundle, root=data_root, n_noise=n_noise, seed=seed, max_samples=max_ood_samples)
        ood_loaders[name] = make_loader(ds, batch_size)
    # Input pre-processing steps (ODIN, Mahalanobis) are in pixel units, as in the official code: divide
    # them by the normalisation std of the data, unless the caller set input_std.
    score_kwargs = {k: dict(v) for k, v in (score_kwargs or {}).items()}
    for name in scores:
        if name in PIXEL_STEP_SCORES:
            score_kwargs.setdefault(name, {}).setdefault("input_std", tuple(bundle.spec.std))
    val_ood_loader = None
    if val_ood is not None:
        val_ood_loader = make_loader(get_ood_dataset(val_ood, bundle, root=data_root, n_noise=n_noise, seed=seed,
                                                     max_samples=max_ood_samples), batch_size)
    ood = evaluate_ood(model, make_loader(bundle.train_eval, batch_size), test_loader, ood_loaders, scores=scores,
                       score_kwargs=score_kwargs, convention=convention, val_loader=val_loader, progress=progress,
                       ood_groups=groups, val_ood_loader=val_ood_loader, search=search, feature_passes=passes)
    result: Dict[str, Any] = {"test": test, "ood_sets": {k: len(v.dataset) for k, v in ood_loaders.items()},
                              "ood": ood, "calibration": calibration}
    result["failure"] = failure
    if val_ood_loader is not None:
        result["val_ood"] = {"name": val_ood, "n": len(val_ood_loader.dataset), "search": bool(search)}
    if embedding_distance is not None:
        result["embedding"] = dict(embedding_quality(feats, labels, embedding_distance),
                                   distance=embedding_distance, n=int(labels.numel()), dim=int(feats.shape[1]))
    return result


def evaluate_checkpoint(checkpoint: str, ood_sets: Union[None, Sequence[str], Mapping[str, Sequence[str]]] = None,
                        scores: Optional[Sequence[str]] = None,
                        score_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                        convention: str = "paper", data_root: Optional[str] = None,
                        batch_size: int = 256, device: str = "auto",
                        max_ood_samples: Optional[int] = 2000, n_noise: int = 1000,
                        embedding_distance: Optional[str] = None, progress: bool = False,
                        val_ood: Optional[str] = None, search: bool = False,
                        feature_cache_dir: Optional[str] = None, tta: Optional[int] = None) -> Dict[str, Any]:
    """:func:`evaluate_model` on the run saved in ``checkpoint`` (its model, data and seed); ``tta``
    ``None``: the run's own ``tta`` setting."""
    model, args, bundle, state = load_run(checkpoint, device)
    result = evaluate_model(model, bundle, ood_sets, scores, score_kwargs, convention,
                            data_root if data_root is not None else args.data_root, args.seed, batch_size,
                            max_ood_samples, n_noise, embedding_distance, progress, val_ood=val_ood,
                            search=search, feature_cache_dir=feature_cache_dir,
                            tta=int(getattr(args, "tta", 0)) if tta is None else int(tta))
    head = {"checkpoint": os.path.abspath(checkpoint), "epoch": int(state["epoch"]), "config": state["config"]}
    return {**head, **result}


def report_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown summary of one evaluation: classification line, OOD sets, the OOD tables."""
    t = result["test"]
    head = (f"Classification on the test split ({t['n']} images): top-1 accuracy {100 * t['acc']:.2f} %, "
            f"ECE (15 bins) {100 * t['ece']:.2f} %, NLL {t['loss']:.4f}."
            + (f" With test-time augmentation (level {t['tta_level']}): accuracy {100 * t['acc_tta']:.2f} %, "
               f"ECE {100 * t['ece_tta']:.2f} % (OOD scores below: without it)." if "acc_tta" in t else "")
            + "\n\n"
            f"OOD sets: " + ", ".join(f"{k} ({n})" for k, n in result["ood_sets"].items()) + ".\n\n")
    text = head + markdown_table(result["ood"])
    if "calibration" in result:
        text += "\n" + calibration_markdown(result["calibration"])
    if "failure" in result:
        text += "\n" + failure_markdown(result["failure"])
    return text


def save_scores(path: str, raw: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    """The raw per-sample scores ``{score: {set: {'id': array, 'ood': array}}}`` as one compressed npz
    with keys ``"<score>|<set>|<side>"`` (read back with :func:`load_scores`)."""
    import numpy as np

    arrays = {f"{score}|{name}|{side}": np.asarray(v, dtype=np.float64) for score, sets in raw.items()
              for name, sides in sets.items() for side, v in sides.items()}
    atomic_save_npz(path, arrays)


def load_scores(path: str) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """``scores.npz`` back as ``{score: {set: {'id': array, 'ood': array}}}``."""
    import numpy as np

    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    with np.load(path) as z:
        for key in z.files:
            score, set_name, side = key.split("|")
            out.setdefault(score, {}).setdefault(set_name, {})[side] = z[key]
    return out


def write_report(result: Mapping[str, Any], out_dir: str, plots: bool = True) -> str:
    """Write ``metrics.json`` (without raw scores), ``results.md`` and (``plots``) ``roc.png``, ``hist.png``,
    ``reliability.png``, ``risk_coverage.png``.

    Also ``scores.npz``: the per-sample scores behind every OOD metric, one array per
    ``"<score>|<set>|id"`` / ``"<score>|<set>|ood"`` (compressed; the same arrays the metrics were
    computed from). ``metrics.json`` is strict JSON (undefined numbers are ``null``), holds paths
    relative to ``out_dir`` and a ``provenance`` block (library version and commit, torch, device, date).
    Every file is written atomically and honours the umask. Returns the Markdown text.
    """
    from .provenance import provenance

    ood = result["ood"]
    metrics = {k: v for k, v in result.items() if k != "ood"}
    metrics["ood"] = {k: v for k, v in ood.items() if k != "scores"}
    if "failure" in result:
        metrics["failure"] = {k: v for k, v in result["failure"].items() if k != "raw"}
    if isinstance(metrics.get("checkpoint"), str):
        metrics["checkpoint"] = os.path.relpath(os.path.abspath(metrics["checkpoint"]), os.path.abspath(out_dir))
    metrics["provenance"] = provenance()
    metrics["files"] = {"per_sample_scores": "scores.npz"}
    save_scores(os.path.join(out_dir, "scores.npz"), ood.get("scores", {}))
    atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
    text = report_markdown(result)
    atomic_write_text(os.path.join(out_dir, "results.md"), text)
    if plots:
        plot_roc(ood, os.path.join(out_dir, "roc.png"))
        plot_histograms(ood, os.path.join(out_dir, "hist.png"))
        if "calibration" in result:
            plot_reliability(result["calibration"], os.path.join(out_dir, "reliability.png"))
        if "failure" in result:
            plot_risk_coverage(result["failure"], os.path.join(out_dir, "risk_coverage.png"))
    return text
