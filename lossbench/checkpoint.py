"""Atomic checkpoints: written to a temporary file in the same folder, flushed, then renamed.

A reader therefore sees either the previous complete checkpoint or the new complete one, never a
half-written file, whatever moment the writer is killed at (SIGKILL included).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Iterable

import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "epoch", "global_step", "config")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the run it is loaded into."""


def atomic_write_bytes(path: str, write_fn) -> None:
    """Call ``write_fn(fileobj)`` on a temp file next to ``path``, fsync, and rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Save ``state`` (see :data:`REQUIRED_KEYS`) atomically to ``path``."""
    state = dict(state, format_version=FORMAT_VERSION)
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, map_location: Any = "cpu", required: Iterable[str] = REQUIRED_KEYS) -> Dict[str, Any]:
    """Load a checkpoint; a missing, truncated, corrupt or foreign file raises :class:`CheckpointError`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
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
