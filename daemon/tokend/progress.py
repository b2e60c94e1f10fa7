"""Progress of long commands (``grants import``, ``keys rotate``): a bar on a terminal;
elsewhere (a pipe, a log file, a CI job) plain lines when asked for (``--progress``),
else nothing: scripts and cron jobs that read stderr get only errors there."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_EVERY = 5.0  # seconds between plain lines


class Progress:
    def __init__(self, what: str, total: int, *, plain: bool = False,
                 stream: TextIO | None = None) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.plain = plain
        self.bar: Any = None  # a tqdm bar
        if self.stream.isatty():
            self.bar = tqdm(total=total, desc=what, unit="grant", file=self.stream,
                            leave=False, dynamic_ncols=True)
        self._last = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.plain:
            return
        now = time.monotonic()
        if now - self._last >= PLAIN_EVERY or self.done >= self.total:
            self._last = now
            print(f"{self.what}: {self.done}/{self.total}", file=self.stream, flush=True)
