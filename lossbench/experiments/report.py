"""Reports of an evaluation: OOD tables, ROC curves, score histograms, the calibration table, the
reliability diagram, the failure-detection table and the risk-coverage curves (matplotlib, Agg).

Raw scores have one shape everywhere: ``{score: {ood_set: {'id': array, 'ood': array}}}`` (the
``'scores'`` entry of :func:`ood.evaluate_ood`). Figures are written atomically.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ..framework.io import atomic_save_figure

CONVENTION_NOTES = {
    "paper": "seed papers' convention: ID positive; FPR@95 = share of OOD accepted at the ROC point "
             "nearest to 95% of ID kept; AUPR = average precision",
    "openood": "OpenOOD (code since Aug 2023, after its v1.5 tag) convention: OOD positive; "
               "FPR@95 = share of ID flagged at the first point of sklearn's roc_curve catching >= 95% of OOD; "
               "AUPR by the trapezoid rule",
    "openood_v1.5": "OpenOOD v1.5 tag convention: ID positive; FPR@95 = share of OOD accepted at the first "
                    "point of sklearn's roc_curve keeping >= 95% of ID; AUPR by the trapezoid rule",
}


def _results_of(results: Mapping[str, Any]) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
    return results["results"] if "results" in results and "convention" in results else results


def markdown_table(results: Mapping[str, Any], convention: Optional[str] = None) -> str:
    """One table (rows: score, columns: OOD set, cells AUROC / FPR@95 in %) and a long table of every metric.

    ``results``: ``evaluate_ood``'s output or its ``'results'`` entry. The caption states the
    metric convention.
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
    full = results if "results" in results and "convention" in results else {}
    groups = dict(full.get("groups") or {})
    group_means = full.get("group_means") or {}
    lines = [f"Table: AUROC / FPR@95 (%), higher AUROC and lower FPR@95 are better. "
             f"Convention `{convention}` ({CONVENTION_NOTES[convention]})."
             + ("" if not groups else " Group columns: the mean over the group's sets ("
                + "; ".join(f"{g}: {', '.join(v)}" for g, v in groups.items()) + ")."), ""]
    group_cols = [f"{g} mean" for g in groups]
    lines.append("| score | " + " | ".join(sets + group_cols) + " | mean |")
    lines.append("|---|" + "---|" * (len(sets) + len(group_cols) + 1))
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
        for g in groups:
            m = group_means.get(score, {}).get(g)
            cells.append("-" if m is None else f"{100 * m['auroc']:.2f} / {100 * m['fpr95']:.2f}")
        mean = f"{100 * np.mean(au):.2f} / {100 * np.mean(fp):.2f}" if au else "-"
        lines.append(f"| {score} | " + " | ".join(cells) + f" | {mean} |")
    for score, reason in (full.get("skipped") or {}).items():
        lines.append(f"| {score} | skipped: {reason} |" + " |" * (len(sets) + len(group_cols)))
    searched = full.get("search") or {}
    if searched:
        lines += ["", "Hyper-parameters chosen by the grid search (AUROC of ID validation vs the validation OOD "
                  "set; the test sets are not used):", "", "| score | chosen | validation AUROC | grid points |",
                  "|---|---|---|---|"]
        for score, rec in searched.items():
            chosen = ", ".join(f"{k}={v}" for k, v in rec["chosen"].items())
            lines.append(f"| {score} | {chosen} | {100 * rec['val_auroc']:.2f} | {len(rec['grid'])} |")
    lines += ["", f"All metrics (%), convention `{convention}`:", "",
              "| score | OOD set | AUROC | AUPR-In | AUPR-Out | FPR@95 | detection error |",
              "|---|---|---|---|---|---|---|"]
    for score, per_set in table.items():
        for s, m in per_set.items():
            lines.append(f"| {score} | {s} | " + " | ".join(
                f"{100 * m[k]:.2f}" for k in ("auroc", "aupr_in", "aupr_out", "fpr95", "detection_error")) + " |")
    return "\n".join(lines) + "\n"


def _per_score(scores: Mapping[str, Any]) -> Dict[str, Mapping[str, Mapping[str, Any]]]:
    if "scores" in scores and "convention" in scores:
        scores = scores["scores"]
    if not scores:
        raise ValueError("scores is empty; nothing to plot")
    return dict(scores)


