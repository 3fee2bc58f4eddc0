"""The benchmark configuration: its keys, their checks, and the train.py options of each cell."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ood import CONVENTIONS, list_scores

from ...errors import UserInputError
from ...framework.cli import parse_list
from ...framework.config import ConfigError, apply_config, build_parser, check_loss_args, load_yaml, validate
from ...framework.ood_sets import ood_set_kind
from ...framework.plugins import load_plugins, plugin_list
from ...registry import list_losses
from ..embedding import EMBEDDING_DISTANCES
from ..evaluate_run import check_score_kwargs


#: Keys of a benchmark config besides ``train``; see :class:`BenchConfig` for their meaning.
BENCH_KEYS = ("output", "train", "losses", "loss_args", "loss_configs", "seeds", "ood_sets", "val_ood_set",
              "search", "scores", "score_args", "convention", "checkpoint", "max_ood_samples", "n_noise",
              "eval_batch_size", "embedding_distance", "cell_plots")
#: train.py options the benchmark sets per cell; a config's ``train`` section may not set them.
PER_CELL_KEYS = ("loss", "loss_args", "seed", "output", "name", "resume", "stop_after_epochs", "config")


@dataclass
class BenchConfig:
    """A resolved benchmark configuration.

    ``output``: the benchmark folder; ``train``: train.py options shared by every cell;
    ``losses`` / ``seeds``: the grid; ``loss_args``: per-loss overrides of the hyper-parameters read
    from ``loss_configs/<loss>.yaml``; ``ood_sets`` / ``scores`` / ``score_args`` / ``convention``:
    the evaluation (:func:`lossbench.experiments.evaluate_run.evaluate_checkpoint`); ``ood_sets`` is
    a list or ``{group: [sets]}`` (OpenOOD's near / far: tables add each group's mean);
    ``val_ood_set``: the validation OOD set (never a test set) on which ``search: true`` chooses every
    score's grid point (:mod:`ood.search`); ``checkpoint``: ``'last'`` (the
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
    ood_groups: Optional[Dict[str, List[str]]] = None
    val_ood_set: Optional[str] = None
    search: bool = False
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


def _names(value: Any, key: str) -> List[str]:
    names = parse_list(value, str, key) if isinstance(value, (str, list, tuple)) else None
    if not names or not all(isinstance(v, str) for v in (value if isinstance(value, (list, tuple)) else names)):
        raise ConfigError(f"{key} must be a non-empty list of names, got {value!r}")
    return names


def _ood_sets(value: Any) -> Tuple[List[str], Optional[Dict[str, List[str]]]]:
    """(flat list, groups or None) from a list of set names or a ``{group: [names]}`` mapping."""
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError("ood_sets must be a non-empty list of names or {group: [names]}, got {}")
        groups = {str(g): _names(v, f"ood_sets.{g}") for g, v in value.items()}
        flat = [n for v in groups.values() for n in v]
    else:
        groups, flat = None, _names(value, "ood_sets")
    dup = sorted({n for n in flat if flat.count(n) > 1})
    if dup:
        raise ConfigError(f"ood_sets names {dup} more than once; each OOD set belongs to one group")
    for name in flat:
        _check_ood_name(name, "ood_sets")
    return flat, groups


def _check_ood_name(name: str, key: str) -> None:
    """:class:`ConfigError` naming ``key`` for an OOD set name that no data could make (files are checked
    when the benchmark starts, once ``{data_root}`` is known: :func:`check_cell_inputs`)."""
    try:
        ood_set_kind(name)
    except UserInputError as err:
        raise ConfigError(f"{key}: {err}") from None


