"""The send gate: a request leaves within ``tolerance`` of its slot, or not at all.

Both limiters hand out slots: the shared one (:mod:`tokend.sharedlimit`) by the
database's clock, the in-process one (:mod:`tokend.ratelimit`, SQLite) by this
process's. What the provider counts is when a request arrives, and a request can leave late after
its slot: its worker thread is scheduled late (2 cores, several processes), or woke late
from its wait. Rather than a guard between slots wide enough for any such delay, the
lateness is bounded where it happens: right before the request is written to the
socket, it is sent only if that moment is at most ``tolerance`` after its slot began.
A request later than that is not sent; it takes a new slot (the old one stays unused,
which only ever lowers the rate) and is checked again.

Placing a shared slot in this process's time (``place``): the slot's delay is read by the
database at some moment between our sending the statement (``asked``) and reading its
answer (``answered``), so the slot began between ``asked + delay`` and
``answered + delay``. The request waits until the later bound (never early), and may
leave until ``asked + delay + tolerance`` (never more than ``tolerance`` late). A round
trip too long to leave room between the two is no place for a request: the slot is not
used (:class:`tokend.sharedlimit.SharedRateLimiter` then reserves room for the
uncertainty after its next slot).

The slot a thread holds is thread-local: the limiter's ``acquire`` holds it, the
provider client's ``ready`` (right before the write) spends it. A thread without one
(no rate limit) passes the gate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

TOLERANCE = 0.015  # seconds a request may leave after its slot began
ROOM_MIN = 1 / 3  # of the tolerance: the least room a placed slot must leave for a send


@dataclass(frozen=True)
class Window:
    """When a request may leave, in this process's monotonic time."""

    earliest: float  # the slot has surely begun
    latest: float  # surely at most ``tolerance`` after it began


def place(asked: float, answered: float, delay: float, tolerance: float) -> Window | None:
    """The window of a slot whose ``delay`` (seconds from the database's reading of its
    clock to the slot) came back between ``asked`` and ``answered``; None when the round
    trip leaves less than ``ROOM_MIN`` of the tolerance to send in."""
    window = Window(answered + delay, asked + delay + tolerance)
    if window.latest - window.earliest < tolerance * ROOM_MIN:
        return None
    return window


@dataclass(frozen=True)
class Held:
    latest: float
    retake: Callable[[], bool]  # takes a new slot (and holds it); False: stopping
    missed: Callable[[], None]  # counts a slot left unused


_local = threading.local()


def hold(slot: Held) -> None:
    """This thread's next request goes on ``slot`` (replaces any unspent one)."""
    _local.slot = slot


def ready(monotonic: Callable[[], float] = time.monotonic) -> bool:
    """Right before a request is written: True to send it now. A request past its slot's
    window takes a new slot first (waiting for it); False if stopping meanwhile: then it
    must not be sent at all."""
    slot: Held | None = getattr(_local, "slot", None)
    _local.slot = None
    while slot is not None and monotonic() > slot.latest:
        slot.missed()
        if not slot.retake():
            _local.slot = None
            return False
        slot = getattr(_local, "slot", None)
        _local.slot = None
    return True