def new_figure(n_panels: int, cols: int = 3, size=(4.5, 3.6)):
    """A figure (Agg canvas) with ``n_panels`` axes on a grid of at most ``cols`` columns."""
    cols = min(n_panels, cols)
    rows = (n_panels + cols - 1) // cols
    fig = Figure(figsize=(size[0] * cols, size[1] * rows))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]


def draw_roc(ax, s_in, s_out, label: str, color=None, linewidth: float = 1.5) -> None:
    """One ROC curve (ID positive: ID kept vs OOD accepted) of ID scores ``s_in`` vs OOD scores ``s_out``."""
    s_in, s_out = np.asarray(s_in, dtype=np.float64), np.asarray(s_out, dtype=np.float64)
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out])
    ax.plot(fpr, tpr, label=label, color=color, linewidth=linewidth)


def style_roc_axes(ax, title: str, fontsize: Optional[float] = None) -> None:
    """Chance diagonal, the 95 % TPR line, title and axis labels of a ROC panel."""
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax.axhline(0.95, color="0.7", linewidth=0.8)
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("OOD accepted (FPR)", fontsize=fontsize)
    ax.set_ylabel("ID kept (TPR)", fontsize=fontsize)


def plot_roc(scores: Mapping[str, Any], path: str) -> None:
    """ROC curves, one panel per score, one line per OOD set (``evaluate_ood``'s output or its ``'scores'``)."""
    per = _per_score(scores)
    fig, axes = new_figure(len(per))
    for ax, (name, entry) in zip(axes, per.items()):
        for ood_set, pair in entry.items():
            draw_roc(ax, pair["id"], pair["ood"], ood_set)
        style_roc_axes(ax, name)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_save_figure(fig, path)


def plot_histograms(scores: Mapping[str, Any], path: str, bins: int = 50) -> None:
    """Score histograms (densities), one panel per score, ID against each OOD set.

    The x-range is the central 99% of the panel's scores; values beyond it fall in the end bins. When
    a score's ID scores differ per OOD set (an optimistic per-set protocol) each ID set is drawn.
    """
    per = _per_score(scores)
    fig, axes = new_figure(len(per))
    for ax, (name, entry) in zip(axes, per.items()):
        pairs = list(entry.items())
        shared_id = all(np.array_equal(p["id"], pairs[0][1]["id"]) for _, p in pairs)
        arrays: Dict[str, np.ndarray] = {}
        if shared_id:
            arrays["id"] = np.asarray(pairs[0][1]["id"], dtype=np.float64)
        else:
            arrays.update({f"id ({k})": np.asarray(p["id"], dtype=np.float64) for k, p in pairs})
        arrays.update({k: np.asarray(p["ood"], dtype=np.float64) for k, p in pairs})
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
    atomic_save_figure(fig, path)


CALIBRATION_ROWS = (("acc", "top-1 accuracy (%)", 100), ("ece", "ECE, equal-width (%)", 100),
                    ("adaptive_ece", "adaptive ECE, equal-mass (%)", 100),
                    ("classwise_ece", "classwise ECE (%)", 100), ("mce", "MCE (%)", 100),
                    ("brier", "Brier score", 1), ("nll", "NLL", 1))


#: Column titles of the calibrators besides temperature scaling (``calibration_block``'s ``calibrators``).
CALIBRATOR_LABELS = {"vector": "vector scaling", "matrix_odir": "matrix scaling (ODIR)",
                     "histogram": "histogram binning", "isotonic": "isotonic"}


