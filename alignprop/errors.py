"""Errors a user can fix: a wrong config value, missing or broken weights, a bad prompt file, an unwritable run folder.

Each message names what was looked for (key, value, path) and what to do about it. `scripts/train.py`
prints the message of a `UserError` alone, without a traceback of library internals; the original
exception stays chained (`__cause__`) for anyone who calls the package from Python.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """One or more config values are wrong; the message names each key, its value and what is valid."""


def offline_hint(key):
    """What to do when weights named by config `key` are neither local nor downloadable."""
    return (
        f"Check the name for typos. If this machine is offline (HF_HUB_OFFLINE=1, or no network), download the "
        f"weights elsewhere (e.g. `hf download <id>`) and either copy the hub cache (HF_HOME) here "
        f"or point `{key}` at a local copy."
    )


def library_message(error):
    """`Type: message` of a library's exception, without its pointers to a traceback the user is not shown."""
    text = str(error).replace("Please check out the root cause in the stacktrace above.", "").strip()
    return f"{type(error).__name__}: {text}"


def first_line(error, limit=200):
    """The first line of `library_message(error)`, at most `limit` characters: a file reader's error in brief."""
    return library_message(error).splitlines()[0][:limit]
