"""The leaderboard as Markdown and CSV (mean ± sample std over seeds)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, List, Mapping, Sequence, Tuple

from ..report import CONVENTION_NOTES


METRIC_LABELS = {"acc": "acc", "ece": "ECE", "ece_ts": "ECE after TS", "adaptive_ece": "adaptive ECE",
                 "brier": "Brier", "nll": "NLL", "p_at_1": "P@1", "map_at_r": "MAP@R"}
#: Columns where lower is better; the others (and AUROC) higher.
LOWER_IS_BETTER = ("ece", "ece_ts", "adaptive_ece", "brier", "nll")
#: Columns shown as plain numbers (3 decimals), not percentages.
PLAIN = ("brier", "nll")


def _fmt(ms: Tuple[float, float], bold: bool = False, percent: bool = True) -> str:
    mean, std = ms
    if percent:
        text = f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")
    else:
        text = f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")
    return f"**{text}**" if bold else text


def leaderboard_markdown(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str], ood_sets: Sequence[str],
                         convention: str, title: str = "") -> str:
    """The leaderboard table: one row per loss, mean ± std over seeds in %, best mean in bold."""
    present = {k for r in rows.values() for k in r["stats"]}
    cols = [(k, METRIC_LABELS[k], k not in LOWER_IS_BETTER) for k in METRIC_LABELS if k in present]
    for s in scores:
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
        f"bold. acc = top-1 test accuracy; ECE = 15-bin equal-width expected calibration error, ECE after TS = "
        f"the same after temperature scaling fitted on the validation split, adaptive ECE = 15 equal-mass "
        f"bins, Brier = multi-class Brier score (0-2), NLL = mean negative log-likelihood (not in %); for "
        f"these lower is better. "
        f"P@1 / MAP@R = precision@1 / MAP@R of the penultimate test features retrieving their own class "
        f"(pytorch-metric-learning AccuracyCalculator). AUROC and FPR@95 of each OOD score are the mean "
        f"over the OOD sets {', '.join(ood_sets)}; higher score = in-distribution; convention "
        f"`{convention}` ({CONVENTION_NOTES[convention]}).", "",
        "| loss | seeds | " + " | ".join(label for _, label, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for loss, r in rows.items():
        cells = [_fmt(r["stats"][k], bold=abs(r["stats"][k][0] - best[k]) < 1e-12, percent=k not in PLAIN)
                 if k in r["stats"] else "-" for k, _, _ in cols]
        lines.append(f"| {loss} | {r['n']} | " + " | ".join(cells) + " |")
    per_set = [(s, o) for s in scores for o in ood_sets]
    lines += ["", "AUROC (%) per OOD set, mean ± sample std over seeds, same convention:", "",
              "| loss | " + " | ".join(f"{s} {o}" for s, o in per_set) + " |", "|---|" + "---|" * len(per_set)]
    for loss, r in rows.items():
        lines.append(f"| {loss} | " + " | ".join(
            _fmt(r["stats"][f"{s}/{o}/auroc"]) if f"{s}/{o}/auroc" in r["stats"] else "-" for s, o in per_set) + " |")
    return "\n".join(lines) + "\n"


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
