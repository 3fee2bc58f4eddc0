"""Checkpoints (written atomically by :mod:`lossbench.framework.io`) and the one resume check.

:func:`check_resumable` decides whether a saved run may be continued with the options now in force:
the trainer and the benchmark both call it, so they accept and refuse the same changes.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from ..errors import UserInputError
from ..integrity import zip_damage
from .io import atomic_write_bytes

FORMAT_VERSION = 1
#: Options that may differ between a run and its resumption: they control how it runs, not what it computes.
RUN_CONTROL_KEYS = ("resume", "no_progress", "stop_after_epochs", "device", "workers", "output", "compile",
                    "decode_once", "cache_dir", "device_augment", "tta", "plugin")
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "epoch", "global_step", "config")
#: What evaluating a checkpoint needs (:func:`~lossbench.framework.builders.load_run`): ``best.pt`` holds
#: these (and the run's record: metrics, log, classes) but no training state.
WEIGHTS_KEYS = ("format_version", "model", "epoch", "config")
#: The state only resuming needs; :func:`weights_only` drops it (a weights-only ``best.pt`` is about a
#: third of ``last.pt`` for an AdamW run, whose two moment buffers are each the size of the weights).
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "averager", "rng")


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the run it is loaded into."""


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Save ``state`` (see :data:`REQUIRED_KEYS`) atomically to ``path``."""
    state = dict(state, format_version=FORMAT_VERSION)
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def weights_only(state: Mapping[str, Any]) -> Dict[str, Any]:
    """``state`` without the training state (:data:`TRAINING_STATE_KEYS`): what ``best.pt`` holds.

    The weights, configuration, epoch, step, best accuracy and log stay, so the file evaluates
    (:func:`~lossbench.framework.builders.load_run`) and says which epoch it is (:func:`stale_best`);
    resuming always reads ``last.pt``, which keeps everything.
    """
    return {k: v for k, v in state.items() if k not in TRAINING_STATE_KEYS}


def load_checkpoint(path: str, map_location: Any = "cpu", required: Iterable[str] = REQUIRED_KEYS) -> Dict[str, Any]:
    """Load a checkpoint; a missing, truncated, damaged, corrupt or foreign file raises :class:`CheckpointError`.

    ``required``: the keys it must hold (default: a full training state, as resuming needs;
    :data:`WEIGHTS_KEYS` for evaluation, which also accepts a weights-only ``best.pt``).

    Every member's CRC-32 is checked first (:func:`lossbench.integrity.zip_damage`), so a flipped
    byte or a zeroed block inside a tensor record is an error, not silently different weights.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    damage = zip_damage(path)  # torch.load does not check the CRC-32s torch.save writes
    if damage is not None:
        raise CheckpointError(f"checkpoint {path!r} is damaged: {damage}; it changed after it was written "
                              f"(disk or copy error), so its weights cannot be trusted")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # pickle/zip errors of a truncated or foreign file
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a lossbench checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} is not a lossbench checkpoint (got {type(state).__name__})")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}; it is not a complete lossbench checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format_version {state['format_version']}, expected {FORMAT_VERSION}")
    return state


def best_epoch_of(state: Mapping[str, Any]) -> int:
    """The epoch a run's ``best.pt`` should hold, by the state in its ``last.pt`` (0: none yet).

    ``best_epoch`` where the state stores it; for states written before it was stored, the first
    logged epoch with the highest ``val_acc`` (the trainer keeps a new best only when strictly higher).
    """
    if "best_epoch" in state:
        return int(state["best_epoch"])
    best, best_acc = 0, None
    for row in state.get("log", []):
        acc = row.get("val_acc")
        if acc is not None and (best_acc is None or acc > best_acc):
            best, best_acc = int(row["epoch"]), acc
    return best