def calibration_markdown(cal: Mapping[str, Any]) -> str:
    """The calibration block: every metric before and after temperature scaling (see ``calibration_block``),
    and after each other calibrator when the block has them."""
    bound = " (at the search bound)" if cal.get("temperature_at_bound") else ""
    others = list(cal.get("calibrators") or {})
    lines = [f"Calibration on the test split ({cal['before']['n']} images, {cal['n_bins']} bins), before and after "
             f"temperature scaling with T = {cal['temperature']:.4g}{bound} fitted on the validation split "
             f"({cal['n_fit']} images; NLL there {cal['val_nll_before']:.4f} -> {cal['val_nll_after']:.4f}). "
             f"Reliability diagram: reliability.png.", "",
             "| metric | before | after TS |" + "".join(f" {CALIBRATOR_LABELS.get(n, n)} |" for n in others),
             "|---|---|---|" + "---|" * len(others)]
    for key, label, mult in CALIBRATION_ROWS:
        vals = [cal["before"][key], cal["after"][key]] + [cal["calibrators"][n][key] for n in others]
        cells = [f"{mult * v:.2f}" if mult == 100 else f"{v:.4f}" for v in vals]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if others:
        fit = cal.get("calibrator_fit") or {}
        odir = fit.get("matrix_odir", {})
        lines += ["", "The other calibrators are fitted on the same validation split: vector scaling (Guo et al. "
                  "2017, a scale and a bias per class), matrix scaling with off-diagonal and intercept "
                  "regularisation (Kull et al. 2019"
                  + (f"; lambda = mu = {odir['lam']:g} chosen by 5-fold cross-validation" if "lam" in odir else "")
                  + "), histogram binning (15 equal-width bins) and isotonic regression, both one-vs-rest "
                  "per class and renormalised (Zadrozny & Elkan 2001 / 2002); binning and isotonic maps can "
                  "change the argmax, hence the accuracy."]
    return "\n".join(lines) + "\n"


#: Legend labels of the reliability diagram's bars (tests read them back from the figure).
RELIABILITY_LABELS = {"accuracy": "accuracy", "over": "gap: confidence > accuracy (over-confident)",
                      "under": "gap: accuracy > confidence (under-confident)"}


def draw_reliability(ax, bins: Mapping[str, Any]) -> None:
    """One reliability diagram on ``ax`` from :func:`ood.calibration.reliability_bins` data.

    Per non-empty bin: an opaque accuracy bar from 0 to the bin's accuracy, and the gap to the
    bin's mean confidence as a narrower opaque bar from ``min(acc, conf)`` to ``max(acc, conf)``,
    red where the bin is over-confident and green where it is under-confident, each with its own
    legend entry (no translucent overlay: every colour on the plot is in the legend). The number of
    samples is written above each bin, so a bin of two samples is not read like one of thousands.
    """
    lo, hi = np.asarray(bins["lower"], dtype=np.float64), np.asarray(bins["upper"], dtype=np.float64)
    n = np.asarray(bins["count"], dtype=np.int64)
    has = n > 0
    acc = np.where(has, np.nan_to_num(np.asarray(bins["accuracy"], dtype=np.float64)), 0.0)
    conf = np.where(has, np.nan_to_num(np.asarray(bins["confidence"], dtype=np.float64)), 0.0)
    width = hi - lo
    ax.bar(lo, acc, width=width, align="edge", color="tab:blue", edgecolor="k", linewidth=0.5,
           label=RELIABILITY_LABELS["accuracy"])
    bottom, gap = np.minimum(acc, conf), np.abs(conf - acc)
    for key, mask, color in (("over", has & (conf > acc), "tab:red"), ("under", has & (acc > conf), "tab:green")):
        ax.bar(lo + 0.25 * width, np.where(mask, gap, 0.0), bottom=bottom, width=0.5 * width, align="edge",
               color=color, edgecolor="k", linewidth=0.5, label=RELIABILITY_LABELS[key])
    for x, w, top, count in zip(lo[has], width[has], np.maximum(acc, conf)[has], n[has]):
        ax.text(x + w / 2, min(top + 0.02, 0.98), str(int(count)), ha="center", va="bottom", fontsize=5,
                rotation=90)
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.12)
    ax.legend(fontsize=6, title="numbers above the bars: samples per bin", title_fontsize=6,
              loc="upper center", bbox_to_anchor=(0.5, -0.16))


