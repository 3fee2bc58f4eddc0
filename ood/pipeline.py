"""Evaluate a saved lossbench run: accuracy, calibration and OOD detection, with its report files.

``evaluate_checkpoint`` rebuilds the model and data from the checkpoint, measures top-1 accuracy and
ECE (15 bins) on the test split, scores every requested OOD set with every requested score through
:func:`ood.evaluate.evaluate_ood`, and :func:`write_report` writes ``metrics.json``, ``results.md``,
``roc.png`` and ``hist.png``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from lossbench.checkpoint import atomic_write_text
from lossbench.data import get_ood_dataset
from lossbench.engine import classification_metrics, load_run, make_loader, predict

from .evaluate import evaluate_ood
from .registry import list_scores
from .report import plot_histograms, plot_roc, write_markdown

DEFAULT_SYNTHETIC = ("gaussian", "uniform")


def default_ood_sets(has_heldout: bool) -> list:
    return (["heldout"] if has_heldout else []) + list(DEFAULT_SYNTHETIC)


def evaluate_checkpoint(checkpoint: str, ood_sets: Optional[Sequence[str]] = None,
                        scores: Optional[Sequence[str]] = None,
                        score_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                        convention: str = "paper", data_root: Optional[str] = None,
                        batch_size: int = 256, device: str = "auto",
                        max_ood_samples: Optional[int] = 2000, n_noise: int = 1000) -> Dict[str, Any]:
    """Accuracy, ECE and OOD metrics of the run saved in ``checkpoint`` (see module docstring)."""
    model, args, bundle, state = load_run(checkpoint, device)
    if data_root is not None:
        args.data_root = data_root
    scores = list(scores) if scores else list_scores()
    ood_sets = list(ood_sets) if ood_sets else default_ood_sets("heldout" in bundle.ood)
    dev = next(model.parameters()).device
    test_loader = make_loader(bundle.test, batch_size)
    logits, labels = predict(model, test_loader, dev)
    test = classification_metrics(logits, labels)
    test["n"] = int(labels.numel())
    ood_loaders = {}
    for name in ood_sets:
        ds = get_ood_dataset(name, bundle, root=args.data_root, n_noise=n_noise, seed=args.seed,
                             max_samples=max_ood_samples)
        ood_loaders[name] = make_loader(ds, batch_size)
    # Input pre-processing steps (ODIN, Mahalanobis) are in pixel units, as in the official code: divide
    # them by the normalisation std of the data, unless the caller set input_std.
    score_kwargs = {k: dict(v) for k, v in (score_kwargs or {}).items()}
    for name in scores:
        if name in ("odin", "mahalanobis"):
            score_kwargs.setdefault(name, {}).setdefault("input_std", tuple(bundle.spec.std))
    fit_loader = make_loader(bundle.train, batch_size)
    val_loader = make_loader(bundle.val, batch_size)
    ood = evaluate_ood(model, fit_loader, test_loader, ood_loaders, scores=scores,
                       score_kwargs=score_kwargs, convention=convention, val_loader=val_loader)
    return {
        "checkpoint": os.path.abspath(checkpoint), "epoch": int(state["epoch"]),
        "config": state["config"], "test": test,
        "ood_sets": {k: len(v.dataset) for k, v in ood_loaders.items()},
        "ood": ood,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def write_report(result: Mapping[str, Any], out_dir: str) -> str:
    """Write ``metrics.json`` (without raw scores), ``results.md``, ``roc.png``, ``hist.png``; return the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    ood = result["ood"]
    metrics = {k: v for k, v in result.items() if k != "ood"}
    metrics["ood"] = {k: v for k, v in ood.items() if k != "scores"}
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(_jsonable(metrics), indent=2))
    t = result["test"]
    head = (f"Classification on the test split ({t['n']} images): top-1 accuracy {100 * t['acc']:.2f} %, "
            f"ECE (15 bins) {100 * t['ece']:.2f} %, NLL {t['loss']:.4f}.\n\n"
            f"OOD sets: " + ", ".join(f"{k} ({n})" for k, n in result["ood_sets"].items()) + ".\n\n")
    md_path = os.path.join(out_dir, "results.md")
    table = write_markdown(ood, md_path)
    text = head + table
    atomic_write_text(md_path, text)
    plot_roc(ood, os.path.join(out_dir, "roc.png"))
    plot_histograms(ood, os.path.join(out_dir, "hist.png"))
    return text
