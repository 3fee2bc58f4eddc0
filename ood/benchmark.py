"""The loss x OOD-score benchmark: train every (loss, seed), evaluate every score on every OOD set, rank.

``python eval.py bench -c configs/bench_digits.yaml [--seeds 0,1 --epochs 2 --losses ce,wcdas ...]``

A benchmark config (YAML) holds a ``train`` section -- any ``train.py`` option (keys = option
dests), the recipe shared by every cell -- and the benchmark's own keys (:data:`BENCH_KEYS`):
``losses`` (names or ``all`` = :func:`lossbench.list_losses`), ``seeds``, ``ood_sets``, ``scores``,
``score_args``, ``convention``, ``output``, ... Each loss's hyper-parameters are the ``loss_args``
of ``<loss_configs>/<loss>.yaml`` (default: the folder of the benchmark config, i.e. ``configs/``),
overridden by the benchmark's ``loss_args: {loss: {...}}``; everything else is the same for every
loss, so the comparison is of the losses alone. An OOD set name may say ``{data_root}``, which is
replaced by the ``train.data_root`` in force (e.g. ``imagefolder:{data_root}/notMNIST``).

For each cell (loss, seed) the run folder is ``<output>/runs/<loss>-s<seed>``:

* training through :class:`lossbench.engine.Trainer` (``--resume``: a half-trained cell continues
  from its ``last.pt``; stdout goes to ``train.log``);
* :func:`ood.pipeline.evaluate_checkpoint` on ``last.pt`` (or ``best.pt``): test accuracy, 15-bin
  ECE, AUROC / FPR@95 / ... of every score on every OOD set, written by
  :func:`ood.pipeline.write_report` (``metrics.json``, ``results.md``, ``roc.png``, ``hist.png``),
  the raw scores in ``scores.npz``;
* the embedding quality of the penultimate features on the test split (:func:`embedding_quality`:
  pytorch-metric-learning's ``AccuracyCalculator``, precision@1 and MAP@R), added to ``metrics.json``;
* ``cell.json`` last, the completion marker. A cell whose checkpoint is complete (epoch == epochs)
  and whose ``cell.json`` matches the evaluation settings is skipped; one that was trained with a
  different configuration is an error (choose another ``output``), never silently reused.

Then the leaderboard (:func:`write_leaderboard`): ``leaderboard.md`` / ``leaderboard.csv`` (one row per
loss, mean +- sample std over seeds), ``acc_vs_auroc.png`` and ``roc_best.png``. Every file is written
atomically, so a killed benchmark leaves either the old or the new version of a table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from lossbench.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_text, load_checkpoint
from lossbench.config import ConfigError, apply_config, build_parser, load_yaml, to_dict, validate
from lossbench.registry import list_losses
from lossbench.validation import check_float, check_finite, check_target

from .metrics import CONVENTIONS
from .registry import list_scores
from .report import CONVENTION_NOTES

#: Keys of a benchmark config besides ``train``; see :class:`BenchConfig` for their meaning.
BENCH_KEYS = ("output", "train", "losses", "loss_args", "loss_configs", "seeds", "ood_sets", "scores",
              "score_args", "convention", "checkpoint", "max_ood_samples", "n_noise", "eval_batch_size",
              "embedding_distance", "cell_plots")
#: train.py options the benchmark sets per cell; a config's ``train`` section may not set them.
PER_CELL_KEYS = ("loss", "loss_args", "seed", "output", "name", "resume", "stop_after_epochs", "config")
#: train.py options that may differ between a cell and its resumption (as the trainer's resume check).
RUN_CONTROL_KEYS = ("resume", "no_progress", "stop_after_epochs", "device", "workers", "output")
EMBEDDING_DISTANCES = ("cosine", "euclidean")
METRIC_LABELS = {"acc": "acc", "ece": "ECE", "p_at_1": "P@1", "map_at_r": "MAP@R"}


@dataclass
class BenchConfig:
    """A resolved benchmark configuration.

    ``output``: the benchmark folder; ``train``: train.py options shared by every cell;
    ``losses`` / ``seeds``: the grid; ``loss_args``: per-loss overrides of the hyper-parameters read
    from ``loss_configs/<loss>.yaml``; ``ood_sets`` / ``scores`` / ``score_args`` / ``convention``:
    the evaluation (:func:`ood.pipeline.evaluate_checkpoint`); ``checkpoint``: ``'last'`` (the
    final weights, default: no selection on validation data) or ``'best'``; ``max_ood_samples``,
    ``n_noise``: OOD set sizes; ``embedding_distance``: ``'cosine'`` (default) or ``'euclidean'``
    for precision@1 / MAP@R; ``cell_plots``: per-cell ``roc.png`` / ``hist.png``.
    """

    output: str
    train: Dict[str, Any]
    losses: List[str]
    seeds: List[int]
    ood_sets: List[str]
    scores: List[str]
    loss_args: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    loss_configs: Optional[str] = None
    score_args: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    convention: str = "paper"
    checkpoint: str = "last"
    max_ood_samples: Optional[int] = 2000
    n_noise: int = 1000
    eval_batch_size: int = 256
    embedding_distance: str = "cosine"
    cell_plots: bool = True


# -- configuration --------------------------------------------------------------------------------

def _names(value: Any, key: str) -> List[str]:
    if isinstance(value, str):
        value = [t for t in value.replace(" ", ",").split(",") if t]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a non-empty list of names, got {value!r}")
    return list(value)


def _seeds(value: Any) -> List[int]:
    if isinstance(value, str):
        value = [t for t in value.replace(" ", ",").split(",") if t]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        seeds = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {value!r}") from None
    if not seeds or any(isinstance(v, bool) or (isinstance(v, float) and v != int(v)) for v in value):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    return seeds


def _nested(value: Any, key: str, valid: Sequence[str], what: str) -> Dict[str, Dict[str, Any]]:
    value = value or {}
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ConfigError(f"{key} must map {what} names to mappings of arguments, got {value!r}")
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ConfigError(f"{key} names {what}s that are not benchmarked: {unknown}; benchmarked: {list(valid)}")
    return {str(k): dict(v) for k, v in value.items()}


def resolve_config(data: Mapping[str, Any], source: str = "config", base_dir: str = ".") -> BenchConfig:
    """Check a benchmark config mapping and resolve names (``losses: all``, loss configs folder)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(BENCH_KEYS))
    if unknown:
        raise ConfigError(f"unknown benchmark key(s) {unknown} in {source}; valid keys are: {', '.join(BENCH_KEYS)} "
                          f"(train.py options go under 'train')")
    if not isinstance(data.get("train") or {}, Mapping):
        raise ConfigError(f"'train' in {source} must be a mapping of train.py options, got {data['train']!r}")
    train = dict(data.get("train") or {})
    per_cell = sorted(k for k in train if str(k).replace("-", "_") in PER_CELL_KEYS)
    if per_cell:
        raise ConfigError(f"train option(s) {per_cell} in {source} are set per cell by the benchmark; "
                          f"use the benchmark keys losses / loss_args / seeds / output instead")
    all_losses = list_losses()
    losses = all_losses if data.get("losses", "all") in ("all", ["all"]) else _names(data["losses"], "losses")
    bad = [n for n in losses if n not in all_losses]
    if bad:
        raise ConfigError(f"unknown loss name(s) {bad} in {source}; expected names from {all_losses} or 'all'")
    scores = _names(data.get("scores", ["msp", "energy", "maxlogit", "mahalanobis"]), "scores")
    bad = [n for n in scores if n not in list_scores()]
    if bad:
        raise ConfigError(f"unknown OOD score(s) {bad} in {source}; expected names from {list_scores()}")
    convention = data.get("convention", "paper")
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    checkpoint = data.get("checkpoint", "last")
    if checkpoint not in ("last", "best"):
        raise ConfigError(f"checkpoint must be 'last' or 'best', got {checkpoint!r}")
    distance = data.get("embedding_distance", "cosine")
    if distance not in EMBEDDING_DISTANCES:
        raise ConfigError(f"embedding_distance must be one of {EMBEDDING_DISTANCES}, got {distance!r}")
    for key in ("n_noise", "eval_batch_size") + (("max_ood_samples",) if data.get("max_ood_samples") is not None else ()):
        v = data.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    loss_configs = data.get("loss_configs")
    loss_configs = base_dir if loss_configs is None else (
        loss_configs if os.path.isabs(loss_configs) else os.path.join(base_dir, loss_configs))
    return BenchConfig(
        output=str(data.get("output") or os.path.join("runs", "bench")), train=train, losses=losses,
        seeds=_seeds(data.get("seeds", [0, 1, 2])), ood_sets=_names(data.get("ood_sets", ["gaussian", "uniform"]), "ood_sets"),
        scores=scores, loss_args=_nested(data.get("loss_args"), "loss_args", losses, "loss"),
        loss_configs=loss_configs, score_args=_nested(data.get("score_args"), "score_args", scores, "score"),
        convention=convention, checkpoint=checkpoint, max_ood_samples=data.get("max_ood_samples", 2000),
        n_noise=int(data.get("n_noise", 1000)), eval_batch_size=int(data.get("eval_batch_size", 256)),
        embedding_distance=distance, cell_plots=bool(data.get("cell_plots", True)),
    )


