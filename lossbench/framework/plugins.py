"""``--plugin``: import the user's own modules before a script reads the loss and score registries.

A plug-in is an ordinary Python module that registers what it defines at import time
(``@lossbench.register_loss(...)``, ``@ood.register_score(...)``). ``train.py``, ``eval.py`` and
``bench.py`` take ``--plugin MODULE`` (repeatable): a module name importable from the current folder
(``my_losses``, ``pkg.scores``; the current folder is put on ``sys.path`` as ``python -m`` does),
or the path of a ``.py`` file. Each is imported once per process, before any option that names a
loss or a score is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..errors import UserInputError

_LOADED: Dict[str, ModuleType] = {}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def load_plugin(spec: str, flag: str = "--plugin") -> ModuleType:
    """Import plug-in ``spec`` (a module name or a ``.py`` path) once; :class:`UserInputError` naming
    ``flag`` when it cannot be found. An error raised by the plug-in's own code propagates as it is."""
    spec = str(spec).strip()
    if not spec:
        raise UserInputError(f"{flag} must name a module or a .py file, got an empty value")
    if _is_path(spec):
        path = os.path.realpath(spec)
        if path in _LOADED:
            return _LOADED[path]
        if not os.path.isfile(path):
            raise UserInputError(f"{flag} {spec!r}: no such file (give a .py file or a module name importable "
                                 f"from the current folder {os.getcwd()!r})")
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        name = f"lossbench_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserInputError(f"{flag} {spec!r} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # before running it, as import does (dataclasses, pickling)
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _LOADED[path] = module
        return module
    if not _MODULE_NAME.match(spec):
        raise UserInputError(f"{flag} {spec!r} is neither a module name (dotted identifiers) nor a .py file")
    if spec in _LOADED:
        return _LOADED[spec]
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(spec)
    except ModuleNotFoundError as err:
        parts = spec.split(".")
        if err.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise  # the plug-in itself imports something that is missing: its own error
        raise UserInputError(f"{flag} {spec!r}: no module of that name is importable from the current folder "
                             f"{cwd!r} or the installed packages (give the module name, or the path of a .py "
                             f"file)") from None
    _LOADED[spec] = module
    return module


def plugin_list(value: Any) -> List[str]:
    """A configuration's ``plugin`` value as a list: ``None`` -> ``[]``, one name or path -> ``[it]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserInputError(f"plugin must be a module name or .py path, or a list of them, got {value!r}")


def load_plugins(specs: Optional[Iterable[str]], flag: str = "--plugin") -> List[ModuleType]:
    """:func:`load_plugin` for each of ``specs`` (``None``: none), in order."""
    return [load_plugin(s, flag) for s in (specs or [])]


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """The ``--plugin`` option, as every script spells it."""
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (a module name importable from the current folder, or a .py "
                             "file; repeatable) so the losses and scores it registers can be named")


def preload_plugins(argv: Optional[Sequence[str]]) -> List[ModuleType]:
    """Import the ``--plugin`` modules of command line ``argv`` (``None``: ``sys.argv[1:]``) before
    the script builds its parser, so help texts and name checks see what they register."""
    pre = argparse.ArgumentParser(add_help=False)
    add_plugin_option(pre)
    ns, _ = pre.parse_known_args(argv)
    return load_plugins(ns.plugin)