def stale_best(run_dir: str) -> Optional[str]:
    """Why ``<run_dir>/best.pt`` is not the best epoch ``last.pt`` records, or ``None`` when it is (or cannot tell).

    A run killed between writing ``last.pt`` and ``best.pt`` has ``best.pt`` one best epoch behind
    until it is resumed. Only the pickled metadata is read (``mmap``): this is a cheap look, not a
    check of the files (``load_checkpoint`` does that).
    """
    def epochs(path: str) -> Optional[Mapping[str, Any]]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # missing, damaged or foreign: the loader reports it
            return None
        return state if isinstance(state, dict) and "epoch" in state else None

    last, best = epochs(os.path.join(run_dir, "last.pt")), epochs(os.path.join(run_dir, "best.pt"))
    if last is None or best is None:
        return None
    want = best_epoch_of(last)
    if want <= 0 or int(best["epoch"]) == want:
        return None
    return (f"{os.path.join(run_dir, 'best.pt')!r} holds epoch {int(best['epoch'])}, but last.pt records epoch {want} "
            f"as the best (the run was stopped while saving)")


def comparable_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of a run's configuration that must match for a resume (JSON-normalised).

    Options a saved configuration predates read as :data:`~lossbench.framework.config.LEGACY_CONFIG`
    (what such a run did), so old runs resume when the new options keep their behaviour.
    """
    from .config import LEGACY_CONFIG

    merged = {**LEGACY_CONFIG, **config}
    return json.loads(json.dumps({k: v for k, v in merged.items() if k not in RUN_CONTROL_KEYS}, default=str))


#: Constructor arguments that come from the data and the backbone, not from ``loss_args``.
_SIZED_BY_THE_MODEL = ("num_classes", "in_features")


def resolved_loss_args(loss: Any, loss_args: Any) -> Dict[str, Any]:
    """``loss_args`` completed with the defaults of loss ``loss``'s constructor (JSON-normalised).

    ``{}`` and ``{'label_smoothing': 0.0}`` build the same ``ce`` loss, so they resolve to the same
    mapping. An unknown loss name (or a non-mapping) is returned as given, for the caller to compare.
    """
    from ..errors import UnknownNameError
    from ..registry import get_loss_entry

    if not isinstance(loss_args, Mapping):
        return loss_args
    try:
        params = inspect.signature(get_loss_entry(str(loss)).constructor).parameters
    except UnknownNameError:
        return dict(loss_args)
    defaults = {name: p.default for name, p in params.items()
                if p.default is not inspect.Parameter.empty and name not in _SIZED_BY_THE_MODEL
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return json.loads(json.dumps({**defaults, **loss_args}, default=str))


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """``'key: old -> new'`` for every key outside :data:`RUN_CONTROL_KEYS` whose value changed.

    A key that only one side has (an option added after the run was saved) counts as unchanged
    when the other side holds that option's default. ``loss_args`` are compared resolved against
    the loss's defaults (:func:`resolved_loss_args`), one ``loss_args.<name>`` entry per changed value,
    so spelling out a default (``configs/ce.yaml``) is not a change.
    """
    from .config import build_parser

    defaults = comparable_config(vars(build_parser().parse_args([])))
    a, b = comparable_config(saved), comparable_config(now)
    for key in set(a) ^ set(b):
        if key in defaults:
            a.setdefault(key, defaults[key])
            b.setdefault(key, defaults[key])
    for side in (a, b):
        args = resolved_loss_args(side.get("loss"), side.pop("loss_args", {}))
        if isinstance(args, dict):
            side.update({f"loss_args.{k}": v for k, v in args.items()})
        else:
            side["loss_args"] = args
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resumable(saved: Mapping[str, Any], now: Mapping[str, Any], what: str, hint: str) -> None:
    """:class:`CheckpointError` naming ``what`` and the changed options if ``saved`` cannot be resumed as ``now``."""
    diff = config_changes(saved, now)
    if diff:
        raise CheckpointError(f"{what} was written with a different configuration ({', '.join(diff)}); {hint}")
