"""Exceptions that mean "the caller asked for something invalid" (not a bug in lossbench).

Scripts print these as one line ``<script>: error: <message>`` and exit with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """An argument, name, file or configuration given by the user is invalid."""


class UnknownNameError(UserInputError):
    """A registry was asked for a name it does not hold."""


class UnknownArgumentError(UserInputError, TypeError):
    """A constructor was given a keyword it does not take (a ``TypeError``, as Python's own)."""
