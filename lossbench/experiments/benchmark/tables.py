"""The leaderboard as Markdown and CSV (mean ± sample std over seeds)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from ..report import CONVENTION_NOTES


METRIC_LABELS = {"acc": "acc", "acc_tta": "acc with TTA", "ece": "ECE", "ece_ts": "ECE after TS",
                 "adaptive_ece": "adaptive ECE", "brier": "Brier", "nll": "NLL", "aurc": "MSP AURC",
                 "augrc": "MSP AUGRC", "p_at_1": "P@1", "map_at_r": "MAP@R"}
#: Columns where lower is better; the others (and AUROC) higher.
LOWER_IS_BETTER = ("ece", "ece_ts", "adaptive_ece", "brier", "nll", "aurc", "augrc")
#: Columns shown as plain numbers (3 decimals), not percentages.
PLAIN = ("brier", "nll")


def _fmt(ms: Tuple[float, float], bold: bool = False, percent: bool = True) -> str:
    mean, std = ms
    if percent:
        text = f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")
    else:
        text = f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")
    return f"**{text}**" if bold else text


#: With more scores than this, the per-score columns move from the loss table to a score x loss table.
WIDE_SCORES = 6


def leaderboard_markdown(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str], ood_sets: Sequence[str],
                         convention: str, title: str = "", groups: Optional[Mapping[str, Sequence[str]]] = None) -> str:
    """The leaderboard: one row per loss, mean ± std over seeds in %, best mean in bold; with OOD
    ``groups`` or more than :data:`WIDE_SCORES` scores, a score x loss table of the OOD results
    (:func:`score_table_markdown`); then skipped scores with their reasons and the searched grid points."""
    present = {k for r in rows.values() for k in r["stats"]}
    cols = [(k, METRIC_LABELS[k], k not in LOWER_IS_BETTER) for k in METRIC_LABELS if k in present]
    wide = bool(groups) or len(scores) > WIDE_SCORES
    for s in ([] if wide else scores):
        cols += [(f"{s}/auroc", f"{s} AUROC", True), (f"{s}/fpr95", f"{s} FPR@95", False)]
    best = {}
    for key, _, higher in cols:
        means = [r["stats"][key][0] for r in rows.values() if key in r["stats"]]
        if means:
            best[key] = max(means) if higher else min(means)
    seeds = sorted({r["n"] for r in rows.values()})
    lines = [
        (f"{title}\n\n" if title else "")
        + f"Table: mean ± sample std (ddof = 1) over {'/'.join(map(str, seeds))} seed(s), in %; best mean in "
        f"bold. acc = top-1 test accuracy"
        + ("; acc with TTA = the same with the run's test-time augmentation (the OOD scores use the model "
           "without it)" if "acc_tta" in present else "")
        + "; ECE = 15-bin equal-width expected calibration error, ECE after TS = the same after temperature "
        "scaling fitted on the validation split, adaptive ECE = 15 equal-mass bins, Brier = multi-class "
        "Brier score (0-2), NLL = mean negative log-likelihood (not in %); for these lower is better. "
        + ("MSP AURC / AUGRC = area under the (generalized) risk-coverage curve of the test predictions "
           "ranked by their max softmax probability (failure detection: lower is better; tied confidences "
           "accepted together, as FD-Shifts). " if "aurc" in present else "")
        + f"P@1 / MAP@R = precision@1 / MAP@R of the penultimate test features retrieving their own class "
        f"(pytorch-metric-learning AccuracyCalculator). AUROC and FPR@95 of each OOD score are the mean "
        f"over the OOD sets {', '.join(ood_sets)}"
        + ("" if not groups else " (and per group: " + "; ".join(f"{g} = {', '.join(v)}" for g, v in groups.items())
           + ")") + f"; higher score = in-distribution; convention "
        f"`{convention}` ({CONVENTION_NOTES[convention]}).", "",
        "| loss | seeds | " + " | ".join(label for _, label, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for loss, r in rows.items():
        cells = [_fmt(r["stats"][k], bold=abs(r["stats"][k][0] - best[k]) < 1e-12, percent=k not in PLAIN)
                 if k in r["stats"] else "-" for k, _, _ in cols]
        lines.append(f"| {loss} | {r['n']} | " + " | ".join(cells) + " |")
    if wide:
        lines += ["", score_table_markdown(rows, scores, groups or {"all sets": list(ood_sets)})]
        lines += ["AUROC (%) per OOD set, mean ± sample std over seeds, same convention:", "",
                  "| score | " + " | ".join(f"{loss} {o}" for loss in rows for o in ood_sets) + " |",
                  "|---|" + "---|" * (len(rows) * len(ood_sets))]
        for s in scores:
            lines.append(f"| {s} | " + " | ".join(
                _fmt(r["stats"][f"{s}/{o}/auroc"]) if f"{s}/{o}/auroc" in r["stats"] else "-"
                for r in rows.values() for o in ood_sets) + " |")
    else:
        per_set = [(s, o) for s in scores for o in ood_sets]
        lines += ["", "AUROC (%) per OOD set, mean ± sample std over seeds, same convention:", "",
                  "| loss | " + " | ".join(f"{s} {o}" for s, o in per_set) + " |", "|---|" + "---|" * len(per_set)]
        for loss, r in rows.items():
            lines.append(f"| {loss} | " + " | ".join(
                _fmt(r["stats"][f"{s}/{o}/auroc"]) if f"{s}/{o}/auroc" in r["stats"] else "-" for s, o in per_set) + " |")
    lines += _skipped_lines(rows) + _chosen_lines(rows, scores)
    return "\n".join(lines) + "\n"


def score_table_markdown(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str],
                         groups: Mapping[str, Sequence[str]]) -> str:
    """Rows: OOD score; per loss and group: AUROC / FPR@95 (%, mean over the group's sets, then mean ± std
    over seeds); the best AUROC of each column in bold; a skipped score says so."""
    single = list(groups) == ["all sets"]
    cols = [(loss, g) for loss in rows for g in groups]
    best = {}
    for loss, g in cols:
        key = f"{{}}/auroc" if single else f"{{}}/group:{g}/auroc"
        vals = [rows[loss]["stats"][key.format(s)][0] for s in scores if key.format(s) in rows[loss]["stats"]]
        best[(loss, g)] = max(vals) if vals else None
    lines = ["OOD detection per score: AUROC / FPR@95 (%), each the mean over the "
             + ("OOD sets" if single else "group's sets") + ", then mean ± std over seeds; best AUROC per column in bold.",
             "", "| score | " + " | ".join(f"{loss} {g}" for loss, g in cols) + " |", "|---|" + "---|" * len(cols)]
    for s in scores:
        cells = []
        for loss, g in cols:
            st = rows[loss]["stats"]
            a, f = ((f"{s}/auroc", f"{s}/fpr95") if single else (f"{s}/group:{g}/auroc", f"{s}/group:{g}/fpr95"))
            if a not in st:
                cells.append("skipped" if s in rows[loss].get("skipped", {}) else "-")
                continue
            au = _fmt(st[a], bold=best[(loss, g)] is not None and abs(st[a][0] - best[(loss, g)]) < 1e-12)
            cells.append(f"{au} / {_fmt(st[f])}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _skipped_lines(rows: Mapping[str, Mapping[str, Any]]) -> List[str]:
    reasons: dict = {}
    for loss, r in rows.items():
        for score, why in (r.get("skipped") or {}).items():
            reasons.setdefault((score, why), []).append(loss)
    if not reasons:
        return []
    return ["", "Skipped scores (no result, by design -- never a wrong number):", ""] + [
        f"- {score} for {', '.join(losses)}: {why}" for (score, why), losses in reasons.items()]


def _chosen_lines(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str]) -> List[str]:
    searched = [s for s in scores if any(s in (r.get("chosen") or {}) for r in rows.values())]
    if not searched:
        return []
    lines = ["", "Hyper-parameters chosen by the grid search on the validation OOD set, per seed:", "",
             "| score | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for s in searched:
        cells = []
        for r in rows.values():
            per_seed = (r.get("chosen") or {}).get(s, [])
            cells.append(" / ".join(", ".join(f"{k}={v}" for k, v in c.items()) for c in per_seed) or "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def leaderboard_csv(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """CSV: one row per loss; ``<metric>_mean`` / ``<metric>_std`` columns (fractions), per-set columns too."""
    keys: List[str] = []
    for r in rows.values():
        keys += [k for k in r["stats"] if k not in keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["loss", "n_seeds", "seeds"] + [f"{k.replace('/', '_')}_{s}" for k in keys for s in ("mean", "std")])
    for loss, r in rows.items():
        vals = []
        for k in keys:
            m, s = r["stats"].get(k, (float("nan"), float("nan")))
            vals += [f"{m:.6f}", "" if math.isnan(s) else f"{s:.6f}"]
        w.writerow([loss, r["n"], " ".join(map(str, r["seeds"]))] + vals)
    return buf.getvalue()


def _compact_cells(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str], pm: str = "±",
                   arrow: str = "→") -> Tuple[List[str], List[List[str]]]:
    """Header and cells of the compact leaderboard (shared by the Markdown and the LaTeX table)."""
    def f(r: Mapping[str, Any], key: str, percent: bool = True) -> str:
        if key not in r["stats"]:
            return "-"
        m, s = r["stats"][key]
        k = 100 if percent else 1
        d = 1 if percent else 3
        return f"{k * m:.{d}f}" + ("" if math.isnan(s) else f"{pm}{k * s:.{d}f}")

    tta = any("acc_tta" in r["stats"] for r in rows.values())
    head = (["loss", "acc"] + (["acc with TTA"] if tta else [])
            + [f"ECE {arrow} after TS", "adaptive ECE", "Brier", "NLL", "MSP AURC / AUGRC", "P@1", "MAP@R"]
            + list(scores))
    body = []
    for loss, r in rows.items():
        cells = ([loss, f(r, "acc")] + ([f(r, "acc_tta")] if tta else [])
                 + [f"{f(r, 'ece')} {arrow} {f(r, 'ece_ts')}", f(r, "adaptive_ece"), f(r, "brier", False),
                    f(r, "nll", False), f"{f(r, 'aurc')} / {f(r, 'augrc')}", f(r, "p_at_1"), f(r, "map_at_r")])
        cells += ["skipped" if s in (r.get("skipped") or {}) and f"{s}/auroc" not in r["stats"]
                  else f"{f(r, f'{s}/auroc')} / {f(r, f'{s}/fpr95')}" for s in scores]
        body.append(cells)
    return head, body


def leaderboard_seeds_csv(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """CSV next to :func:`leaderboard_csv`: one row per (loss, seed), the seed's own value of every metric
    that the leaderboard averages (columns named as there without ``_mean`` / ``_std``; fractions, full
    precision), so that the mean of a loss's rows is its ``<metric>_mean``."""
    keys: List[str] = []
    for r in rows.values():
        keys += [k for k in r["stats"] if k not in keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["loss", "seed"] + [k.replace("/", "_") for k in keys])
    for loss, r in rows.items():
        for seed, values in (r.get("values") or {}).items():
            w.writerow([loss, seed] + [repr(float(values[k])) if k in values else "" for k in keys])
    return buf.getvalue()


