"""RateLimiter with an injected clock: no real sleeping."""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
import threading
from collections.abc import Callable

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


# ------------------------------------------------ served in turn (virtual time, threads)


class VirtualThreads:
    """Threads that sleep in virtual time and run one at a time, so a run is
    deterministic: the clock jumps to the earliest wake-up. Threads due at the same
    moment wake in a seeded random order (``shuffle``; the OS promises no order), or
    in the order they went to sleep."""

    def __init__(self, seed: int = 0, *, shuffle: bool = True) -> None:
        self.now = 0.0
        self._rnd = random.Random(seed)
        self._shuffle = shuffle
        self._cond = threading.Condition()
        self._sleepers: list[tuple[float, float, int, float, threading.Event]] = []
        self._running = 0
        self._seq = 0
        self._threads: list[threading.Thread] = []

    def monotonic(self) -> float:
        return self.now  # only the one running thread reads or moves it

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        woken = threading.Event()
        with self._cond:
            self._park(self.now + seconds, woken)
            self._running -= 1
            self._cond.notify_all()
        woken.wait()

    def _park(self, at: float, woken: threading.Event) -> None:
        self._seq += 1
        tie = self._rnd.random() if self._shuffle else 0.0
        # the same moment to the nanosecond (sums of floats differ in the last bits)
        heapq.heappush(self._sleepers, (round(at, 9), tie, self._seq, at, woken))

    def spawn(self, fn: Callable[[], None]) -> None:
        """Start ``fn`` in a thread at the current virtual moment."""
        woken = threading.Event()

        def run() -> None:
            woken.wait()
            try:
                fn()
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

        with self._cond:
            self._park(self.now, woken)
        thread = threading.Thread(target=run, daemon=True)
        self._threads.append(thread)
        thread.start()

    def run(self) -> None:
        """Until every thread has finished."""
        while True:
            with self._cond:
                assert self._cond.wait_for(lambda: self._running == 0, timeout=10)
                if not self._sleepers:
                    break
                _, _, _, at, woken = heapq.heappop(self._sleepers)
                self.now = max(self.now, at)
                self._running = 1
            woken.set()
        for thread in self._threads:
            thread.join(5)


def _limiter(vt: VirtualThreads, rate: float = 5.0) -> RateLimiter:
    return RateLimiter(rate, monotonic=vt.monotonic, sleep=vt.sleep)


@pytest.mark.parametrize("seed", range(8))
def test_callers_are_served_in_the_order_they_asked(seed: int) -> None:
    """16 workers, each asking again after some work: every caller is served in its turn
    (never overtaken by one that asked later), so no wait is longer than the queue it
    found (on the old code callers raced at each slot and one waited 4 x its turn)."""
    vt = VirtualThreads(seed)
    limiter = _limiter(vt)
    work = random.Random(seed + 100)
    asked: list[int] = []
    granted: list[tuple[int, float, float, int]] = []  # ticket, asked at, granted at, ahead
    waiting: set[int] = set()

    def worker() -> None:
        for _ in range(12):
            ticket = len(asked)
            asked.append(ticket)
            ahead = len(waiting)
            waiting.add(ticket)
            since = vt.now
            assert limiter.acquire()
            waiting.discard(ticket)
            granted.append((ticket, since, vt.now, ahead))
            vt.sleep(work.uniform(0.0, 2.0))

    for _ in range(16):
        vt.spawn(worker)
    vt.run()
    assert len(granted) == 16 * 12
    order = [ticket for ticket, *_ in granted]
    assert order == sorted(order)
    for _ticket, since, at, ahead in granted:
        assert at - since <= (ahead + 1) * limiter.interval + 1e-6
    times = [at for _, _, at, _ in granted]
    assert max_in_window(times) <= 5
    assert min(b - a for a, b in itertools.pairwise(times)) >= limiter.interval - 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_priority_callers_go_first_and_in_turn(seed: int) -> None:
    vt = VirtualThreads(seed)
    limiter = _limiter(vt)
    assert limiter.acquire()  # the slot is taken: everyone below waits
    order: list[str] = []

    def take(name: str, priority: bool, after: float) -> Callable[[], None]:
        def run() -> None:
            vt.sleep(after)
            assert limiter.acquire(priority=priority)
            order.append(name)
        return run

    for i in range(4):
        vt.spawn(take(f"scheduled-{i}", False, 0.001 * (i + 1)))
    for i in range(3):
        vt.spawn(take(f"on-demand-{i}", True, 0.01 + 0.001 * i))
    vt.run()
    assert order == ["on-demand-0", "on-demand-1", "on-demand-2",
                     "scheduled-0", "scheduled-1", "scheduled-2", "scheduled-3"]