def _seeds(value: Any) -> List[int]:
    try:
        seeds = parse_list(value, int, "seeds")
    except ValueError:
        raise ConfigError(f"seeds must be a non-empty list of integers, got {value!r}") from None
    if not seeds:
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
        raise ConfigError(f"{key} names {what} names that are not benchmarked: {unknown}; benchmarked: {list(valid)}")
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
    try:  # the plug-ins first: they register loss and score names checked below
        load_plugins(plugin_list(train.get("plugin")), f"train.plugin in {source}")
    except UserInputError as err:
        raise ConfigError(str(err)) from None
    per_cell = sorted(k for k in train if str(k).replace("-", "_") in PER_CELL_KEYS)
    if per_cell:
        raise ConfigError(f"train option(s) {per_cell} in {source} are set per cell by the benchmark; "
                          f"use the benchmark keys losses / loss_args / seeds / output instead")
    all_losses = list_losses()
    losses = all_losses if data.get("losses", "all") in ("all", ["all"]) else _names(data["losses"], "losses")
    bad = [n for n in losses if n not in all_losses]
    if bad:
        raise ConfigError(f"unknown loss name(s) {bad} in {source}; expected names from {all_losses} or 'all'")
    scores = data.get("scores", ["msp", "energy", "maxlogit", "mahalanobis"])
    scores = list_scores() if scores in ("all", ["all"]) else _names(scores, "scores")
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
    ood_sets, ood_groups = _ood_sets(data.get("ood_sets", ["gaussian", "uniform"]))
    val_ood = data.get("val_ood_set")
    if val_ood is not None and (not isinstance(val_ood, str) or not val_ood):
        raise ConfigError(f"val_ood_set must be one OOD set name, got {val_ood!r}")
    if val_ood is not None:
        _check_ood_name(val_ood, "val_ood_set")
    if val_ood is not None and val_ood in ood_sets:
        raise ConfigError(f"val_ood_set {val_ood!r} is also a test OOD set; the validation OOD set must be another set")
    search = data.get("search", False)
    if not isinstance(search, bool):
        raise ConfigError(f"search must be true or false, got {search!r}")
    if search and val_ood is None:
        raise ConfigError("search: true needs val_ood_set, the validation OOD set the grid search is run on")
    loss_configs = data.get("loss_configs")
    loss_configs = base_dir if loss_configs is None else (
        loss_configs if os.path.isabs(loss_configs) else os.path.join(base_dir, loss_configs))
    cfg = BenchConfig(
        output=str(data.get("output") or os.path.join("runs", "bench")), train=train, losses=losses,
        seeds=_seeds(data.get("seeds", [0, 1, 2])), ood_sets=ood_sets, ood_groups=ood_groups,
        val_ood_set=val_ood, search=search, scores=scores, loss_args=_nested(data.get("loss_args"), "loss_args", losses, "loss"),
        loss_configs=loss_configs, score_args=_nested(data.get("score_args"), "score_args", scores, "score"),
        convention=convention, checkpoint=checkpoint, max_ood_samples=data.get("max_ood_samples", 2000),
        n_noise=int(data.get("n_noise", 1000)), eval_batch_size=int(data.get("eval_batch_size", 256)),
        embedding_distance=distance, cell_plots=bool(data.get("cell_plots", True)),
    )
    for loss in losses:  # every loss's arguments (its loss config + overrides), before any training
        check_loss_args(loss, loss_args_for(cfg, loss), f"loss_args of {loss!r}")
    try:
        check_score_kwargs(scores, cfg.score_args, "score_args")
    except UserInputError as err:
        raise ConfigError(str(err)) from None
    return cfg


