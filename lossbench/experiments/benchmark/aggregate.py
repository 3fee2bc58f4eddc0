"""Aggregation of finished cells: flat numbers per cell, mean and sample std over seeds."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ...framework.io import read_json
from .cells import cell_dir
from .schema import BenchConfig


#: Folder names too generic to name a set alone: the parent folder is kept (``tinyimagenet/test``).
GENERIC_FOLDERS = ("train", "test", "val", "valid", "validation", "images")


def set_label(name: str) -> str:
    """Short display name of an OOD set: ``imagefolder:<path>`` -> the folder's name (with its parent
    when the name is generic, e.g. ``tinyimagenet/test``)."""
    if name.lower().startswith("imagefolder:"):
        path = os.path.normpath(name.split(":", 1)[1])
        base = os.path.basename(path)
        if base.lower() in GENERIC_FOLDERS:
            return f"{os.path.basename(os.path.dirname(path))}/{base}"
        return base
    return name


def cell_values(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """Flat numbers of one cell's ``metrics.json``: acc, ece, p_at_1, map_at_r, ``acc_tta`` (with the
    run's test-time augmentation, when it has one); from its calibration
    block (when present) ``ece_ts`` (ECE after temperature scaling), ``adaptive_ece``, ``brier``,
    ``nll``, ``nll_ts``, ``temperature``; from its failure block (when present) ``aurc``, ``augrc``,
    ``eaurc`` of the MSP confidence and ``failure/<confidence>/<metric>`` of every confidence; and per
    score ``<score>/auroc``, ``<score>/fpr95`` (means over the OOD sets), ``<score>/<set>/auroc|fpr95``
    and, with OOD groups, ``<score>/group:<group>/auroc|fpr95`` (the group's mean)."""
    out = {"acc": metrics["test"]["acc"], "ece": metrics["test"]["ece"],
           "p_at_1": metrics["embedding"]["p_at_1"], "map_at_r": metrics["embedding"]["map_at_r"]}
    if "acc_tta" in metrics["test"]:  # the run's test-time augmentation (OOD scores never use it)
        out["acc_tta"] = metrics["test"]["acc_tta"]
    cal = metrics.get("calibration")
    if cal is not None:
        before, after = cal["before"], cal["after"]
        out.update(ece_ts=after["ece"], adaptive_ece=before["adaptive_ece"], brier=before["brier"],
                   nll=before["nll"], nll_ts=after["nll"], temperature=cal["temperature"])
    failure = metrics.get("failure")
    if failure is not None:
        for conf, m in failure["scores"].items():
            for key in ("aurc", "eaurc", "augrc", "risk_at_coverage", "coverage_at_risk"):
                out[f"failure/{conf}/{key}"] = float(m[key])
        if "msp" in failure["scores"]:
            msp = failure["scores"]["msp"]
            out.update(aurc=float(msp["aurc"]), augrc=float(msp["augrc"]), eaurc=float(msp["eaurc"]))
    for score, per_set in metrics["ood"]["results"].items():
        for key in ("auroc", "fpr95"):
            vals = [m[key] for m in per_set.values()]
            out[f"{score}/{key}"] = float(np.mean(vals))
            for set_name, m in per_set.items():
                out[f"{score}/{set_label(set_name)}/{key}"] = float(m[key])
    for score, per_group in (metrics["ood"].get("group_means") or {}).items():
        for group, m in per_group.items():
            for key in ("auroc", "fpr95"):
                out[f"{score}/group:{group}/{key}"] = float(m[key])
    return out


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def collect(cfg: BenchConfig) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """``{loss: {seed: metrics.json}}`` of the finished cells (those with a ``cell.json``)."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for loss in cfg.losses:
        for seed in cfg.seeds:
            d = cell_dir(cfg, loss, seed)
            if read_json(os.path.join(d, "cell.json")) is None:
                continue
            m = read_json(os.path.join(d, "metrics.json"))
            if m is not None:
                out.setdefault(loss, {})[seed] = m
    return out


def failures(cfg: BenchConfig) -> Dict[str, Dict[int, str]]:
    """``{loss: {seed: error}}`` of the cells whose training diverged (``failed.json``)."""
    out: Dict[str, Dict[int, str]] = {}
    for loss in cfg.losses:
        for seed in cfg.seeds:
            f = read_json(os.path.join(cell_dir(cfg, loss, seed), "failed.json"))
            if f is not None:
                out.setdefault(loss, {})[seed] = str(f.get("error", "diverged"))
    return out


def summarize(cells: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per loss: ``n`` seeds, ``seeds``, ``{metric: (mean, std)}`` over seeds for every cell value,
    ``values`` (``{seed: {metric: value}}``, the per-seed numbers behind the means),
    ``skipped`` (``{score: reason}`` of scores skipped in some seed) and ``chosen`` (``{score: [grid point
    chosen by the search, per seed]}``)."""
    rows: Dict[str, Dict[str, Any]] = {}
    for loss, per_seed in cells.items():
        by_seed = {seed: cell_values(per_seed[seed]) for seed in sorted(per_seed)}
        values = list(by_seed.values())
        keys = [k for k in values[0] if all(k in v for v in values)]
        skipped: Dict[str, str] = {}
        chosen: Dict[str, List[Dict[str, Any]]] = {}
        for seed in sorted(per_seed):
            ood = per_seed[seed]["ood"]
            for score, reason in (ood.get("skipped") or {}).items():
                skipped.setdefault(score, reason)
            for score, rec in (ood.get("search") or {}).items():
                chosen.setdefault(score, []).append(rec["chosen"])
        rows[loss] = {"n": len(values), "seeds": sorted(per_seed),
                      "stats": {k: mean_std([v[k] for v in values]) for k in keys},
                      "values": {seed: {k: v[k] for k in keys} for seed, v in by_seed.items()},
                      "skipped": skipped, "chosen": chosen}
    return rows
