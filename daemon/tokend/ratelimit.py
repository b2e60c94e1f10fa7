"""An in-process limit on how many requests per second start towards the provider.

Used as is on SQLite (one process); on PostgreSQL ``tokend.sharedlimit`` keeps the same
spacing in the database, so all replicas together hold ``provider.rate_limit``.

The promise is strict: in ANY 1-second window at most ``rate`` requests start (a
provider that counts per IP does not average). It is kept by spacing starts at least
``interval`` apart, where ``interval = (max(1, n / rate) + guard) / n`` with
``n = max(1, floor(rate))``:

* k starts inside a 1-second window span at most 1 s, so ``(k - 1) * interval <= 1``,
  hence ``k <= 1 + n / (1 + guard) < n + 1``: never more than ``floor(rate)``.
* Throughput is ``n / (max(1, n / rate) + guard)``: ``rate`` for whole rates (minus the
  guard), ``floor(rate)`` for fractional rates above 1 (no schedule can average more
  while holding every 1-second window to ``floor(rate)``), and ``rate`` below 1.

Even spacing rather than bursts of ``n``, plus a small ``guard``, because the window
that matters is the one the provider sees: requests leave a few milliseconds after the
slot is granted (thread scheduling, connection setup), and a burst that leaves late
next to one that leaves on time would put ``2 n`` starts into one second at the other
end. With even spacing, ``guard`` seconds of such jitter are absorbed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

DEFAULT_GUARD = 0.02


class RateLimiter:
    """Thread-safe start limiter; ``rate`` 0 means unlimited."""

    def __init__(
        self,
        rate: float,
        *,
        guard: float = DEFAULT_GUARD,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"rate must be a finite number >= 0, not {rate!r}")
        if not math.isfinite(guard) or guard < 0:
            raise ValueError(f"guard must be a finite number >= 0, not {guard!r}")
        self.rate = float(rate)
        self._monotonic = monotonic
        # An injected sleep (tests) cannot be interrupted; the real one waits on the
        # stop event so that shutdown does not sit out a long interval.
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next: float | None = None  # earliest moment of the next start
        self._urgent = 0  # priority callers waiting: the others let them go first
        if rate == 0:
            self.interval = 0.0
        else:
            n = max(1, math.floor(rate))
            self.interval = (max(1.0, n / rate) + guard) / n

    @property
    def unlimited(self) -> bool:
        return self.interval == 0.0

    def acquire(self, stop: threading.Event | None = None, *, priority: bool = False) -> bool:
        """Block until a request may start; False if ``stop`` is (or gets) set first.

        ``priority`` (an application waits for it: on-demand refreshes): granted before
        any non-priority caller waiting at the same time, within the same limit.
        """
        if priority and not self.unlimited:
            with self._lock:
                self._urgent += 1
            try:
                return self._acquire(stop, priority=True)
            finally:
                with self._lock:
                    self._urgent -= 1
        return self._acquire(stop, priority=False)

    def _acquire(self, stop: threading.Event | None, *, priority: bool) -> bool:
        while True:
            if stop is not None and stop.is_set():
                return False
            if self.unlimited:
                return True
            with self._lock:
                # Read the clock under the lock: the recorded start must be the moment
                # the slot was granted, and slots must be granted in clock order.
                now = self._monotonic()
                # Compared as "now >= next" rather than "now - last >= interval": then
                # the wait (next - now) is never rounded down to zero while still early.
                free = self._next is None or now >= self._next
                if free and (priority or not self._urgent):
                    self._next = now + self.interval
                    return True
                # A free slot is left to a waiting priority caller; look again shortly.
                delay = self.interval / 4 if free else self._next - now  # type: ignore[operator]
            wait(delay, stop, self._sleep)


def wait(delay: float, stop: threading.Event | None,
         sleep: Callable[[float], None] | None = None) -> None:
    """Wait ``delay`` seconds: with an injected ``sleep`` (tests), else until ``stop``."""
    if sleep is not None:
        sleep(delay)
    elif stop is not None:
        stop.wait(delay)
    else:
        time.sleep(delay)
