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

A slot is spent at the send gate (:mod:`tokend.sendgate`, as the shared limiter's):
the request is written only while it is at most ``tolerance`` (< ``guard``) after its
slot began, else it takes a new slot. So the next slot follows the one just granted
(``slot + interval``), not the moment a late-woken caller took it: starts lie in
``[slot, slot + tolerance]`` and ``n + 1`` of them span at least ``1 + guard -
tolerance`` > 1 s, while a caller woken a few milliseconds late (16 threads on one
GIL) no longer pushes every later slot back (that cost 3 % of the rate at 100/s).

Callers get their turns in the order they asked (priority callers first, in the order
they asked): a queue, not a race of threads retrying at each slot, in which a caller
could lose every race (one of 16 waited 6.4 s for a turn of 1.6 s). Only the first in
line takes a slot; each caller sleeps until about its turn and looks again a turn
early, so a caller ahead that stops (it leaves the line) leaves no slot unused; callers
that stop together leave at most one interval per extra caller to whoever waits behind
them, once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from . import sendgate

DEFAULT_GUARD = 0.03  # seconds added per `n` slots; must exceed the send gate's tolerance


class RateLimiter:
    """Thread-safe start limiter; ``rate`` 0 means unlimited."""

    def __init__(
        self,
        rate: float,
        *,
        guard: float = DEFAULT_GUARD,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        on_missed: Callable[[], None] | None = None,
    ) -> None:
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"rate must be a finite number >= 0, not {rate!r}")
        if not math.isfinite(guard) or guard < 0:
            raise ValueError(f"guard must be a finite number >= 0, not {guard!r}")
        self.rate = float(rate)
        # Below the guard, as the proof above needs (a guard of 0: no lateness at all).
        self.tolerance = min(sendgate.TOLERANCE, guard / 2)
        self._on_missed = on_missed
        self._monotonic = monotonic
        # An injected sleep (tests) cannot be interrupted; the real one waits on the
        # stop event so that shutdown does not sit out a long interval.
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next: float | None = None  # earliest moment of the next start
        # Callers waiting, in the order they asked: priority ones are served first.
        self._urgent: deque[object] = deque()
        self._queue: deque[object] = deque()
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

        Callers are served in the order they asked (a queue, not a race: with 16
        threads retrying after each interval, one caller was seen to wait four times
        its turn). ``priority`` (an application waits for it: on-demand refreshes):
        served before every non-priority caller waiting at the same time, in the order
        priority callers asked, within the same limit. A caller stopped while waiting
        gives its turn up to the callers behind it.
        """
        if stop is not None and stop.is_set():
            return False
        if self.unlimited:
            return True
        me = object()
        with self._lock:
            (self._urgent if priority else self._queue).append(me)
        try:
            while True:
                with self._lock:
                    # Read the clock under the lock: slots are granted in clock order.
                    delay, slot = self._turn(me, self._monotonic())
                if delay == 0.0:
                    sendgate.hold(sendgate.Held(
                        slot + self.tolerance,
                        lambda: self.acquire(stop, priority=priority), self._missed))
                    return True
                wait(delay, stop, self._sleep)
                if stop is not None and stop.is_set():
                    return False
        finally:
            with self._lock:
                for line in (self._urgent, self._queue):
                    if me in line:
                        line.remove(me)

    def _missed(self) -> None:
        if self._on_missed is not None:
            self._on_missed()

    def _turn(self, me: object, now: float) -> tuple[float, float]:
        """``(0.0, slot)``: ``me`` starts now, on the slot that began at ``slot`` (now,
        or a moment ago: within the tolerance); else ``(how long to wait before looking
        again, 0.0)``. Called under the lock."""
        place = (self._urgent.index(me) if me in self._urgent
                 else len(self._urgent) + self._queue.index(me))
        # Compared as "now >= next" rather than "now - last >= interval": then the
        # wait (next - now) is never rounded down to zero while still early.
        free_at = now if self._next is None else max(self._next, now)
        if place == 0:
            if free_at <= now:
                (self._urgent if self._urgent and self._urgent[0] is me
                 else self._queue).popleft()
                slot = now
                if self._next is not None and now - self._next <= self.tolerance:
                    slot = self._next  # woken a little late: the slot began on time
                self._next = slot + self.interval
                return 0.0, slot
            return free_at - now, 0.0
        # Wake a turn before its own: if a caller ahead gives its turn up (stopped),
        # this one is there to take the slot, and no slot goes unused. Waking early
        # costs one more look; a caller that is not first never takes a slot.
        delay = free_at - now + (place - 1) * self.interval
        return (delay if delay > 0 else self.interval), 0.0


def wait(delay: float, stop: threading.Event | None,
         sleep: Callable[[float], None] | None = None) -> None:
    """Wait ``delay`` seconds: with an injected ``sleep`` (tests), else until ``stop``."""
    if sleep is not None:
        sleep(delay)
    elif stop is not None:
        stop.wait(delay)
    else:
        time.sleep(delay)