@pytest.mark.parametrize(("stopped", "served"), [
    # the second in line stops: the third takes its slot, one interval after the first
    (("b",), {"a": 1, "c": 2}),
    # the first stops: the second takes the first slot, the third the next
    (("a",), {"b": 1, "c": 2}),
    # the first two stop together: the third is one interval late (its look a turn
    # early still finds a caller ahead), and no more
    (("a", "b"), {"c": 2}),
])
def test_a_stopped_caller_gives_its_turn_up(stopped: tuple[str, ...],
                                            served: dict[str, int]) -> None:
    vt = VirtualThreads(shuffle=False)
    limiter = _limiter(vt)
    assert limiter.acquire()  # at 0: the next slot is one interval later
    stops = {name: threading.Event() for name in "abc"}
    got: dict[str, float] = {}
    refused: list[str] = []

    def caller(name: str) -> Callable[[], None]:
        def run() -> None:
            vt.sleep(0.001 * (ord(name) - ord("a") + 1))  # a, b, c ask in this order
            if limiter.acquire(stops[name]):
                got[name] = vt.now
            else:
                refused.append(name)
        return run

    def stopper() -> None:
        vt.sleep(limiter.interval / 2)
        for name in stopped:
            stops[name].set()

    for name in "abc":
        vt.spawn(caller(name))
    vt.spawn(stopper)
    vt.run()
    assert sorted(refused) == sorted(stopped)
    assert got == {name: pytest.approx(k * limiter.interval) for name, k in served.items()}
    # and the stopped callers hold no place: the next caller comes one interval later
    later: list[float] = []
    vt.spawn(lambda: later.append(vt.now) if limiter.acquire() else None)
    vt.run()
    assert later == [pytest.approx(max(got.values()) + limiter.interval)]


class LateSleeper(FakeTime):
    """Every sleep overshoots by a lateness drawn from ``late`` (a thread woken late)."""

    def __init__(self, late: Callable[[], float]) -> None:
        super().__init__()
        self._late = late

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds + self._late())


@pytest.mark.parametrize(("lateness", "slots_from"), [
    (0.005, "the slot before"),  # within the tolerance: the slot began on time
    (0.015, "the slot before"),  # at the tolerance
    (0.040, "the grant"),  # beyond: a new slot begins when the caller gets it
])
def test_a_caller_woken_late_does_not_push_later_slots_back(lateness: float,
                                                            slots_from: str) -> None:
    from tokend import sendgate

    clock = LateSleeper(lambda: lateness)
    limiter = RateLimiter(5, monotonic=clock.monotonic, sleep=clock.sleep)
    grants = []
    for _ in range(4):
        assert limiter.acquire()
        grants.append(clock.last_read())
    iv = limiter.interval
    assert limiter.tolerance == sendgate.TOLERANCE < DEFAULT_GUARD
    if slots_from == "the slot before":
        # Each woke `lateness` after its slot; the slots stay iv apart all the same.
        assert [round(g - grants[0], 9) for g in grants] == \
            [round(i * iv + (lateness if i else 0), 9) for i in range(4)]
    else:
        assert [round(b - a, 9) for a, b in itertools.pairwise(grants)] == \
            [round(iv + lateness, 9)] * 3


@given(seed=st.integers(0, 10_000), rate=st.sampled_from([1, 5, 10, 100]))
@settings(max_examples=40, deadline=None)
def test_late_wake_ups_never_put_more_than_the_rate_into_a_second(seed: int,
                                                                   rate: int) -> None:
    """Whatever the lateness, a start lies within the tolerance after its slot (a later
    one is a new slot), slots are an interval apart: any window holds <= rate starts."""
    rng = random.Random(seed)
    clock = LateSleeper(lambda: rng.choice([0.0, 0.0, 0.003, 0.014, 0.015, 0.03, 0.2]))
    limiter = RateLimiter(rate, monotonic=clock.monotonic, sleep=clock.sleep)
    times = []
    for _ in range(rate * 6):
        assert limiter.acquire()
        times.append(clock.last_read())
    assert max_in_window(times) <= rate


def test_a_request_later_than_its_slot_allows_takes_a_new_one() -> None:
    """The slot is spent at the send gate: a request that reaches it more than the
    tolerance after its slot began is not sent on it, it takes a new slot (counted)."""
    from tokend import sendgate

    clock = FakeTime()
    missed: list[int] = []
    limiter = RateLimiter(5, monotonic=clock.monotonic, sleep=clock.sleep,
                          on_missed=lambda: missed.append(1))
    assert limiter.acquire()
    assert sendgate.ready(clock.monotonic)  # on time: sent on its slot
    assert limiter.acquire()
    slot = clock.now
    clock.now += limiter.tolerance + 0.001  # e.g. the lease check took that long
    assert sendgate.ready(clock.monotonic)  # sent, but on a new slot:
    assert missed == [1]
    assert clock.now == pytest.approx(slot + limiter.interval)