def load_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> BenchConfig:
    """Read a benchmark YAML file; ``overrides`` (benchmark keys, plus ``train`` entries merged) win."""
    data = dict(load_yaml(path))
    for key, value in (overrides or {}).items():
        if key == "train":
            data["train"] = {**(data.get("train") or {}), **value}
        else:
            data[key] = value
    return resolve_config(data, path, os.path.dirname(os.path.abspath(path)))


def loss_args_for(cfg: BenchConfig, loss: str) -> Dict[str, Any]:
    """``loss_args`` of ``<loss_configs>/<loss>.yaml`` (if present) updated by ``cfg.loss_args[loss]``."""
    args: Dict[str, Any] = {}
    if cfg.loss_configs:
        path = os.path.join(cfg.loss_configs, f"{loss}.yaml")
        if os.path.isfile(path):
            per_loss = load_yaml(path)
            if per_loss.get("loss", loss) != loss:
                raise ConfigError(f"{path} is for loss {per_loss.get('loss')!r}, not {loss!r}")
            args.update(per_loss.get("loss_args") or {})
    args.update(cfg.loss_args.get(loss, {}))
    return args


def cell_args(cfg: BenchConfig, loss: str, seed: int) -> argparse.Namespace:
    """The train.py namespace of cell (loss, seed): ``cfg.train`` + the loss, its arguments and seed."""
    parser = build_parser()
    apply_config(parser, cfg.train, "the benchmark's train section")
    args = parser.parse_args([])
    validate(args)
    args.loss, args.loss_args, args.seed = loss, loss_args_for(cfg, loss), int(seed)
    args.output, args.name = os.path.join(cfg.output, "runs"), f"{loss}-s{seed}"
    args.resume, args.no_progress = True, True
    return args