def load_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> BenchConfig:
    """Read a benchmark YAML file; ``overrides`` (benchmark keys, plus ``train`` entries merged) win.

    The file is checked as written first; where ``overrides`` narrow ``losses`` or ``scores`` (``bench.py
    --losses focal``), the file's ``loss_args`` / ``score_args`` for names left out are dropped.
    ``loss_args`` / ``score_args`` overrides update the file's arguments of each name they give.
    """
    data = dict(load_yaml(path))
    overrides = dict(overrides or {})
    narrowed = [(grid, per_name) for grid, per_name in (("losses", "loss_args"), ("scores", "score_args"))
                if grid in overrides and data.get(per_name)]
    if narrowed:
        whole = resolve_config(data, path, os.path.dirname(os.path.abspath(path)))
        grid = resolve_config({k: overrides[k] for k, _ in narrowed}, "the command line")
        for key, per_name in narrowed:
            kept = set(getattr(grid, key))
            data[per_name] = {k: v for k, v in getattr(whole, per_name).items() if k in kept}
    for key, value in (overrides or {}).items():
        if key == "train":
            old = data.get("train") or {}
            data["train"] = {**old, **value}
            if "plugin" in value and old.get("plugin"):  # both the config's plug-ins and the command line's
                mine = plugin_list(old["plugin"])
                data["train"]["plugin"] = mine + [p for p in plugin_list(value["plugin"]) if p not in mine]
        elif key in ("loss_args", "score_args") and isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
            merged = dict(data[key])  # per name: the override's arguments update the file's (checked below)
            for name, args in value.items():
                both = isinstance(merged.get(name), Mapping) and isinstance(args, Mapping)
                merged[name] = {**merged[name], **args} if both else args
            data[key] = merged
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


def _expand(name: str, data_root: Optional[str]) -> str:
    if "{data_root}" in name:
        if data_root is None:
            raise ConfigError(f"OOD set {name!r} uses {{data_root}} but train.data_root is not set")
        name = name.replace("{data_root}", data_root)
    return name


def expand_ood_sets(cfg: BenchConfig, data_root: Optional[str]) -> List[str]:
    """OOD set names with ``{data_root}`` replaced by ``data_root`` (the train section's)."""
    return [_expand(n, data_root) for n in cfg.ood_sets]


def eval_ood_sets(cfg: BenchConfig, data_root: Optional[str]) -> Any:
    """What :func:`evaluate_model` takes as ``ood_sets``: the flat list, or ``{group: [sets]}``."""
    if cfg.ood_groups is None:
        return expand_ood_sets(cfg, data_root)
    return {g: [_expand(n, data_root) for n in v] for g, v in cfg.ood_groups.items()}


def eval_val_ood(cfg: BenchConfig, data_root: Optional[str]) -> Optional[str]:
    return None if cfg.val_ood_set is None else _expand(cfg.val_ood_set, data_root)


def check_cell_inputs(cfg: BenchConfig) -> None:
    """Before any cell runs: every loss's train options (:func:`cell_args`) and every OOD set, test and
    validation, with ``{data_root}`` expanded (:func:`~lossbench.framework.ood_sets.check_ood_sets`:
    the data set files are there, ``heldout`` only where the data holds classes out)."""
    from ...framework.ood_sets import check_ood_sets, holds_classes_out

    for loss in cfg.losses:
        args = cell_args(cfg, loss, cfg.seeds[0])
    names = expand_ood_sets(cfg, args.data_root)
    if cfg.val_ood_set is not None:
        names.append(eval_val_ood(cfg, args.data_root))
    check_ood_sets(names, args.data_root, download=args.download, data=args.data,
                   has_heldout=holds_classes_out(args.data, args.id_classes))


def eval_settings(cfg: BenchConfig, data_root: Optional[str]) -> Dict[str, Any]:
    """What a cell's evaluation depends on besides its weights; ``cell.json`` records it."""
    return json.loads(json.dumps({
        "ood_sets": expand_ood_sets(cfg, data_root), "scores": cfg.scores, "score_args": cfg.score_args,
        "convention": cfg.convention, "checkpoint": cfg.checkpoint, "max_ood_samples": cfg.max_ood_samples,
        "n_noise": cfg.n_noise, "embedding_distance": cfg.embedding_distance,
        "calibration": {"n_bins": 15, "temperature_scaling": "val"},  # cells evaluated without it are re-evaluated
        # the protocol keys only when used, so that cells evaluated before they existed stay done
        **({"ood_groups": eval_ood_sets(cfg, data_root)} if cfg.ood_groups is not None else {}),
        **({"val_ood_set": eval_val_ood(cfg, data_root), "search": cfg.search} if cfg.val_ood_set else {}),
    }))
