"""One error type for bad user input and one wrapper that turns it into a clean CLI exit."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class SDDMError(Exception):
    """A problem with the user's input or environment (a file, a value, a folder).

    The message must name the offending file or option and say what is wrong with it.
    Command-line entry points print it without a traceback and exit with code 2.
    """


def cli_entry(fn: F) -> F:
    """Decorate a console-script ``main``: ``SDDMError`` -> message on stderr and exit 2,
    Ctrl-C -> exit 130. Any other exception keeps its traceback (it is a bug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except SDDMError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if isinstance(result, int) and result != 0:
            sys.exit(result)
        return result

    return wrapper  # type: ignore[return-value]