def compact_markdown(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str]) -> str:
    """The leaderboard in one narrow table (``leaderboard_compact.md``): ECE before -> after temperature
    scaling in one cell, MSP's AURC / AUGRC in one, and each score's mean AUROC / FPR@95 in one cell
    (%, mean±std over seeds)."""
    head, body = _compact_cells(rows, scores)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


#: LaTeX's ten special characters in text mode and their escaped forms.
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (:data:`LATEX_ESCAPES`), for a tabular cell."""
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def leaderboard_latex(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str]) -> str:
    """The compact leaderboard (:func:`compact_markdown`) as a booktabs tabular (``leaderboard.tex``;
    needs ``\\usepackage{booktabs}``): one row per loss, mean ± std over seeds, same columns and units."""
    pm, arrow = "\x00PM\x00", "\x00TO\x00"  # placeholders that survive escaping, then become math
    head, body = _compact_cells(rows, scores, pm=pm, arrow=arrow)

    def tex(cell: str) -> str:
        return latex_escape(cell).replace(pm, r"$\pm$").replace(arrow, r"$\to$")

    lines = ["% lossbench leaderboard: % values, mean $\\pm$ sample std over seeds; needs \\usepackage{booktabs}",
             r"\begin{tabular}{l" + "c" * (len(head) - 1) + "}", r"\toprule",
             " & ".join(tex(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(tex(c) for c in cells) + r" \\" for cells in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
