"""Progress of a long command (`replay --all-stuck`, `dead-letters redrive`, `migrate-instances`), on stderr.

On a terminal: one status line redrawn in place, at most `REDRAW_S` apart, with the count, the rate and the time
left (`replay: 40/120 (33%)  12.5/s  ETA 0:06`); the lines the command prints meanwhile (`echo`) appear above
it. Otherwise (a pipe, a file, a CI log): nothing while it runs, then one summary line (`replay: 120 instance(s)
in 9.6s (12.5/s)`), so logs stay quiet. stdout is left to the command's results in both cases.

Hand-written rather than tqdm: the operations report per item through a callback anyway, the quiet summary line
off a terminal is what tqdm does not do (it prints nothing when disabled), and the status line must be cleared
before each result line the command prints; that is forty lines here, not a dependency.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

REDRAW_S = 0.1  # seconds between two redraws of the status line at most
CLEAR = "\r\x1b[K"  # back to the start of the line, erase it


class Progress:
    """Count `advance`s of `total` items (None: not known in advance), named `what` and counted in `unit`.
    With `show` False nothing is written (`echo` still prints): a short run, e.g. one named instance."""

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "item(s)",
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        show: bool = True,
    ) -> None:
        self.what, self.total, self.unit, self.show = what, total, unit, show
        self.stream = stream if stream is not None else sys.stderr
        self.tty = show and (is_terminal(self.stream) if tty is None else tty)
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._drawn_at: float | None = None
        self._shown = False
        self._closed = False
        self.output_closed = False  # stdout's reader went away (`| head`): lines are dropped, the work goes on

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.tty and (self._drawn_at is None or self.clock() - self._drawn_at >= REDRAW_S):
            self._draw()

    def echo(self, line: str) -> None:
        """Print `line` on stdout, above the status line (which is redrawn after it)."""
        if self.tty and self._shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self._shown = False
        if not self.output_closed:
            try:
                print(line, flush=True)
            except BrokenPipeError:
                self.output_closed = True
                silence_stdout()
        if self.tty and self.done:
            self._draw()

    def close(self) -> None:
        """The final line: the status line's last state on a terminal, the summary line otherwise."""
        if self._closed or not self.show:
            return
        self._closed = True
        if self.tty:
            self._draw(final=True)
            self.stream.write("\n")
        else:
            self.stream.write(self.summary() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Stopped by an error or Ctrl-C: claim no finish. The status line goes; the error's line says what.
        self._closed = True
        if self.tty and self._shown:
            self.stream.write(CLEAR)
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return max(self.clock() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed

    def status(self, final: bool = False) -> str:
        """`what: done/total (pct%)  rate/s  ETA m:ss`; once final, `done in` the time it took instead of the ETA."""
        total = self.total if self.total is None else max(self.total, self.done)
        count = f"{self.done}/{total} ({100 * self.done // max(total, 1)}%)" if total is not None else str(self.done)
        rate = f"{self.rate:.1f}/s" if self.done else "-/s"
        if final:
            when = f"done in {clock_time(self.elapsed)}"
        elif total is not None and self.done:
            when = f"ETA {clock_time((total - self.done) / self.rate)}"
        else:
            when = "ETA -"
        return f"{self.what}: {count} {self.unit}  {rate}  {when}"

    def summary(self) -> str:
        return f"{self.what}: {self.done} {self.unit} in {self.elapsed:.1f}s ({self.rate:.1f}/s)"

    def _draw(self, final: bool = False) -> None:
        width = terminal_width(self.stream)
        self.stream.write(CLEAR + self.status(final)[: width - 1])
        self.stream.flush()
        self._drawn_at, self._shown = self.clock(), True


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so neither the next print nor the interpreter's last
    flush raises BrokenPipeError again (what Python's documentation advises for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):
        pass  # not a real file (a test's capture): nothing will flush it at exit
    finally:
        os.close(devnull)


def is_terminal(stream: TextIO) -> bool:
    """A terminal that can redraw a line (not TERM=dumb)."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def terminal_width(stream: TextIO) -> int:
    """Its columns (80 when it does not say, e.g. a fresh pseudo-terminal)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns or shutil.get_terminal_size().columns or 80


def clock_time(seconds: float) -> str:
    """`0:07`, `12:30`, `2:05:00`."""
    s = int(seconds + 0.5)
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
