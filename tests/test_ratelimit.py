"""RateLimiter with an injected clock: no real sleeping."""

from __future__ import annotations

import bisect
import itertools
import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokend.ratelimit import DEFAULT_GUARD, RateLimiter


class FakeTime:
    """A monotonic clock that only moves when someone sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()
        self._last_read: dict[int, float] = {}

    def monotonic(self) -> float:
        with self._lock:
            self._last_read[threading.get_ident()] = self.now
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def last_read(self) -> float:
        """What this thread last read: for a granted acquire, the moment of the grant."""
        with self._lock:
            return self._last_read[threading.get_ident()]


def starts(rate: float, count: int, *, guard: float = DEFAULT_GUARD,
           clock: FakeTime | None = None) -> list[float]:
    clock = clock or FakeTime()
    limiter = RateLimiter(rate, guard=guard, monotonic=clock.monotonic, sleep=clock.sleep)
    out = []
    for _ in range(count):
        assert limiter.acquire()
        out.append(clock.last_read())
    return out


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """Most starts in any closed window [t, t + width]; windows that begin at a start
    are the worst case."""
    times = sorted(times)
    return max(bisect.bisect_right(times, t + width) - i for i, t in enumerate(times))


@pytest.mark.parametrize("rate", [1, 2, 5, 10, 50])
def test_whole_rates_hold_every_window_and_reach_the_rate(rate: float) -> None:
    times = starts(rate, 2000)
    assert max_in_window(times) <= rate
    throughput = (len(times) - 1) / (times[-1] - times[0])
    assert throughput >= rate / (1 + DEFAULT_GUARD) * 0.999
    assert throughput <= rate


@pytest.mark.parametrize("rate", [1, 5, 10])
def test_without_guard_throughput_is_exactly_the_rate(rate: float) -> None:
    times = starts(rate, 1000, guard=0.0)
    # Without a guard the spacing is exactly 1/rate, so only float rounding separates
    # the (rate + 1)-th start from the window's end: that is what the guard is for.
    assert max_in_window(times, 1 - 1e-9) <= rate
    assert (len(times) - 1) / (times[-1] - times[0]) == pytest.approx(rate)


@pytest.mark.parametrize(("rate", "per_second"), [(2.5, 2), (1.5, 1), (9.99, 9)])
def test_fractional_rates_never_exceed_the_rate_in_a_second(rate: float,
                                                            per_second: int) -> None:
    times = starts(rate, 500)
    assert max_in_window(times) == per_second
    throughput = (len(times) - 1) / (times[-1] - times[0])
    assert throughput == pytest.approx(per_second / (1 + DEFAULT_GUARD), rel=1e-3)


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_rates_below_one(rate: float) -> None:
    times = starts(rate, 50)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / rate
    assert max_in_window(times) == 1


def test_first_acquire_does_not_wait() -> None:
    clock = FakeTime()
    limiter = RateLimiter(5, monotonic=clock.monotonic, sleep=clock.sleep)
    assert limiter.acquire()
    assert clock.sleeps == []


def test_idle_time_is_not_banked() -> None:
    # After a long pause the next start is free, but the one after it is spaced again:
    # no burst is saved up.
    clock = FakeTime()
    limiter = RateLimiter(5, monotonic=clock.monotonic, sleep=clock.sleep)
    limiter.acquire()
    clock.now += 3600
    limiter.acquire()
    assert clock.sleeps == []
    limiter.acquire()
    assert clock.sleeps == [pytest.approx(limiter.interval)]


def test_unlimited_never_sleeps() -> None:
    clock = FakeTime()
    limiter = RateLimiter(0, monotonic=clock.monotonic, sleep=clock.sleep)
    assert limiter.unlimited
    assert all(limiter.acquire() for _ in range(10_000))
    assert clock.sleeps == []


def test_stop_set_beforehand() -> None:
    clock = FakeTime()
    stop = threading.Event()
    stop.set()
    for rate in (0, 5):
        limiter = RateLimiter(rate, monotonic=clock.monotonic, sleep=clock.sleep)
        assert limiter.acquire(stop) is False


def test_stop_set_while_waiting() -> None:
    clock = FakeTime()
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        stop.set()

    limiter = RateLimiter(1, monotonic=clock.monotonic, sleep=sleep)
    assert limiter.acquire(stop) is True
    assert limiter.acquire(stop) is False
    # The slot it waited for was not used up.
    stop.clear()
    assert limiter.acquire(stop) is True
    assert clock.sleeps == [pytest.approx(1 + DEFAULT_GUARD)]


def test_real_wait_is_interrupted_by_stop() -> None:
    # The one test on the real clock: a 1-request-per-100-s limiter must let a stop
    # through at once rather than sleep out its interval.
    limiter = RateLimiter(0.01)
    stop = threading.Event()
    assert limiter.acquire(stop)
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    try:
        assert limiter.acquire(stop) is False
    finally:
        timer.cancel()


def test_many_threads_share_the_limit() -> None:
    clock = FakeTime()
    limiter = RateLimiter(5, monotonic=clock.monotonic, sleep=clock.sleep)
    granted: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            assert limiter.acquire()
            at = clock.last_read()
            with lock:
                granted.append(at)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 400
    assert max_in_window(granted) <= 5
    granted.sort()
    gaps = [b - a for a, b in itertools.pairwise(granted)]
    assert min(gaps) >= limiter.interval - 1e-9


@pytest.mark.parametrize("bad", [-1, math.inf, math.nan])
def test_invalid_rate(bad: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(bad)


def test_invalid_guard() -> None:
    with pytest.raises(ValueError):
        RateLimiter(5, guard=-0.1)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(min_value=0.05, max_value=200, allow_nan=False),
       guard=st.floats(min_value=0, max_value=0.1),
       pauses=st.lists(st.floats(min_value=0, max_value=3), min_size=1, max_size=120))
def test_any_rate_any_arrival_pattern_holds_every_window(rate: float, guard: float,
                                                         pauses: list[float]) -> None:
    clock = FakeTime()
    limiter = RateLimiter(rate, guard=guard, monotonic=clock.monotonic, sleep=clock.sleep)
    times = []
    for pause in pauses:
        clock.now += pause  # callers arrive at arbitrary moments
        assert limiter.acquire()
        times.append(clock.last_read())
    limit = max(1, math.floor(rate))
    if guard > 1e-6:
        assert max_in_window(times) <= limit
    else:
        assert max_in_window(times, 1 - 1e-6) <= limit


def test_priority_callers_go_first_within_the_same_limit() -> None:
    """An on-demand refresh (an application waits for it) starts before scheduled ones
    that were waiting already, and still counts against the same limit."""
    import time

    limiter = RateLimiter(4)
    assert limiter.acquire()  # the slot is taken: everyone below waits for the next one
    order: list[tuple[str, float]] = []
    lock = threading.Lock()

    def take(name: str, priority: bool) -> None:
        assert limiter.acquire(priority=priority)
        with lock:
            order.append((name, time.monotonic()))

    scheduled = [threading.Thread(target=take, args=(f"scheduled-{i}", False))
                 for i in range(3)]
    for t in scheduled:
        t.start()
    time.sleep(0.05)  # they wait first
    urgent = threading.Thread(target=take, args=("on-demand", True))
    urgent.start()
    for t in [*scheduled, urgent]:
        t.join(10)
    assert order[0][0] == "on-demand", order
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(order)]
    assert min(gaps) >= limiter.interval - 0.01, gaps