def expand_ood_sets(cfg: BenchConfig, data_root: Optional[str]) -> List[str]:
    """OOD set names with ``{data_root}`` replaced by ``data_root`` (the train section's)."""
    out = []
    for name in cfg.ood_sets:
        if "{data_root}" in name:
            if data_root is None:
                raise ConfigError(f"OOD set {name!r} uses {{data_root}} but train.data_root is not set")
            name = name.replace("{data_root}", data_root)
        out.append(name)
    return out


def eval_settings(cfg: BenchConfig, data_root: Optional[str]) -> Dict[str, Any]:
    """What a cell's evaluation depends on besides its weights; ``cell.json`` records it."""
    return json.loads(json.dumps({
        "ood_sets": expand_ood_sets(cfg, data_root), "scores": cfg.scores, "score_args": cfg.score_args,
        "convention": cfg.convention, "checkpoint": cfg.checkpoint, "max_ood_samples": cfg.max_ood_samples,
        "n_noise": cfg.n_noise, "embedding_distance": cfg.embedding_distance,
    }))


# -- embedding quality ----------------------------------------------------------------------------

def embedding_quality(features: Tensor, labels: Tensor, distance: str = "cosine",
                      batch_size: int = 2048) -> Dict[str, float]:
    """Precision@1 and MAP@R of ``features`` retrieving samples of their own class.

    pytorch-metric-learning's ``AccuracyCalculator`` (Musgrave, Belongie & Lim, "A Metric Learning
    Reality Check", ECCV 2020, Sec. 3.2): query = reference = the given set, each query excluded
    from its own neighbours (``get_accuracy(query, labels)`` with no reference); for a query of
    class y with R other samples of class y, P@1 = [label of the nearest neighbour = y] and
    MAP@R = (1/R) sum_{i<=R} P(i) [neighbour i has class y], P(i) the precision at rank i. k is
    the largest class size (``k='max_bin_count'``), which MAP@R needs. Neighbours by cosine
    similarity (default, the angular view of NBC-softmax / angular heads and of Musgrave et al.'s
    normalised embeddings) or Euclidean distance; exact search (``CustomKNN``) in ``batch_size``
    row blocks, no faiss needed. ``features`` (N, D) float, ``labels`` (N,) int -> fractions.
    """
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    check_float(features, "features", ndim=2)
    check_finite(features, "features")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        check_target(labels, 1, features.shape[0], "labels")  # raises the TypeError naming labels
    check_target(labels, int(labels.max()) + 1 if labels.numel() else 1, features.shape[0], "labels")
    if distance not in EMBEDDING_DISTANCES:
        raise ValueError(f"distance must be one of {EMBEDDING_DISTANCES}, got {distance!r}")
    if torch.bincount(labels).max() < 2:
        raise ValueError("labels: every class has a single sample; retrieval needs >= 2 samples of a class")
    dist = CosineSimilarity() if distance == "cosine" else LpDistance(normalize_embeddings=False)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              knn_func=CustomKNN(dist, batch_size=batch_size), device=torch.device("cpu"))
    res = calc.get_accuracy(features.detach().float().cpu(), labels.detach().cpu())
    return {"p_at_1": float(res["precision_at_1"]), "map_at_r": float(res["mean_average_precision_at_r"])}


