"""Leaderboard figures: accuracy vs AUROC per loss, and the ROC curves of each loss's best run."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ...framework.io import atomic_save_figure
from ..report import draw_roc, new_figure, style_roc_axes
from .aggregate import set_label
from .cells import cell_dir, load_scores
from .schema import BenchConfig


def _loss_colors(losses: Sequence[str]) -> Dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(losses) <= 10 else "tab20"]
    return {loss: cmap(i % cmap.N) for i, loss in enumerate(losses)}


def plot_acc_vs_auroc(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str], path: str) -> None:
    """Test accuracy vs mean AUROC per loss, error bars = sample std over seeds; one panel per score."""
    fig, axes = new_figure(len(scores), size=(4.8, 4.0))
    colors = _loss_colors(list(rows))
    for i, s in enumerate(scores):
        ax = axes[i]
        for loss, r in rows.items():
            st = r["stats"]
            if f"{s}/auroc" not in st:
                continue
            (xm, xs), (ym, ys) = st["acc"], st[f"{s}/auroc"]
            ax.errorbar(100 * xm, 100 * ym, xerr=None if math.isnan(xs) else 100 * xs,
                        yerr=None if math.isnan(ys) else 100 * ys, fmt="o", capsize=3, label=loss,
                        color=colors[loss])
            ax.annotate(loss, (100 * xm, 100 * ym), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_ylim(top=min(ax.get_ylim()[1], 100.5))
        ax.set_xlim(right=min(ax.get_xlim()[1], 100.5))
        ax.set_title(f"{s}: AUROC (mean over OOD sets)")
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel("AUROC (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def plot_best_roc(cfg: BenchConfig, cells: Mapping[str, Mapping[int, Mapping[str, Any]]], path: str) -> Dict[str, Dict[str, int]]:
    """ROC curves (ID positive) of the best run per loss: rows = scores, columns = OOD sets.

    For each (score, loss), the best run is the seed with the highest AUROC of that score averaged
    over the OOD sets. Returns ``{score: {loss: seed}}``.
    """
    sets: List[str] = []
    for per_seed in cells.values():
        for m in per_seed.values():
            for per_set in m["ood"]["results"].values():
                sets += [s for s in per_set if s not in sets]
    fig, axes = new_figure(len(sets) * len(cfg.scores), cols=len(sets), size=(3.8, 3.4))
    chosen: Dict[str, Dict[str, int]] = {s: {} for s in cfg.scores}
    colors = _loss_colors(list(cells))
    raw_cache: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for i, score in enumerate(cfg.scores):
        for j, set_name in enumerate(sets):
            ax = axes[i * len(sets) + j]
            for loss, per_seed in cells.items():
                ranked = [(np.mean([m["auroc"] for m in pm["ood"]["results"][score].values()]), seed)
                          for seed, pm in per_seed.items() if score in pm["ood"]["results"]]
                if not ranked:
                    continue
                seed = max(ranked)[1]
                chosen[score][loss] = seed
                if (loss, seed) not in raw_cache:
                    raw_cache[(loss, seed)] = load_scores(os.path.join(cell_dir(cfg, loss, seed), "scores.npz"))
                pair = raw_cache[(loss, seed)].get(score, {}).get(set_name)
                if pair is not None:
                    draw_roc(ax, pair["id"], pair["ood"], f"{loss} (s{seed})", colors[loss], linewidth=1)
            style_roc_axes(ax, f"{score} vs {set_label(set_name)}", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return chosen
