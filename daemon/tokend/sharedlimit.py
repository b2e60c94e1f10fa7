"""One rate limit for all replicas: a budget of request starts kept in the database.

``provider.rate_limit`` is what the provider allows per egress IP, so on PostgreSQL it
is shared by every replica (and every other tokend process: ``tokend authorize``, the
consent endpoint's code exchanges). Each start takes the next slot of one row of
``rate_slots`` with ONE statement, by the database's clock (the one clock all replicas
share)::

    next_at := max(next_at, clock_timestamp()) + interval   -- returns the slot's delay

and the process sleeps that delay before it sends. Slots are spaced ``interval`` apart
exactly as :class:`tokend.ratelimit.RateLimiter` spaces them in one process (the same
proof holds: any 1-second window holds at most ``floor(rate)`` starts), with a larger
``guard`` because a slot's start now also carries the spread of the round trip back to
each replica and of three processes' thread scheduling (docs/capacity.md).

Why not a per-replica share (limit / live replicas)? It is only right once every
replica has seen the same count: while one joins or dies, the shares overlap and the
sum exceeds the limit, exactly the windows a per-IP provider punishes. A shared row
never overlaps; it costs one short UPDATE per request (5-10 a second).

SQLite is one process: it keeps the in-process limiter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy import text

from . import logs
from .errors import StoreError
from .ratelimit import RateLimiter, wait
from .store import Store

log = logs.get("tokend.sharedlimit")
SHARED_GUARD = 0.1  # seconds of timing spread absorbed between slots of different replicas
RETRY = 1.0  # seconds between attempts while the database does not answer

_TAKE = text(
    "INSERT INTO rate_slots (name, next_at) "
    "VALUES (:name, clock_timestamp() + make_interval(secs => :iv)) "
    "ON CONFLICT (name) DO UPDATE SET next_at = "
    "GREATEST(rate_slots.next_at, clock_timestamp()) + make_interval(secs => :iv) "
    "RETURNING EXTRACT(EPOCH FROM (rate_slots.next_at - clock_timestamp()))::float8 - :iv")


class SharedRateLimiter:
    """Start limiter shared through the database; the interface of ``RateLimiter``."""

    def __init__(self, store: Store, rate: float, *, name: str = "token_endpoint",
                 guard: float = SHARED_GUARD,
                 sleep: Callable[[float], None] | None = None) -> None:
        self._spacing = RateLimiter(rate, guard=guard)  # same interval and validation
        self.rate = self._spacing.rate
        self.interval = self._spacing.interval
        self._store = store
        self._name = name
        self._sleep = sleep
        self._failing = threading.Event()

    @property
    def unlimited(self) -> bool:
        return self.interval == 0.0

    def acquire(self, stop: threading.Event | None = None, *, priority: bool = False) -> bool:
        """Block until this process's slot comes; False if ``stop`` is (or gets) set.

        ``priority`` (on-demand refreshes) is accepted for the interface of
        ``RateLimiter``: slots of the shared budget are handed out in the order they are
        asked for, so a priority caller waits at most behind the slots already taken by
        workers of all replicas (``concurrency`` each), never behind the queue of due
        grants, which are only claimed as workers free up.

        While the database does not answer, no slot is taken and nothing is sent: the
        attempt waits (its lease check afterwards gives it back if it waited too long).
        """
        while True:
            if stop is not None and stop.is_set():
                return False
            if self.unlimited:
                return True
            try:
                delay = self._take()
            except StoreError as exc:
                if not self._failing.is_set():
                    self._failing.set()
                    log.error("rate_slot_unavailable", error=str(exc),
                              detail="no request starts until the shared budget answers")
                wait(RETRY, stop, self._sleep)
                continue
            self._failing.clear()
            if delay > 0:
                wait(delay, stop, self._sleep)
            # A stop while waiting for a future slot: not sent (the slot stays unused).
            # Sending anyway would put every waiting worker's request into one moment.
            return stop is None or not stop.is_set()

    def _take(self) -> float:
        with self._store.tx(single=True) as conn:
            value = conn.execute(_TAKE, {"name": self._name, "iv": self.interval}).scalar()
        return float(value or 0.0)


Limiter = RateLimiter | SharedRateLimiter


def limiter_for(store: Store, rate: float) -> Limiter:
    """The limiter of a process: shared on PostgreSQL, in-process on SQLite."""
    if store.dialect == "postgresql" and rate > 0:
        return SharedRateLimiter(store, rate)
    return RateLimiter(rate)