def reliability_figure(cal: Mapping[str, Any]) -> Figure:
    """Reliability diagrams before and after temperature scaling (:func:`draw_reliability`) and the
    number of test samples per confidence bin (log scale) beside them."""
    fig, axes = new_figure(3, cols=3, size=(4.0, 4.6))
    for ax, side in zip(axes[:2], ("before", "after")):
        draw_reliability(ax, cal["reliability"][side])
        title = "before TS" if side == "before" else f"after TS (T = {cal['temperature']:.3g})"
        ax.set_title(f"{title}: ECE {100 * cal[side]['ece']:.2f} %")
    ax = axes[2]
    for side, color in (("before", "tab:blue"), ("after", "tab:orange")):
        b = cal["reliability"][side]
        lo, hi = np.asarray(b["lower"]), np.asarray(b["upper"])
        n = np.asarray(b["count"], dtype=np.float64)
        ax.step(np.r_[lo, hi[-1]], np.r_[n, n[-1]], where="post", color=color, label=side)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title("samples per confidence bin")
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("test samples (log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_reliability(cal: Mapping[str, Any], path: str) -> None:
    """:func:`reliability_figure` of the calibration block ``cal``, written atomically to ``path``."""
    atomic_save_figure(reliability_figure(cal), path)


#: Row titles of the failure-detection table (``failure_block``'s confidences).
FAILURE_LABELS = {"msp": "MSP", "energy": "negative energy", "maxlogit": "max logit", "msp_ts": "MSP after TS"}


def failure_markdown(failure: Mapping[str, Any]) -> str:
    """The failure-detection block: per confidence, AURC, E-AURC, AUGRC (%), the risk at the coverage and the
    coverage at the risk asked for (see ``failure_block`` and :func:`ood.failure_metrics`)."""
    scores = failure["scores"]
    first = next(iter(scores.values()))
    cov, risk = first["coverage"], first["risk"]
    ties = {"group": "tied confidences accepted together (FD-Shifts)",
            "sort": "ties split by input order (torch-uncertainty)"}.get(failure["ties"], failure["ties"])
    lines = [f"Failure detection on the test split ({failure['n']} images, {100 * failure['error_rate']:.2f} % "
             f"wrong): how well each confidence ranks the wrong predictions below the right ones. Areas under "
             f"the risk-coverage curve (AURC; E-AURC = AURC minus that of a perfect ranking) and the generalized "
             f"risk-coverage curve (AUGRC, Traub et al. 2024), in %, lower is better; {ties}. Curves: "
             f"risk_coverage.png.", "",
             f"| confidence | AURC | E-AURC | AUGRC | risk @ {100 * cov:g} % coverage | coverage @ {100 * risk:g} % risk |",
             "|---|---|---|---|---|---|"]
    for name, m in scores.items():
        lines.append(f"| {FAILURE_LABELS.get(name, name)} | " + " | ".join(
            f"{100 * m[k]:.2f}" for k in ("aurc", "eaurc", "augrc", "risk_at_coverage", "coverage_at_risk")) + " |")
    return "\n".join(lines) + "\n"


def plot_risk_coverage(failure: Mapping[str, Any], path: str) -> None:
    """Selective risk and generalized risk against coverage, one line per confidence, with the curve of a
    perfect ranking; written atomically to ``path``. ``failure``: ``failure_block``'s output (with ``raw``)."""
    from ood import risk_coverage_curve

    raw = failure["raw"]
    correct = np.asarray(raw["correct"])
    ties = failure["ties"]
    fig, axes = new_figure(2, cols=2, size=(5.0, 3.8))
    # perfect ranking: every right prediction above every wrong one, all confidences distinct
    oracle = risk_coverage_curve(np.linspace(1.0, 0.0, correct.size), np.sort(correct)[::-1], "group")
    for name, conf in raw["confidence"].items():
        curve = risk_coverage_curve(conf, correct, ties)
        m = failure["scores"][name]
        label = FAILURE_LABELS.get(name, name)
        axes[0].plot(np.r_[0.0, curve["coverage"]], 100 * np.r_[curve["risk"][0], curve["risk"]],
                     label=f"{label} (AURC {100 * m['aurc']:.2f} %)", linewidth=1.3)
        axes[1].plot(np.r_[0.0, curve["coverage"]], 100 * np.r_[0.0, curve["generalized_risk"]],
                     label=f"{label} (AUGRC {100 * m['augrc']:.2f} %)", linewidth=1.3)
    axes[0].plot(oracle["coverage"], 100 * oracle["risk"], color="0.4", linestyle="--", linewidth=1,
                 label="perfect ranking")
    axes[1].plot(oracle["coverage"], 100 * oracle["generalized_risk"], color="0.4", linestyle="--", linewidth=1,
                 label="perfect ranking")
    for ax, what in zip(axes, ("selective risk (% wrong among accepted)", "generalized risk (% of all, wrong and accepted)")):
        ax.set_xlabel("coverage (share of test images accepted)")
        ax.set_ylabel(what)
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_title("risk-coverage")
    axes[1].set_title("generalized risk-coverage")
    fig.tight_layout()
    atomic_save_figure(fig, path)
