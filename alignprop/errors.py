"""Errors a user can fix: a wrong config value, missing or broken weights, a bad prompt file, an unwritable run folder.

Each message names what was looked for (key, value, path) and what to do about it. `scripts/train.py`
prints the message of a `UserError` alone, without a traceback of library internals; the original
exception stays chained (`__cause__`) for anyone who calls the package from Python.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """One or more config values are wrong; the message names each key, its value and what is valid."""