@torch.no_grad()
def penultimate_test_features(checkpoint: str, batch_size: int = 256, device: str = "auto") -> Tuple[Tensor, Tensor]:
    """Penultimate features ``(N, D)`` and labels of the test split of the run saved in ``checkpoint``."""
    from lossbench.engine import load_run, make_loader

    from .features import penultimate_features

    model, _, bundle, _ = load_run(checkpoint, device)
    dev = next(model.parameters()).device
    feats, labels = [], []
    for x, y in make_loader(bundle.test, batch_size):
        feats.append(penultimate_features(model, x.to(dev)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


# -- one cell -------------------------------------------------------------------------------------

def _cell_dir(cfg: BenchConfig, loss: str, seed: int) -> str:
    return os.path.join(cfg.output, "runs", f"{loss}-s{seed}")


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _comparable(config: Mapping[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RUN_CONTROL_KEYS}))


def cell_state(cfg: BenchConfig, args: argparse.Namespace) -> Tuple[str, int]:
    """``('new' | 'partial' | 'trained' | 'done', epoch of last.pt)``: no checkpoint, resume training,
    evaluate, or skip.

    A checkpoint written with another configuration raises :class:`CheckpointError` (it is never
    silently reused nor overwritten).
    """
    run_dir = os.path.join(args.output, args.name)
    last = os.path.join(run_dir, "last.pt")
    if not os.path.exists(last):
        return "new", 0
    state = load_checkpoint(last)
    saved, now = _comparable(state["config"]), _comparable(to_dict(args))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise CheckpointError(
            f"cell {run_dir!r} was trained with a different configuration "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in diff)}); "
            f"use another benchmark output folder or delete that cell")
    complete = int(state["epoch"]) >= args.epochs or (
        args.max_steps is not None and int(state["global_step"]) >= args.max_steps)
    epoch = int(state["epoch"])
    if not complete:
        return "partial", epoch
    marker = _read_json(os.path.join(run_dir, "cell.json"))
    done = (marker is not None and marker.get("eval") == eval_settings(cfg, args.data_root)
            and int(marker.get("epoch", -1)) == epoch
            and os.path.isfile(os.path.join(run_dir, "metrics.json")))
    return ("done" if done else "trained"), epoch


