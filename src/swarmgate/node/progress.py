"""A download's progress on stderr: redrawn in place on a terminal, a line now and then
when stderr is a file or a pipe (a log should not fill with carriage returns).

``render_progress`` is pure; ``DownloadProgress`` decides when to draw.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# A terminal is redrawn at most this often.
_TTY_INTERVAL_S = 0.1
# Without a terminal: a line each time another tenth is done, and at least this often.
_LOG_INTERVAL_S = 30.0
_LOG_STEPS = 10


def format_bytes(count: float) -> str:
    """1023 B, 1.5 KiB, 45.2 MiB, 3.10 GiB."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """0:04, 12:30, 1:02:03."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_progress(label: str, done: int, total: int | None, rate: float | None) -> str:
    """``label  45.2 MiB / 93.8 MiB  48%  12.3 MiB/s  ETA 0:04``; unknown parts left out."""
    parts = [label]
    if total:
        parts.append(f"{format_bytes(done)} / {format_bytes(total)}")
        parts.append(f"{min(100, done * 100 // total):3d}%")
    else:
        parts.append(format_bytes(done))
    if rate:
        parts.append(f"{format_bytes(rate)}/s")
        if total and done < total:
            parts.append(f"ETA {format_duration((total - done) / rate)}")
    return "  ".join(parts)


class DownloadProgress:
    """A progress callback (``progress(done, total)``) that draws on ``stream``.

    The rate counts only bytes moved since the first call, so a resumed download is
    not credited with what was already on disk.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._started: float | None = None
        self._first_done = 0
        self._done = 0
        self._total: int | None = None
        self._last_draw = float("-inf")
        self._last_step = -1
        self._shown: tuple[int, int | None] | None = None  # what the last line said

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        if self._started is None:
            self._started, self._first_done = now, done
        self._done, self._total = done, total
        finished = total is not None and done >= total
        if self.tty:
            if finished or now - self._last_draw >= _TTY_INTERVAL_S:
                self._draw_in_place(now)
            return
        step = done * _LOG_STEPS // total if total else -1
        if step > self._last_step or now - self._last_draw >= _LOG_INTERVAL_S:
            self._last_step = max(step, self._last_step)
            self._write_line(now)

    def finish(self) -> None:
        """End the display: the final numbers, and the terminal's line closed."""
        if self._started is None:
            return
        now = self._clock()
        if self.tty:
            self._draw_in_place(now)
            self.stream.write("\n")
        elif self._shown != (self._done, self._total):
            self._write_line(now)
        self.stream.flush()

    def _rate(self, now: float) -> float | None:
        elapsed = now - (self._started if self._started is not None else now)
        moved = self._done - self._first_done
        return moved / elapsed if elapsed > 0 and moved > 0 else None

    def _draw_in_place(self, now: float) -> None:
        line = render_progress(self.label, self._done, self._total, self._rate(now))
        # \r back to the line's start, \x1b[K clears what a longer previous line left.
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()
        self._last_draw = now

    def _write_line(self, now: float) -> None:
        line = render_progress(self.label, self._done, self._total, self._rate(now))
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_draw = now
        self._shown = (self._done, self._total)


__all__ = ["DownloadProgress", "format_bytes", "format_duration", "render_progress"]
