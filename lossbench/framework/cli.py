"""What every script shares: the one list parser and the one-line handling of user errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, List, Optional, Sequence, Type, Union

from ..errors import UserInputError
from .io import WriteFailedError

#: Exceptions that mean the user asked for something invalid, or an output file could not be written
#: (a full disk: the user's to fix, not a bug): printed as one line, exit status 2.
USER_ERRORS = (UserInputError, FileNotFoundError, FileExistsError, WriteFailedError)


def parse_list(value: Union[str, int, Sequence[Any], None], item: Type = str, name: str = "value") -> List[Any]:
    """A list from ``'a,b c'`` (commas and/or whitespace), a single value, or a sequence.

    Each element is converted with ``item`` (``str`` or ``int``); an element ``item`` rejects raises
    :class:`~lossbench.errors.UserInputError` naming ``name``. ``None`` gives ``[]``.
    """
    if value is None:
        return []
    if isinstance(value, str):
        parts: Sequence[Any] = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        parts = value
    else:
        parts = [value]
    out = []
    for p in parts:
        if item is int and (isinstance(p, bool) or (isinstance(p, float) and p != int(p))):
            raise UserInputError(f"{name} must hold integers, got {p!r}")
        try:
            out.append(item(p))
        except (TypeError, ValueError):
            raise UserInputError(f"{name} must hold {item.__name__} values, got {p!r}") from None
    return out


def list_type(item: Type = str, name: str = "value") -> Callable[[str], List[Any]]:
    """An argparse ``type=`` that parses a comma/space-separated list with :func:`parse_list`."""

    def parse(text: str) -> List[Any]:
        try:
            return parse_list(text, item, name)
        except UserInputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = f"{item.__name__} list"
    return parse


def run_main(prog: str, main: Callable[[Optional[Sequence[str]]], int],
             argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's ``main(argv)``; a user error prints ``<prog>: error: <message>`` and returns 2.

    Any other exception is a bug and propagates with its traceback.
    """
    try:
        return main(argv)
    except USER_ERRORS as err:
        message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
