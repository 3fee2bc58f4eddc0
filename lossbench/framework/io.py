"""The one way every output file is written: atomically (temp file in the same folder, fsync, rename).

A reader sees either the previous complete file or the new complete one, never a half-written
file, whatever moment the writer is killed at (SIGKILL included). Checkpoints, logs, JSON,
Markdown, CSV, PNG figures and npz arrays all go through :func:`atomic_write_bytes`.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

TEMP_SUFFIX = ".tmp"


#: errno values that mean the file system has no room left: device full, quota exceeded, file too large.
NO_SPACE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e is not None)


class WriteFailedError(OSError):
    """Writing an output file failed (a full disk, an I/O error); the previous file at that path is unchanged."""


def _io_failure(err: BaseException) -> Optional[BaseException]:
    """The exception in ``err``'s chain that says the write itself failed, or ``None`` (a bug in the writer).

    That is an :class:`OSError`, or the ``RuntimeError`` of torch's zip writer
    (``[enforce fail at inline_container.cc] unexpected pos``) that follows a failed ``write`` when
    ``torch.save`` writes to a file object.
    """
    seen, todo, torch_zip = set(), [err], None
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e) and torch_zip is None:
            torch_zip = e
        todo += [e.__cause__, e.__context__]
    return torch_zip


def _write_failed(path: str, failure: BaseException) -> WriteFailedError:
    code = failure.errno if isinstance(failure, OSError) else None
    if code in NO_SPACE_ERRNOS:
        why = f"the disk is full ({os.strerror(code)})"
    elif isinstance(failure, OSError):
        why = f"{type(failure).__name__}: {failure.strerror or failure}"
    else:  # torch's zip writer lost bytes without saying why: in practice, a full disk
        why = f"the data did not reach the file, the disk may be full ({str(failure).strip()})"
    err = WriteFailedError(f"writing {path!r} failed: {why}; the previous {os.path.basename(path)!r}, "
                           f"if there was one, is unchanged")
    err.errno = code or errno.EIO
    return err


def atomic_write_bytes(path: str, write_fn: Callable[[Any], Any]) -> None:
    """Call ``write_fn(fileobj)`` on a temp file next to ``path``, fsync, and rename it to ``path``.

    If the write fails (:func:`_io_failure`: an :class:`OSError` such as ENOSPC, or torch's zip
    writer error that follows one), the temp file is removed and :class:`WriteFailedError` names
    ``path`` and the cause; whatever was at ``path`` before is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp: Optional[str] = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=folder)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; an output file honours the umask
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        failure = _io_failure(err) if isinstance(err, Exception) else None
        if failure is None or isinstance(err, WriteFailedError):
            raise
        raise _write_failed(path, failure) from err


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
