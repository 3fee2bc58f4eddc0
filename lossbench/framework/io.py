"""The one way every output file is written: atomically (temp file in the same folder, fsync, rename).

A reader sees either the previous complete file or the new complete one, never a half-written
file, whatever moment the writer is killed at (SIGKILL included). Checkpoints, logs, JSON,
Markdown, CSV, PNG figures and npz arrays all go through :func:`atomic_write_bytes`.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

TEMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str, write_fn: Callable[[Any], Any]) -> None:
    """Call ``write_fn(fileobj)`` on a temp file next to ``path``, fsync, and rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=folder)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; an output file honours the umask
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


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) atomically to ``path``."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def to_jsonable(x: Any) -> Any:
    """``x`` with numpy / torch arrays and scalars turned into lists and Python numbers, and NaN / inf
    (undefined numbers, which strict JSON cannot hold) turned into ``None`` (``null``)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    elif hasattr(x, "tolist"):
        return to_jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (arrays become lists, NaN / inf become ``null``) atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False))


def atomic_save_figure(fig, path: str, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG in memory, then write it atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def atomic_save_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` of ``arrays`` written atomically to ``path``."""
    atomic_write_bytes(path, lambda f: np.savez_compressed(f, **arrays))


def read_json(path: str) -> Optional[Any]:
    """The JSON content of ``path``, or ``None`` if it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_stale_temp_files(folder: str) -> None:
    """Delete the temp files a killed writer left behind in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(TEMP_SUFFIX):
            os.unlink(os.path.join(folder, name))
