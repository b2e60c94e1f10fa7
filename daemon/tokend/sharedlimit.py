"""One rate limit for all replicas: a budget of request starts kept in the database.

``provider.rate_limit`` is what the provider allows per egress IP, so on PostgreSQL it
is shared by every replica (and every other tokend process: ``tokend authorize``, the
consent endpoint's code exchanges). Each start takes the next slot of one row of
``rate_slots`` with ONE statement, by the database's clock (the one clock all replicas
share)::

    next_at := max(next_at, clock_timestamp()) + interval   -- returns the slot's delay

and the process sleeps that delay before it sends. Slots are spaced at least
``interval = (1 + guard) / n`` apart (``n = floor(rate)``, as
:class:`tokend.ratelimit.RateLimiter` computes it), and a request leaves within
``tolerance`` after its slot began, or not at all (:mod:`tokend.sendgate`: checked right
before it is written; a late one takes a new slot). The promise holds: take n + 1
starts and order them by slot, t_0 < ... < t_n; each start s_i lies in
[t_i, t_i + tolerance + extra_i], where ``extra_i`` is room the slot reserved after
itself (``interval + extra_i`` to the next slot; 0 unless this process could not place
its slots closely, see below). Then s_n - s_0 >= t_n - t_0 - tolerance - extra_0
>= (1 + guard) + extra_0 - tolerance - extra_0 = 1 + guard - tolerance > 1 s, since
``tolerance < guard``: no 1-second window holds more than ``n`` starts. With guard 30 ms
and tolerance 15 ms the shared budget sends 4.85/s of 5/s.

A slot is placed in this process's time by the round trip of the very statement that
took it (its uncertainty; :func:`tokend.sendgate.place`): the request never leaves
before the slot surely began nor after it surely began + ``tolerance``. When the round
trip is too long to leave room for that (a slow database), the slot is not used, and
the next one reserves ``extra`` = twice that round trip after itself, and may leave up
to ``tolerance + extra`` after it began (logged once: ``rate_slot_clock_uncertain``).
Its window is checked like any other; a round trip slower again repeats this.

Why not a per-replica share (limit / live replicas)? It is only right once every
replica has seen the same count: while one joins or dies, the shares overlap and the
sum exceeds the limit, exactly the windows a per-IP provider punishes. A shared row
never overlaps; it costs one short UPDATE per request (5-10 a second).

SQLite is one process: it keeps the in-process limiter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import text

from . import logs, sendgate
from .errors import StoreError
from .ratelimit import DEFAULT_GUARD, RateLimiter, wait
from .store import Store

log = logs.get("tokend.sharedlimit")
SHARED_GUARD = DEFAULT_GUARD  # one slot rule for both limiters (30 ms; above the tolerance)
UNCERTAIN_FACTOR = 2.0  # x the slow round trip: room reserved after the next slot
RETRY = 1.0  # seconds between attempts while the database does not answer

# The slot row is coordination, not data: its commit does not wait for the WAL flush
# (synchronous_commit off for this one transaction, set in the statement itself to keep
# one round trip). A take stuck behind other commits' flushes (the saver's, a
# checkpoint) left up to 170 ms of slots unused at 100/s. Visible to every replica at
# once all the same; only a PostgreSQL crash can forget the last few milliseconds of
# takes, and no request leaves while it restarts.
_TAKE = text(
    "WITH async AS (SELECT set_config('synchronous_commit', 'off', true)) "
    "INSERT INTO rate_slots (name, next_at) "
    "SELECT :name, clock_timestamp() + make_interval(secs => :iv) FROM async "
    "ON CONFLICT (name) DO UPDATE SET next_at = "
    "GREATEST(rate_slots.next_at, clock_timestamp()) + make_interval(secs => :iv) "
    "RETURNING EXTRACT(EPOCH FROM (rate_slots.next_at - clock_timestamp()))::float8 - :iv")
_BACKLOG = text(
    "SELECT GREATEST(0, EXTRACT(EPOCH FROM (next_at - clock_timestamp())))::float8 "
    "FROM rate_slots WHERE name = :name")


class SharedRateLimiter:
    """Start limiter shared through the database; the interface of ``RateLimiter``."""

    def __init__(self, store: Store, rate: float, *, name: str = "token_endpoint",
                 guard: float = SHARED_GUARD, tolerance: float = sendgate.TOLERANCE,
                 sleep: Callable[[float], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_missed: Callable[[], None] | None = None) -> None:
        if not 0 <= tolerance < guard:
            # the proof above needs it: n + 1 starts then span more than 1 s
            raise ValueError(f"tolerance must be >= 0 and below the guard ({guard!r}), "
                             f"not {tolerance!r}")
        self._spacing = RateLimiter(rate, guard=guard)  # same interval and validation
        self.rate = self._spacing.rate
        self.interval = self._spacing.interval
        self.tolerance = tolerance
        self._store = store
        self._name = name
        self._sleep = sleep
        self._monotonic = monotonic
        self._on_missed = on_missed
        self._failing = threading.Event()
        self._uncertain_logged = False
        # One take at a time per process: a round trip then measures the database, not
        # this process's other workers taking theirs at the same moment (all of them
        # do when grants come due together), which would make it too long to place.
        self._take_lock = threading.Lock()

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

        The slot is held by this thread until its request passes the send gate
        (:func:`tokend.sendgate.ready`, right before the request is written).
        """
        extra = 0.0
        while True:
            if stop is not None and stop.is_set():
                return False
            if self.unlimited:
                return True
            try:
                with self._take_lock:
                    asked, delay, answered = self._take(self.interval + extra)
            except StoreError as exc:
                if not self._failing.is_set():
                    self._failing.set()
                    log.error("rate_slot_unavailable", error=str(exc),
                              detail="no request starts until the shared budget answers")
                wait(RETRY, stop, self._sleep)
                continue
            self._failing.clear()
            window = sendgate.place(asked, answered, delay, self.tolerance + extra)
            if window is None:
                # Too slow a round trip to know when the slot began closely enough: it
                # is left unused, and the next one keeps room after itself for that.
                self._missed()
                extra = UNCERTAIN_FACTOR * (answered - asked)
                if not self._uncertain_logged:
                    self._uncertain_logged = True
                    log.warning("rate_slot_clock_uncertain",
                                round_trip_ms=round((answered - asked) * 1000, 1),
                                tolerance_ms=round(self.tolerance * 1000, 1),
                                detail="slot left unused; slots taken after a slow round "
                                       "trip reserve room for it (lower throughput)")
                continue
            ahead = window.earliest - self._monotonic()
            if ahead > 0:
                wait(ahead, stop, self._sleep)
            # A stop while waiting for a future slot: not sent (the slot stays unused).
            # Sending anyway would put every waiting worker's request into one moment.
            if stop is not None and stop.is_set():
                return False
            sendgate.hold(sendgate.Held(
                window.latest, lambda: self.acquire(stop, priority=priority), self._missed))
            return True

    def backlog(self) -> float:
        """Seconds until the next free slot, by the database's clock: how far ahead the
        slots of all replicas are taken (0 when none is)."""
        with self._store.tx(readonly=True) as conn:
            value = conn.execute(_BACKLOG, {"name": self._name}).scalar()
        return float(value or 0.0)

    def _missed(self) -> None:
        if self._on_missed is not None:
            self._on_missed()

    def _take(self, interval: float) -> tuple[float, float, float]:
        """``(asked, delay, answered)``: the slot's delay from the database's reading of
        its clock, and the monotonic times around the one round trip that read it (not
        the connection's checkout, which can take a new connection's setup)."""
        with self._store.tx(single=True) as conn:
            asked = self._monotonic()
            value = conn.execute(_TAKE, {"name": self._name, "iv": interval}).scalar()
            answered = self._monotonic()
        return asked, float(value or 0.0), answered


Limiter = RateLimiter | SharedRateLimiter


def limiter_for(store: Store, rate: float, *,
                on_missed: Callable[[], None] | None = None) -> Limiter:
    """The limiter of a process: shared on PostgreSQL, in-process on SQLite.
    ``on_missed``: called for each slot left unused (the send gate)."""
    if store.dialect == "postgresql" and rate > 0:
        return SharedRateLimiter(store, rate, on_missed=on_missed)
    return RateLimiter(rate, on_missed=on_missed)
