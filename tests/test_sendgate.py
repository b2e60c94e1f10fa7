"""The send gate of the shared rate limit, with an injected clock: no database, no sleep.

The shared limiter's one statement is replaced by a scripted database (``Slots``): it
hands out slots spaced ``interval`` apart by its own clock, which is the test's clock,
and each statement takes ``round_trip`` seconds of it.
"""

from __future__ import annotations

import threading

import pytest

from tokend import sendgate
from tokend.metrics import Metrics
from tokend.sendgate import TOLERANCE, Window, place
from tokend.sharedlimit import SHARED_GUARD, UNCERTAIN_FACTOR, SharedRateLimiter
from tokend.store import Store


class FakeTime:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


class Slots(SharedRateLimiter):
    """The limiter with a scripted database: ``next_at`` kept here, by the test's clock."""

    def __init__(self, clock: FakeTime, rate: float, *, metrics: Metrics,
                 round_trips: list[float] | None = None) -> None:
        super().__init__(Store.__new__(Store), rate, sleep=clock.sleep,
                         monotonic=clock.monotonic, on_missed=metrics.slot_missed)
        self.clock = clock
        self.next_at = 0.0
        self.round_trips = round_trips or []
        self.taken: list[tuple[float, float]] = []  # (slot, interval asked for)

    def _take(self, interval: float) -> tuple[float, float, float]:
        trip = self.round_trips.pop(0) if self.round_trips else 0.0
        asked = self.clock.now
        self.clock.now += trip / 2  # the statement runs halfway through its round trip
        slot = max(self.next_at, self.clock.now)
        self.next_at = slot + interval
        self.taken.append((slot, interval))
        delay = slot - self.clock.now
        self.clock.now += trip / 2
        return asked, delay, self.clock.now


def missed(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("tokend_rate_slots_missed_total") or 0.0


@pytest.fixture(autouse=True)
def no_slot_held() -> None:
    sendgate.hold(sendgate.Held(float("inf"), lambda: True, lambda: None))
    assert sendgate.ready()  # spends it: each test starts with none


@pytest.mark.parametrize(("asked", "answered", "delay", "window"), [
    # a fast round trip: from the answer + delay (surely begun) to asked + delay + tol
    (10.0, 10.001, 0.5, Window(10.501, 10.515)),
    # a slot already begun when taken (delay about 0): send at once
    (10.0, 10.002, -0.0005, Window(10.0015, 10.0145)),
    # the round trip leaves exactly a third of the tolerance
    (10.0, 10.010, 0.2, Window(10.21, 10.215)),
    # too slow to place: the window would be shorter than a third of the tolerance
    (10.0, 10.011, 0.2, None),
    (10.0, 10.050, 0.2, None),
])
def test_place(asked: float, answered: float, delay: float, window: Window | None) -> None:
    got = place(asked, answered, delay, TOLERANCE)
    if window is None:
        assert got is None
    else:
        assert got is not None
        assert got.earliest == pytest.approx(window.earliest)
        assert got.latest == pytest.approx(window.latest)


def test_the_guard_exceeds_the_tolerance_so_n_plus_one_starts_span_over_a_second() -> None:
    assert TOLERANCE < SHARED_GUARD
    with pytest.raises(ValueError, match="tolerance"):
        SharedRateLimiter(Store.__new__(Store), 5, tolerance=SHARED_GUARD)


def test_a_request_within_its_slots_tolerance_is_sent_on_it() -> None:
    clock, metrics = FakeTime(), Metrics()
    limiter = Slots(clock, 5, metrics=metrics, round_trips=[0.001] * 3)
    for _ in range(3):
        assert limiter.acquire()
        clock.now += TOLERANCE * 0.5  # the lease check, preparing the request
        assert sendgate.ready(clock.monotonic)
    assert [interval for _, interval in limiter.taken] == [limiter.interval] * 3
    assert missed(metrics) == 0


def test_a_request_late_after_its_slot_is_not_sent_on_it_but_on_a_new_one() -> None:
    clock, metrics = FakeTime(), Metrics()
    limiter = Slots(clock, 5, metrics=metrics)
    assert limiter.acquire()
    [(first, _)] = limiter.taken
    clock.now = first + TOLERANCE + 0.001  # its thread ran late
    assert sendgate.ready(clock.monotonic)  # after a new slot, not on the old one
    assert len(limiter.taken) == 2
    second = limiter.taken[1][0]
    assert second >= first + limiter.interval
    assert clock.now >= second  # it waited for the new slot
    assert missed(metrics) == 1
    assert sendgate.ready(clock.monotonic)  # the slot is spent: none held any more
    assert len(limiter.taken) == 2


def test_a_late_request_is_not_sent_when_stopping_while_it_waits_for_a_new_slot() -> None:
    clock, metrics = FakeTime(), Metrics()
    stop = threading.Event()
    limiter = Slots(clock, 5, metrics=metrics)

    def sleep(seconds: float) -> None:  # stopped during the wait for the new slot
        clock.now += seconds
        if len(limiter.taken) > 1:
            stop.set()

    limiter._sleep = sleep
    assert limiter.acquire(stop)
    clock.now += 1.0
    limiter.next_at = clock.now + 3.0  # meanwhile others' slots fill the next 3 s
    assert not sendgate.ready(clock.monotonic)
    assert missed(metrics) == 1


def test_a_slot_too_slow_to_place_is_not_used_and_the_next_keeps_room_for_it(
        caplog: pytest.LogCaptureFixture) -> None:
    clock, metrics = FakeTime(), Metrics()
    limiter = Slots(clock, 5, metrics=metrics, round_trips=[0.040, 0.002])
    assert limiter.acquire()
    (_unused, first_iv), (used, second_iv) = limiter.taken
    assert first_iv == limiter.interval
    # its lateness fits in the room it keeps after itself (the docstring's extra)
    assert second_iv == pytest.approx(limiter.interval + UNCERTAIN_FACTOR * 0.040)
    assert clock.now >= used
    assert missed(metrics) == 1
    clock.now = used + TOLERANCE + UNCERTAIN_FACTOR * 0.040 - 0.002
    assert sendgate.ready(clock.monotonic)  # within tolerance + extra
    assert len(limiter.taken) == 2


def test_a_process_takes_one_slot_at_a_time() -> None:
    """All workers of a process take their slots at once when grants come due together:
    one at a time, each round trip measures the database, not the other workers'."""
    clock, metrics = FakeTime(), Metrics()
    inside: list[int] = []
    overlapped = threading.Event()

    class Busy(Slots):
        def _take(self, interval: float) -> tuple[float, float, float]:
            inside.append(1)
            if len(inside) > 1:
                overlapped.set()
            overlapped.wait(0.02)  # long enough for another worker to come in
            try:
                return super()._take(interval)
            finally:
                inside.pop()

    limiter = Busy(clock, 5, metrics=metrics)
    workers = [threading.Thread(target=limiter.acquire) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not overlapped.is_set()
    assert len(limiter.taken) == 4


def test_no_slot_held_passes_the_gate() -> None:
    assert sendgate.ready(lambda: 1e12)
