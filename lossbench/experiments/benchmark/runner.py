"""The whole benchmark: every cell brought to done, then the leaderboard written."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any, Dict, Tuple

import yaml

from ...framework.io import atomic_write_text
from .aggregate import collect, failures, set_label, summarize
from .cells import run_cell
from .plots import plot_acc_vs_auroc, plot_best_roc
from .schema import BenchConfig, cell_args, check_cell_inputs, expand_ood_sets
from .tables import compact_markdown, leaderboard_csv, leaderboard_latex, leaderboard_markdown, leaderboard_seeds_csv


def write_leaderboard(cfg: BenchConfig, plots: bool = True) -> Dict[str, Any]:
    """Aggregate the finished cells into ``leaderboard.md`` / ``.csv`` / ``_compact.md`` / ``.tex``,
    ``leaderboard_seeds.csv`` (one row per loss and seed) and the plots; return the rows."""
    cells, failed = collect(cfg), failures(cfg)
    if not cells and not failed:
        raise ValueError(f"no finished cells under {os.path.join(cfg.output, 'runs')}; nothing to rank")
    rows = summarize(cells)
    args = cell_args(cfg, cfg.losses[0], cfg.seeds[0])
    sets = [set_label(s) for s in expand_ood_sets(cfg, args.data_root)]
    title = (f"Data {args.data} ({args.img_size} px"
             + (f", {args.max_train_samples} training images" if args.max_train_samples else "")
             + f"), timm {args.model} from scratch, {args.epochs} epochs, {args.opt} lr {args.lr:g}; "
             f"{cfg.checkpoint}.pt of each run evaluated.")
    groups = None if cfg.ood_groups is None else {g: [set_label(n) for n in v] for g, v in cfg.ood_groups.items()}
    md = leaderboard_markdown(rows, cfg.scores, sets, cfg.convention, title, groups) if rows else title + "\n"
    if failed:
        md += "\nDiverged, left out of the means above: " + "; ".join(
            f"{loss} seed {seed} ({err})" for loss, per in failed.items() for seed, err in per.items()) + ".\n"
    atomic_write_text(os.path.join(cfg.output, "leaderboard.md"), md)
    atomic_write_text(os.path.join(cfg.output, "leaderboard.csv"), leaderboard_csv(rows))
    atomic_write_text(os.path.join(cfg.output, "leaderboard_seeds.csv"), leaderboard_seeds_csv(rows))
    if rows:
        atomic_write_text(os.path.join(cfg.output, "leaderboard_compact.md"), compact_markdown(rows, cfg.scores))
        atomic_write_text(os.path.join(cfg.output, "leaderboard.tex"), leaderboard_latex(rows, cfg.scores))
    chosen = None
    if plots and rows:
        plot_acc_vs_auroc(rows, cfg.scores, os.path.join(cfg.output, "acc_vs_auroc.png"))
        chosen = plot_best_roc(cfg, cells, os.path.join(cfg.output, "roc_best.png"))
    return {"rows": rows, "markdown": md, "best_runs": chosen}


def run_benchmark(cfg: BenchConfig, progress: bool = True, plots: bool = True) -> Dict[str, Any]:
    """Run every (loss, seed) cell (skipping finished ones), then write the leaderboard.

    Returns ``{'counts': {'trained', 'resumed', 'evaluated', 'skipped', 'failed'}, 'cells':
    {(loss, seed): action}, 'markdown', 'rows', 'seconds'}``.
    """
    from tqdm import tqdm

    t0 = time.time()
    check_cell_inputs(cfg)  # fail fast on a bad loss config or OOD set, before hours of training
    os.makedirs(cfg.output, exist_ok=True)
    atomic_write_text(os.path.join(cfg.output, "bench.yaml"), yaml.safe_dump(asdict(cfg), sort_keys=False))
    grid = [(loss, seed) for loss in cfg.losses for seed in cfg.seeds]
    counts = {k: 0 for k in ("trained", "resumed", "evaluated", "skipped", "failed")}
    actions: Dict[Tuple[str, int], str] = {}
    bar = tqdm(grid, desc="benchmark", unit="cell", disable=not progress, dynamic_ncols=True)
    for loss, seed in bar:
        bar.set_postfix_str(f"{loss} seed {seed}")
        action = run_cell(cfg, loss, seed)
        actions[(loss, seed)] = action
        counts[action] += 1
    bar.close()
    board = write_leaderboard(cfg, plots=plots)
    return {"counts": counts, "cells": actions, "markdown": board["markdown"], "rows": board["rows"],
            "seconds": time.time() - t0}
