"""User-facing errors: each message names the setting or file at fault and the fix. The CLI prints one line."""

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


class DataError(RuntimeError):
    """A data problem; the message names the file and the fix."""


class ModelError(RuntimeError):
    """A model problem; the message names the setting and the fix."""


# What every launcher turns into one `error:` line and exit status 2 (anything else is a bug: full traceback).
USER_ERRORS = (ConfigError, DataError, ModelError, FileExistsError, FileNotFoundError, ValueError)


def fail(message: str) -> int:
    """Print one `error:` line for the user and return the exit status of a user error."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_command(body: Callable[[], int | None]) -> int:
    """Every launcher's body runs through this: a user error (`USER_ERRORS`) becomes one `error:` line and exit
    status 2; anything else is a bug and keeps its traceback. Returns the exit status (None counts as 0)."""
    try:
        return body() or 0
    except USER_ERRORS as exc:
        return fail(str(exc))
