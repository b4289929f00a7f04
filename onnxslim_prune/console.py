"""Progress on the console: a bar per stage on a terminal, periodic lines in a CI log.

The library calls ``stage(name)`` when a stage begins and ``(done, total)`` within it (see
`progress`). On a terminal each stage with counted work gets a click progress bar. Elsewhere
(CI logs, pipes) a line is written when a counted stage begins once the run is older than
`QUIET_SECONDS`, then at most every `LINE_SECONDS` while it counts, and a heartbeat thread
makes sure a line appears at least every `HEARTBEAT_SECONDS` even while a single step runs.
This is the CLI's output, not the library's logging: it goes to stderr at every verbosity
but ``--quiet``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

import click

QUIET_SECONDS = 5.0
LINE_SECONDS = 10.0
HEARTBEAT_SECONDS = 30.0
POLL_SECONDS = 1.0


class ConsoleProgress:
    """A `progress` listener for the CLI (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, *, terminal: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.started = time.monotonic()
        self.name = "starting"
        self._bar: Any = None
        self._done = 0
        self._total = 0
        self._last_line = self.started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.terminal:
            self._thread = threading.Thread(target=self._heartbeat, name="onnx-prune-heartbeat", daemon=True)
            self._thread.start()

    def stage(self, name: str) -> None:
        with self._lock:
            self._close_bar()
            self.name, self._done, self._total = name, 0, 0

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            if self.terminal:
                self._bar_update(done, total)
                return
            now = time.monotonic()
            first = self._total != total or done < self._done
            self._done, self._total = done, total
            if (first and now - self.started > QUIET_SECONDS) or now - self._last_line >= LINE_SECONDS or (
                done == total and now - self.started > QUIET_SECONDS and now - self._last_line >= 1.0
            ):
                self._line(f"{self.name}: {done}/{total} ({done / max(total, 1):.0%})")

    def echo(self, text: str) -> None:
        """A line of the CLI's own between stages (an open bar is closed first: the line is not drawn over)."""
        with self._lock:
            self._close_bar()
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._close_bar()

    # -- terminal

    def _bar_update(self, done: int, total: int) -> None:
        if self._bar is None or total != self._total or done < self._done:
            self._close_bar()
            self._bar = click.progressbar(length=total, label=self.name, file=self.stream)
            self._bar.__enter__()
            self._done, self._total = 0, total
        self._bar.update(done - self._done)
        self._done = done

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    # -- log lines

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        self.stream.write(f"[{_clock(elapsed)}] {text}\n")
        self.stream.flush()
        self._last_line = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            with self._lock:
                if time.monotonic() - self._last_line >= HEARTBEAT_SECONDS:
                    count = f" ({self._done}/{self._total})" if self._total else ""
                    self._line(f"still working: {self.name}{count}")


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes:d}:{sec:02d}"
