"""Progress that shows in a terminal and in a log: a rich bar when output is a terminal, plain
timestamped lines otherwise (a log file, a pipe, a batch job), never cut to 80 columns.

In a log a line is written every `every` seconds and at least every `total / lines` steps, each
with the count, the rate and the time left; `note` lines (an epoch's loss terms and accuracy)
are written in both modes.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLog:
    """`with ProgressLog(title, total, unit) as p: p.advance(n, info); p.note(text)`."""

    def __init__(self, title: str, total: int, unit: str = "steps", *, done: int = 0, enabled: bool = True,
                 terminal: bool | None = None, every: float = 30.0, lines: int = 20, stream: TextIO | None = None):
        self.title, self.total, self.unit, self.done = title, max(int(total), 0), unit, int(done)
        self.enabled, self.every, self.stream = enabled, every, stream or sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.step_lines = max(1, self.total // max(lines, 1))
        self.start, self.start_done, self.last_line = time.perf_counter(), self.done, 0.0
        self.bar = self.task = None

    def __enter__(self) -> "ProgressLog":
        if self.enabled and self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.title), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=Console(file=self.stream))
            self.bar.__enter__()
            self.task = self.bar.add_task(self.title, total=self.total, completed=self.done, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    @property
    def rate(self) -> float:
        """Units per second since this process started."""
        return (self.done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)

    def eta(self) -> str:
        return _duration((self.total - self.done) / self.rate) if self.rate > 0 else "?"

    def _write(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} {self.title}: {text}", file=self.stream, flush=True)

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, advance=n, info=info)
            return
        now = time.perf_counter()
        if self.done >= self.total or self.done % self.step_lines == 0 or now - self.last_line >= self.every:
            self.last_line = now
            pct = 100.0 * self.done / max(self.total, 1)
            self._write(f"{self.done}/{self.total} {self.unit} ({pct:.0f}%) {info} "
                        f"{self.rate:.1f} {self.unit}/s ETA {self.eta()}".replace("  ", " "))

    def note(self, text: str) -> None:
        """A line that matters on its own (an epoch's summary): printed in both modes."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(f"{self.title}: {text}", soft_wrap=True)
        else:
            self._write(text)
