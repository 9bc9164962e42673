"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user mistake."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake the user can fix (unknown LM, bad config value, missing GPU, corrupt file...).

    Entry points catch it and print ``error: <message>`` on one line, exiting with status 2.
    """

    exit_code = 2


def fail(message: str) -> None:
    """Print one error line to stderr and exit non-zero."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(UserError.exit_code)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for task functions: turn :class:`UserError` into one line + exit 2.

    Anything else is a bug in the lab and keeps its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
            raise SystemExit(130)

    return wrapper
