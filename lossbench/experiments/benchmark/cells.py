"""One benchmark cell (loss, seed): its state on disk, training, evaluation, and the completion marker."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any, Dict, Mapping, Tuple


from ...framework.builders import load_run
from ...framework.checkpoint import check_resumable, comparable_config, load_checkpoint
from ...framework.config import to_dict
from ...framework.io import atomic_save_npz, atomic_write_json, read_json
from ...framework.trainer import Trainer
from ..evaluate_run import evaluate_model, load_scores, save_scores, write_report  # noqa: F401 (re-exported)
from .schema import BenchConfig, cell_args, eval_ood_sets, eval_settings, eval_val_ood


def cell_dir(cfg: BenchConfig, loss: str, seed: int) -> str:
    return os.path.join(cfg.output, "runs", f"{loss}-s{seed}")


def cell_state(cfg: BenchConfig, args: argparse.Namespace) -> Tuple[str, int]:
    """``('new' | 'partial' | 'trained' | 'done', epoch of last.pt)``: no checkpoint, resume training,
    evaluate, or skip.

    A checkpoint written with another configuration raises :class:`CheckpointError` (it is never
    silently reused nor overwritten); the check is the trainer's own
    (:func:`lossbench.framework.checkpoint.check_resumable`), so both accept the same changes.
    """
    run_dir = os.path.join(args.output, args.name)
    last = os.path.join(run_dir, "last.pt")
    if not os.path.exists(last):
        return "new", 0
    state = load_checkpoint(last)
    check_resumable(state["config"], to_dict(args), f"cell {run_dir!r}",
                    "use another benchmark output folder or delete that cell")
    epoch = int(state["epoch"])
    complete = epoch >= args.epochs or (args.max_steps is not None and int(state["global_step"]) >= args.max_steps)
    if not complete:
        return "partial", epoch
    marker = read_json(os.path.join(run_dir, "cell.json"))
    done = (marker is not None and marker.get("eval") == eval_settings(cfg, args.data_root)
            and int(marker.get("epoch", -1)) == epoch
            and os.path.isfile(os.path.join(run_dir, "metrics.json")))
    return ("done" if done else "trained"), epoch


def evaluate_cell(cfg: BenchConfig, args: argparse.Namespace, last_epoch: int) -> Dict[str, Any]:
    """Evaluate a trained cell; write ``metrics.json`` (+ report files), ``scores.npz``, then ``cell.json``.

    The model and data are built once (:func:`load_run`) and serve the OOD scores, accuracy,
    calibration and the embedding metrics alike.
    """
    run_dir = os.path.join(args.output, args.name)
    t0 = time.time()
    model, _, bundle, state = load_run(os.path.join(run_dir, f"{cfg.checkpoint}.pt"), args.device)
    result = evaluate_model(model, bundle, ood_sets=eval_ood_sets(cfg, args.data_root), scores=cfg.scores,
                            score_kwargs=cfg.score_args, convention=cfg.convention, data_root=args.data_root,
                            seed=args.seed, batch_size=cfg.eval_batch_size, max_ood_samples=cfg.max_ood_samples,
                            n_noise=cfg.n_noise, embedding_distance=cfg.embedding_distance,
                            val_ood=eval_val_ood(cfg, args.data_root), search=cfg.search,
                            feature_cache_dir=os.path.join(run_dir, "features"), tta=int(getattr(args, "tta", 0)))
    result = {"epoch": int(state["epoch"]), "config": state["config"], **result,
              "cell": {"loss": args.loss, "seed": args.seed}}
    write_report(result, run_dir, plots=cfg.cell_plots)  # metrics.json, results.md, scores.npz
    marker = {"loss": args.loss, "seed": args.seed, "epoch": last_epoch, "evaluated_epoch": result["epoch"],
              "eval": eval_settings(cfg, args.data_root), "seconds_eval": round(time.time() - t0, 2)}
    atomic_write_json(os.path.join(run_dir, "cell.json"), marker)
    return result


def _train(args: argparse.Namespace, run_dir: str, failed_path: str) -> bool:
    """Train (or resume) a cell with its stdout in ``train.log``; ``False`` (and ``failed.json``) if it diverged."""
    os.makedirs(run_dir, exist_ok=True)
    try:
        with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            Trainer(args).fit()
    except FloatingPointError as err:  # the loss diverged: a result, not a crash of the benchmark
        atomic_write_json(failed_path, {"loss": args.loss, "seed": args.seed, "error": str(err),
                                        "config": comparable_config(to_dict(args))})
        return False
    return True


def run_cell(cfg: BenchConfig, loss: str, seed: int) -> str:
    """Bring one cell to done; return what it took: 'skipped', 'trained', 'resumed', 'evaluated', or
    'failed' (training diverged: ``failed.json`` records it and later runs skip the cell)."""
    args = cell_args(cfg, loss, seed)
    run_dir = os.path.join(args.output, args.name)
    failed_path = os.path.join(run_dir, "failed.json")
    failed = read_json(failed_path)
    if failed is not None:
        if failed.get("config") == comparable_config(to_dict(args)):
            return "failed"
        os.unlink(failed_path)  # written for another recipe
    state, _ = cell_state(cfg, args)
    if state == "done":
        return "skipped"
    action = "evaluated"
    if state in ("new", "partial"):
        if not _train(args, run_dir, failed_path):
            return "failed"
        action = "trained" if state == "new" else "resumed"
    state, last_epoch = cell_state(cfg, args)
    if state == "partial":
        raise RuntimeError(f"cell {run_dir!r} stopped at epoch {last_epoch} of {args.epochs}; see its train.log")
    evaluate_cell(cfg, args, last_epoch)
    return action
