"""A one-line progress bar for a terminal, with no dependency.

Used by the command line for the model load and the first-run download of the
default model. It draws nothing unless its stream is a terminal and the task has
already taken ``delay`` seconds: a fast load stays silent, a log file stays clean.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, TextIO


class ProgressBar:
    """``update(fraction)`` redraws ``label [#####.....]  42%`` in place; ``close()`` erases it.

    ``enabled=None`` means "when ``stream`` is a terminal". Redraws happen only when the
    shown percentage changes, so calling ``update`` thousands of times is cheap.
    """

    def __init__(self, label: str, stream: Optional[TextIO] = None, delay: float = 0.5, width: int = 30,
                 enabled: Optional[bool] = None, clock: Callable[[], float] = time.monotonic) -> None:
        import sys

        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.delay = delay
        self.width = width
        self._clock = clock
        self._start = clock()
        self._percent = -1  # the percentage on screen; -1 while nothing is drawn
        self._line_length = 0

    @property
    def shown(self) -> bool:
        """True once the bar has been drawn (and until ``close()`` erases it)."""
        return self._percent >= 0

    def update(self, fraction: float, suffix: str = "") -> None:
        """Show ``fraction`` (clamped to 0..1) done, once the task has run ``delay`` seconds."""
        if not self.enabled:
            return
        if self._percent < 0 and self._clock() - self._start < self.delay:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        percent = int(fraction * 100)
        if percent == self._percent and not suffix:
            return
        self._percent = percent
        filled = int(fraction * self.width)
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}%"
        if suffix:
            line += f" {suffix}"
        padding = " " * max(0, self._line_length - len(line))  # wipe a longer previous line
        self._line_length = len(line)
        self._write("\r" + line + padding)

    def close(self) -> None:
        """Erase the bar (if drawn), leaving the cursor at the start of an empty line."""
        if self._percent >= 0:
            self._write("\r" + " " * self._line_length + "\r")
            self._percent = -1

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken terminal must not stop the task
            self.enabled = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
