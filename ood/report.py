"""Reports of an OOD evaluation: a Markdown table, ROC curves and score histograms (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

CONVENTION_NOTES = {
    "paper": "seed papers' convention: ID positive; FPR@95 = share of OOD accepted at the ROC point "
             "nearest to 95% of ID kept; AUPR = average precision",
    "openood": "OpenOOD / pytorch-ood convention: OOD positive; FPR@95 = share of ID flagged at the "
               "first ROC point catching >= 95% of OOD; AUPR by the trapezoid rule",
}


def _results_of(results: Mapping[str, Any]) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
    return results["results"] if "results" in results and "convention" in results else results


def write_markdown(results: Mapping[str, Any], path: str, convention: Optional[str] = None) -> str:
    """Write one table (rows: score, columns: OOD set, cells AUROC / FPR@95 in %) to ``path``.

    ``results``: ``evaluate_ood``'s output or its ``'results'`` entry. The caption states the
    metric convention. A second, long table lists every metric. Returns the Markdown text.
    """
    if convention is None:
        convention = results.get("convention") if "convention" in results else None
    if convention not in CONVENTION_NOTES:
        raise ValueError(f"convention must be one of {sorted(CONVENTION_NOTES)}, got {convention!r}")
    table = _results_of(results)
    if not table:
        raise ValueError("results is empty; nothing to report")
    sets = []
    for per_set in table.values():
        sets += [s for s in per_set if s not in sets]
    lines = [f"Table: AUROC / FPR@95 (%), higher AUROC and lower FPR@95 are better. "
             f"Convention `{convention}` ({CONVENTION_NOTES[convention]}).", ""]
    lines.append("| score | " + " | ".join(sets) + " | mean |")
    lines.append("|---|" + "---|" * (len(sets) + 1))
    for score, per_set in table.items():
        cells, au, fp = [], [], []
        for s in sets:
            m = per_set.get(s)
            if m is None:
                cells.append("-")
                continue
            au.append(m["auroc"])
            fp.append(m["fpr95"])
            cells.append(f"{100 * m['auroc']:.2f} / {100 * m['fpr95']:.2f}")
        mean = f"{100 * np.mean(au):.2f} / {100 * np.mean(fp):.2f}" if au else "-"
        lines.append(f"| {score} | " + " | ".join(cells) + f" | {mean} |")
    lines += ["", f"All metrics (%), convention `{convention}`:", "",
              "| score | OOD set | AUROC | AUPR-In | AUPR-Out | FPR@95 | detection error |",
              "|---|---|---|---|---|---|---|"]
    for score, per_set in table.items():
        for s, m in per_set.items():
            lines.append(f"| {score} | {s} | " + " | ".join(
                f"{100 * m[k]:.2f}" for k in ("auroc", "aupr_in", "aupr_out", "fpr95", "detection_error")) + " |")
    text = "\n".join(lines) + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return text


def _per_score(scores: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    if "scores" in scores and "convention" in scores:
        scores = scores["scores"]
    if "id" in scores:  # a single score's {'id': ..., ood: ...}
        return {"score": scores}
    if not scores:
        raise ValueError("scores is empty; nothing to plot")
    return dict(scores)


def _id_for(entry: Mapping[str, Any], ood_set: str) -> np.ndarray:
    ids = entry["id"]
    return np.asarray(ids[ood_set] if isinstance(ids, Mapping) else ids, dtype=np.float64)


def _grid(n: int):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.5 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def plot_roc(scores: Mapping[str, Any], path: str) -> None:
    """ROC curves (ID kept vs OOD accepted; ID positive), one panel per score, one line per OOD set.

    ``scores``: ``evaluate_ood``'s output, its ``'scores'`` entry, or one score's
    ``{'id': array, ood_set: array}``.
    """
    per = _per_score(scores)
    fig, axes = _grid(len(per))
    for ax, (name, entry) in zip(axes, per.items()):
        for ood_set, s_out in entry.items():
            if ood_set == "id":
                continue
            s_in = _id_for(entry, ood_set)
            s_out = np.asarray(s_out, dtype=np.float64)
            y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
            fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out])
            ax.plot(fpr, tpr, label=ood_set)
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        ax.axhline(0.95, color="0.7", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("OOD accepted (FPR)")
        ax.set_ylabel("ID kept (TPR)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_histograms(scores: Mapping[str, Any], path: str, bins: int = 50) -> None:
    """Score histograms (densities), one panel per score, ID against each OOD set.

    The x-range is the central 99% of the panel's scores; values beyond it fall in the end bins.
    """
    per = _per_score(scores)
    fig, axes = _grid(len(per))
    for ax, (name, entry) in zip(axes, per.items()):
        ids = entry["id"]
        arrays = {}
        if isinstance(ids, Mapping):
            for k, v in ids.items():
                arrays[f"id ({k})"] = np.asarray(v, dtype=np.float64)
        else:
            arrays["id"] = np.asarray(ids, dtype=np.float64)
        arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in entry.items() if k != "id"})
        # range: the central 99% of all scores, so one far-out set does not flatten the rest
        allv = np.concatenate(list(arrays.values()))
        lo, hi = (float(v) for v in np.percentile(allv, [0.5, 99.5]))
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for label, a in arrays.items():
            ax.hist(np.clip(a, edges[0], edges[-1]), bins=edges, density=True, alpha=0.45, label=label,
                    histtype="stepfilled" if label.startswith("id") else "step", linewidth=1.2)
        ax.set_title(f"{name} (higher = in-distribution)")
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
