"""Progress bars: tqdm on a terminal, a few plain lines in a log file.

tqdm redraws its bar with carriage returns many times a second; written to a file (``cmd > log
2>&1``, a batch scheduler, CI) that grows to megabytes of one "line". ``progress_bar`` returns a
normal tqdm bar when standard error is a terminal, and otherwise one that writes a complete,
newline-terminated status line at most every ``LOG_INTERVAL`` seconds (and once at the end).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Optional

from tqdm import tqdm

#: Seconds between two status lines when standard error is not a terminal.
LOG_INTERVAL = 30.0


class _Lines:
    """A stream that passes on whole lines only: tqdm's bare ``\r`` and ``\n`` writes are dropped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            self.stream.write(text.strip("\r\n") + "\n")

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


class _LogLines(tqdm):
    """tqdm that prints each refresh as its own line (no carriage returns, no cursor moves)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["file"] = _Lines(kwargs.get("file") or sys.stderr)
        self._last_line = -float("inf")
        self._closing = False
        super().__init__(*args, **kwargs)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        # forced refreshes (set_postfix, set_description) would print between the intervals too
        now = time.monotonic()
        if not self._closing and now - self._last_line < self.mininterval:
            return True
        self._last_line = now
        self.fp.write(self.__str__() if msg is None else msg)
        self.fp.flush()
        return True

    def close(self) -> None:
        self._closing = True
        super().close()


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, desc: str = "", total: Optional[int] = None,
                 unit: str = "it", disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on standard error (see the module docstring); ``disable`` hides it entirely."""
    if is_terminal(kwargs.get("file")):
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL)
    kwargs.setdefault("maxinterval", LOG_INTERVAL)
    return _LogLines(iterable, desc=desc, total=total, unit=unit, disable=disable, ascii=True, ncols=80, **kwargs)