def _save_scores(path: str, raw: Mapping[str, Mapping[str, Any]]) -> None:
    arrays: Dict[str, np.ndarray] = {}
    for score, per_set in raw.items():
        for set_name, value in per_set.items():
            if isinstance(value, Mapping):  # Mahalanobis 'paper' protocol: ID scores per OOD set
                for other, v in value.items():
                    arrays[f"{score}|{set_name}|{other}"] = np.asarray(v, dtype=np.float64)
            else:
                arrays[f"{score}|{set_name}"] = np.asarray(value, dtype=np.float64)
    atomic_write_bytes(path, lambda f: np.savez_compressed(f, **arrays))


def load_scores(path: str) -> Dict[str, Dict[str, Any]]:
    """The raw scores of a cell (``scores.npz``) as ``{score: {'id': ..., ood_set: array}}``."""
    out: Dict[str, Dict[str, Any]] = {}
    with np.load(path) as z:
        for key in z.files:
            parts = key.split("|")
            entry = out.setdefault(parts[0], {})
            if len(parts) == 3:
                entry.setdefault(parts[1], {})[parts[2]] = z[key]
            else:
                entry[parts[1]] = z[key]
    return out


def evaluate_cell(cfg: BenchConfig, args: argparse.Namespace, last_epoch: int) -> Dict[str, Any]:
    """Evaluate a trained cell; write ``metrics.json`` (+ report files), ``scores.npz``, then ``cell.json``."""
    from .pipeline import evaluate_checkpoint, write_report
    from .report import write_markdown

    run_dir = os.path.join(args.output, args.name)
    ckpt = os.path.join(run_dir, f"{cfg.checkpoint}.pt")
    t0 = time.time()
    result = evaluate_checkpoint(ckpt, ood_sets=expand_ood_sets(cfg, args.data_root), scores=cfg.scores,
                                 score_kwargs=cfg.score_args, convention=cfg.convention,
                                 data_root=args.data_root, batch_size=cfg.eval_batch_size, device=args.device,
                                 max_ood_samples=cfg.max_ood_samples, n_noise=cfg.n_noise)
    t_ood = time.time() - t0
    feats, labels = penultimate_test_features(ckpt, cfg.eval_batch_size, args.device)
    result["embedding"] = dict(embedding_quality(feats, labels, cfg.embedding_distance),
                               distance=cfg.embedding_distance, n=int(labels.numel()), dim=int(feats.shape[1]))
    result["cell"] = {"loss": args.loss, "seed": args.seed}
    _save_scores(os.path.join(run_dir, "scores.npz"), result["ood"]["scores"])
    if cfg.cell_plots:
        write_report(result, run_dir)
    else:  # metrics.json and results.md only
        metrics = {k: v for k, v in result.items() if k != "ood"}
        metrics["ood"] = {k: v for k, v in result["ood"].items() if k != "scores"}
        atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(
            metrics, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        write_markdown(result["ood"], os.path.join(run_dir, "results.md"))
    marker = {"loss": args.loss, "seed": args.seed, "epoch": last_epoch, "evaluated_epoch": int(result["epoch"]),
              "eval": eval_settings(cfg, args.data_root), "seconds_eval": round(time.time() - t0, 2),
              "seconds_ood": round(t_ood, 2)}
    atomic_write_text(os.path.join(run_dir, "cell.json"), json.dumps(marker, indent=2))
    return result


def run_cell(cfg: BenchConfig, loss: str, seed: int) -> str:
    """Bring one cell to done; return what it took: 'skipped', 'trained', 'resumed', 'evaluated', or
    'failed' (training diverged: ``failed.json`` records it and later runs skip the cell)."""
    from lossbench.engine import Trainer

    args = cell_args(cfg, loss, seed)
    run_dir = os.path.join(args.output, args.name)
    failed_path = os.path.join(run_dir, "failed.json")
    failed = _read_json(failed_path)
    if failed is not None:
        if failed.get("config") == _comparable(to_dict(args)):
            return "failed"
        os.unlink(failed_path)  # written for another recipe
    state, _ = cell_state(cfg, args)
    if state == "done":
        return "skipped"
    action = "evaluated"
    if state in ("new", "partial"):
        os.makedirs(run_dir, exist_ok=True)
        try:
            with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as log, \
                    contextlib.redirect_stdout(log):
                Trainer(args).fit()
        except FloatingPointError as err:  # the loss diverged: a result, not a crash of the benchmark
            atomic_write_text(failed_path, json.dumps(
                {"loss": loss, "seed": seed, "error": str(err), "config": _comparable(to_dict(args))}, indent=2))
            return "failed"
        action = "trained" if state == "new" else "resumed"
    state, last_epoch = cell_state(cfg, args)
    if state == "partial":
        raise RuntimeError(f"cell {run_dir!r} stopped at epoch {last_epoch} of {args.epochs}; see its train.log")
    evaluate_cell(cfg, args, last_epoch)
    return action


# -- leaderboard ----------------------------------------------------------------------------------

def set_label(name: str) -> str:
    """Short display name of an OOD set: ``imagefolder:<path>`` -> the folder's name."""
    if name.lower().startswith("imagefolder:"):
        return os.path.basename(os.path.normpath(name.split(":", 1)[1]))
    return name


def cell_values(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """Flat numbers of one cell's ``metrics.json``: acc, ece, p_at_1, map_at_r, and per score
    ``<score>/auroc``, ``<score>/fpr95`` (means over the OOD sets) and ``<score>/<set>/auroc|fpr95``."""
    out = {"acc": metrics["test"]["acc"], "ece": metrics["test"]["ece"],
           "p_at_1": metrics["embedding"]["p_at_1"], "map_at_r": metrics["embedding"]["map_at_r"]}
    for score, per_set in metrics["ood"]["results"].items():
        for key in ("auroc", "fpr95"):
            vals = [m[key] for m in per_set.values()]
            out[f"{score}/{key}"] = float(np.mean(vals))
            for set_name, m in per_set.items():
                out[f"{score}/{set_label(set_name)}/{key}"] = float(m[key])
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
            d = _cell_dir(cfg, loss, seed)
            if _read_json(os.path.join(d, "cell.json")) is None:
                continue
            m = _read_json(os.path.join(d, "metrics.json"))
            if m is not None:
                out.setdefault(loss, {})[seed] = m
    return out


def failures(cfg: BenchConfig) -> Dict[str, Dict[int, str]]:
    """``{loss: {seed: error}}`` of the cells whose training diverged (``failed.json``)."""
    out: Dict[str, Dict[int, str]] = {}
    for loss in cfg.losses:
        for seed in cfg.seeds:
            f = _read_json(os.path.join(_cell_dir(cfg, loss, seed), "failed.json"))
            if f is not None:
                out.setdefault(loss, {})[seed] = str(f.get("error", "diverged"))
    return out


def summarize(cells: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per loss: ``n`` seeds, ``seeds``, and ``{metric: (mean, std)}`` over seeds for every cell value."""
    rows: Dict[str, Dict[str, Any]] = {}
    for loss, per_seed in cells.items():
        values = [cell_values(m) for m in per_seed.values()]
        keys = [k for k in values[0] if all(k in v for v in values)]
        rows[loss] = {"n": len(values), "seeds": sorted(per_seed),
                      "stats": {k: mean_std([v[k] for v in values]) for k in keys}}
    return rows


def _fmt(ms: Tuple[float, float], bold: bool = False) -> str:
    mean, std = ms
    text = f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")
    return f"**{text}**" if bold else text


def leaderboard_markdown(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str], ood_sets: Sequence[str],
                         convention: str, title: str = "") -> str:
    """The leaderboard table: one row per loss, mean ± std over seeds in %, best mean in bold."""
    cols = [(k, METRIC_LABELS[k], k != "ece") for k in METRIC_LABELS]
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
        f"bold. acc = top-1 test accuracy, ECE = 15-bin expected calibration error (lower is better), "
        f"P@1 / MAP@R = precision@1 / MAP@R of the penultimate test features retrieving their own class "
        f"(pytorch-metric-learning AccuracyCalculator). AUROC and FPR@95 of each OOD score are the mean "
        f"over the OOD sets {', '.join(ood_sets)}; higher score = in-distribution; convention "
        f"`{convention}` ({CONVENTION_NOTES[convention]}).", "",
        "| loss | seeds | " + " | ".join(label for _, label, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for loss, r in rows.items():
        cells = [_fmt(r["stats"][k], bold=abs(r["stats"][k][0] - best[k]) < 1e-12) if k in r["stats"] else "-"
                 for k, _, _ in cols]
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


def _save_figure(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def _loss_colors(losses: Sequence[str]) -> Dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(losses) <= 10 else "tab20"]
    return {loss: cmap(i % cmap.N) for i, loss in enumerate(losses)}


def plot_acc_vs_auroc(rows: Mapping[str, Mapping[str, Any]], scores: Sequence[str], path: str) -> None:
    """Test accuracy vs mean AUROC per loss, error bars = sample std over seeds; one panel per score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(len(scores), 3)
    nrows = (len(scores) + cols - 1) // cols
    fig = Figure(figsize=(4.8 * cols, 4.0 * nrows))
    FigureCanvasAgg(fig)
    colors = _loss_colors(list(rows))
    for i, s in enumerate(scores):
        ax = fig.add_subplot(nrows, cols, i + 1)
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
    _save_figure(fig, path)


def plot_best_roc(cfg: BenchConfig, cells: Mapping[str, Mapping[int, Mapping[str, Any]]], path: str) -> Dict[str, Dict[str, int]]:
    """ROC curves (ID positive) of the best run per loss: rows = scores, columns = OOD sets.

    For each (score, loss), the best run is the seed with the highest AUROC of that score averaged
    over the OOD sets. Returns ``{score: {loss: seed}}``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    sets: List[str] = []
    for per_seed in cells.values():
        for m in per_seed.values():
            for per_set in m["ood"]["results"].values():
                sets += [s for s in per_set if s not in sets]
    fig = Figure(figsize=(3.8 * len(sets), 3.4 * len(cfg.scores)))
    FigureCanvasAgg(fig)
    chosen: Dict[str, Dict[str, int]] = {s: {} for s in cfg.scores}
    colors = _loss_colors(list(cells))
    raw_cache: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for i, score in enumerate(cfg.scores):
        for j, set_name in enumerate(sets):
            ax = fig.add_subplot(len(cfg.scores), len(sets), i * len(sets) + j + 1)
            for loss, per_seed in cells.items():
                ranked = [(np.mean([m["auroc"] for m in pm["ood"]["results"][score].values()]), seed)
                          for seed, pm in per_seed.items() if score in pm["ood"]["results"]]
                if not ranked:
                    continue
                seed = max(ranked)[1]
                chosen[score][loss] = seed
                if (loss, seed) not in raw_cache:
                    raw_cache[(loss, seed)] = load_scores(os.path.join(_cell_dir(cfg, loss, seed), "scores.npz"))
                entry = raw_cache[(loss, seed)].get(score, {})
                if set_name not in entry:
                    continue
                ids = entry["id"][set_name] if isinstance(entry["id"], Mapping) else entry["id"]
                y = np.r_[np.ones(len(ids)), np.zeros(len(entry[set_name]))]
                fpr, tpr, _ = roc_curve(y, np.r_[ids, entry[set_name]])
                ax.plot(fpr, tpr, linewidth=1, label=f"{loss} (s{seed})", color=colors[loss])
            ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
            ax.axhline(0.95, color="0.7", linewidth=0.8)
            ax.set_title(f"{score} vs {set_label(set_name)}", fontsize=9)
            ax.set_xlabel("OOD accepted (FPR)", fontsize=8)
            ax.set_ylabel("ID kept (TPR)", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    _save_figure(fig, path)
    return chosen


def write_leaderboard(cfg: BenchConfig, plots: bool = True) -> Dict[str, Any]:
    """Aggregate the finished cells into ``leaderboard.md`` / ``.csv`` and the plots; return the rows."""
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
    md = leaderboard_markdown(rows, cfg.scores, sets, cfg.convention, title) if rows else title + "\n"
    if failed:
        md += "\nDiverged, left out of the means above: " + "; ".join(
            f"{loss} seed {seed} ({err})" for loss, per in failed.items() for seed, err in per.items()) + ".\n"
    atomic_write_text(os.path.join(cfg.output, "leaderboard.md"), md)
    atomic_write_text(os.path.join(cfg.output, "leaderboard.csv"), leaderboard_csv(rows))
    chosen = None
    if plots and rows:
        plot_acc_vs_auroc(rows, cfg.scores, os.path.join(cfg.output, "acc_vs_auroc.png"))
        chosen = plot_best_roc(cfg, cells, os.path.join(cfg.output, "roc_best.png"))
    return {"rows": rows, "markdown": md, "best_runs": chosen}


# -- the whole benchmark --------------------------------------------------------------------------

def run_benchmark(cfg: BenchConfig, progress: bool = True, plots: bool = True) -> Dict[str, Any]:
    """Run every (loss, seed) cell (skipping finished ones), then write the leaderboard.

    Returns ``{'counts': {'trained', 'resumed', 'evaluated', 'skipped', 'failed'}, 'cells':
    {(loss, seed): action}, 'markdown', 'rows', 'seconds'}``.
    """
    from tqdm import tqdm

    t0 = time.time()
    os.makedirs(cfg.output, exist_ok=True)
    import yaml

    atomic_write_text(os.path.join(cfg.output, "bench.yaml"), yaml.safe_dump(asdict(cfg), sort_keys=False))
    grid = [(loss, seed) for loss in cfg.losses for seed in cfg.seeds]
    for loss in cfg.losses:  # fail fast on a bad loss config, before hours of training
        cell_args(cfg, loss, cfg.seeds[0])
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


def _int_list(text: str) -> List[int]:
    return [int(t) for t in text.replace(" ", ",").split(",") if t]


def _name_list(text: str) -> List[str]:
    return [t for t in text.replace(" ", ",").split(",") if t]


def build_parser_bench() -> argparse.ArgumentParser:
    """Options of ``eval.py bench``: the config file and the overrides a quick run needs."""
    p = argparse.ArgumentParser(
        prog="eval.py bench", description="Train every (loss, seed), evaluate every OOD score on every "
        "OOD set, and write a leaderboard (finished cells are skipped when run again).")
    p.add_argument("-c", "--config", required=True, help="benchmark YAML (e.g. configs/bench_digits.yaml)")
    p.add_argument("--out", default=None, help="benchmark folder (config key 'output')")
    p.add_argument("--losses", type=_name_list, default=None, help="comma-separated loss names, or 'all'")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--scores", type=_name_list, default=None, help="comma-separated OOD scores")
    p.add_argument("--ood", type=_name_list, default=None, help="comma-separated OOD sets")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs")
    p.add_argument("--model", default=None, help="train.model (a timm name)")
    p.add_argument("--img-size", type=int, default=None, help="train.img_size")
    p.add_argument("--max-train-samples", type=int, default=None, help="train.max_train_samples")
    p.add_argument("--data-root", default=None, help="train.data_root (folder of the data set files)")
    p.add_argument("--device", default=None, help="train.device: auto | cpu | cuda | cuda:N")
    p.add_argument("--train-args", type=json.loads, default=None,
                   help='JSON object of further train.py options, e.g. \'{"batch_size": 128}\'')
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the leaderboard plots")
    return p


def overrides_from(ns: argparse.Namespace) -> Dict[str, Any]:
    """Benchmark-config overrides from parsed ``eval.py bench`` options."""
    out: Dict[str, Any] = {}
    for flag, key in (("out", "output"), ("losses", "losses"), ("seeds", "seeds"), ("scores", "scores"),
                      ("ood", "ood_sets")):
        if getattr(ns, flag) is not None:
            out[key] = getattr(ns, flag)
    if out.get("losses") == ["all"]:
        out["losses"] = "all"
    train = dict(ns.train_args or {})
    for key in ("epochs", "model", "img_size", "max_train_samples", "data_root", "device"):
        if getattr(ns, key) is not None:
            train[key] = getattr(ns, key)
    if train:
        out["train"] = train
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``eval.py bench`` entry point."""
    import sys

    ns = build_parser_bench().parse_args(argv)
    try:
        cfg = load_config(ns.config, overrides_from(ns))
    except ConfigError as err:
        print(f"eval.py bench: error: {err}", file=sys.stderr)
        return 2
    res = run_benchmark(cfg, progress=not ns.no_progress, plots=not ns.no_plots)
    print(res["markdown"])
    c = res["counts"]
    print(f"cells: {len(res['cells'])} (trained {c['trained']}, resumed {c['resumed']}, evaluated {c['evaluated']}, "
          f"skipped {c['skipped']}, failed {c['failed']}) in {res['seconds']:.1f} s; "
          f"leaderboard in {cfg.output}")
    return 0
