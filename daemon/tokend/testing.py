"""Helpers for tokend's tests, benchmarks and demo: what each of them needs to stand up a
provider, a database and a daemon configuration without writing it again.

Public and small on purpose (like ``structlog.testing``): nothing here runs in the daemon.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


class ManualClock:
    """A settable UTC clock for ``FakeJustimmo(clock=...)`` and ``Store(clock=...)``;
    thread-safe."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2024, 1, 31, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        with self._lock:
            self._now += step
            return self._now

    def set(self, moment: datetime) -> None:
        with self._lock:
            self._now = moment
