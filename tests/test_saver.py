"""The saver (tokend.saver): group commit, a bounded queue, failures held, nothing lost
at close. Driven with a recording ``write`` (no database: the store's own ``save_many``
is in test_store; the pass with it in test_maintenance)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from faultlib import wait_until
from tokend.saver import MOST_PER_COMMIT, Saver


class Recorder:
    """A ``write`` that records each commit; ``gate``: a commit waits until it is set;
    ``fail``: items whose commit raises."""

    def __init__(self, *, fail: set[int] | None = None, guard_fails: set[int] | None = None,
                 ) -> None:
        self.commits: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = fail or set()
        self.guard_fails = guard_fails or set()
        self.held: list[tuple[int, str]] = []
        self.tried: list[list[int]] = []
        self.held_tried: dict[int, int] = {}
        self.then: list[tuple[int, bool | None]] = []

    def write(self, items: Sequence[int]) -> list[bool]:
        self.tried.append(list(items))
        self.started.set()
        self.gate.wait(10)
        if self.fail & set(items):
            raise RuntimeError("database gone")
        self.commits.append(list(items))
        return [i not in self.guard_fails for i in items]

    def failed(self, item: int, error: Exception, tried: int) -> None:
        self.held.append((item, str(error)))
        self.held_tried[item] = tried

    def saver(self, limit: int = 4, stopping: threading.Event | None = None) -> Saver[int]:
        return Saver(self.write, self.failed, limit=limit,
                     stopping=(stopping or threading.Event()).is_set)

    @contextlib.contextmanager
    def running(self, limit: int = 4, stopping: threading.Event | None = None,
                ) -> Iterator[Saver[int]]:
        """A saver writing through this recorder, closed afterwards."""
        saver = self.saver(limit, stopping)
        try:
            yield saver
        finally:
            saver.close()

    def put(self, saver: Saver[int], item: int, **kw: bool) -> None:
        saver.put(item, lambda saved: self.then.append((item, saved)), **kw)

    def behind(self, saver: Saver[int], first: int, rest: Sequence[int]) -> None:
        """``rest`` queue while ``first`` is being written; returns once all are done."""
        self.gate.clear()
        self.put(saver, first)
        assert self.started.wait(5)
        for item in rest:
            self.put(saver, item)
        self.gate.set()
        saver.flush()


def flushing(saver: Saver[int]) -> threading.Event:
    """``saver.flush()`` in another thread; the event is set once it returned."""
    done = threading.Event()

    def flush() -> None:
        saver.flush()
        done.set()

    threading.Thread(target=flush, daemon=True).start()
    return done


def test_what_queues_during_a_commit_goes_in_the_next_one() -> None:
    r = Recorder()
    with r.running(limit=8) as s:
        r.behind(s, 1, range(2, 6))  # 1 is being written; 2..5 queue meanwhile
        assert r.commits == [[1], [2, 3, 4, 5]]
        assert sorted(r.then) == [(i, True) for i in range(1, 6)]
        assert s.pending() == 0


def test_room_is_taken_before_the_outcome_exists_and_given_back_once_it_is_written(
        ) -> None:
    """``limit`` bounds requests in flight (room reserved) and outcomes queued or being
    written, together: what a kill -9 could lose."""
    r = Recorder()
    with r.running(limit=2) as s:
        r.gate.clear()
        r.put(s, 1)
        assert r.started.wait(5)  # 1 is being written
        in_flight = s.reserve()  # a request that may rotate a token
        third = threading.Thread(target=lambda: s.reserve().cancel())
        third.start()
        time.sleep(0.2)
        assert third.is_alive(), "room was given past the limit"
        in_flight.put(2, lambda saved: r.then.append((2, saved)))
        time.sleep(0.1)
        assert third.is_alive(), "a queued outcome gave its room back before it was written"
        r.gate.set()
        third.join(5)
        assert not third.is_alive()
        s.flush()
        assert [i for c in r.commits for i in c] == [1, 2]


def test_room_not_used_is_given_back_and_a_room_holds_one_outcome() -> None:
    r = Recorder()
    with r.running(limit=1) as s:
        with s.reserve():
            pass  # the request failed: nothing to save
        room = s.reserve()  # the room came back
        room.put(1, lambda _saved: None, wait=True)
        with pytest.raises(RuntimeError):
            room.put(2, lambda _saved: None)
        room.cancel()  # used: nothing to give back twice
        s.put(3, lambda _saved: None, wait=True)  # the saver's one room is free again
        assert r.commits == [[1], [3]]


def test_a_commit_is_never_larger_than_the_most_per_commit() -> None:
    r = Recorder()
    n = MOST_PER_COMMIT + 10
    with r.running(limit=n) as s:
        r.behind(s, 0, range(1, n))
        assert [len(c) for c in r.commits] == [1, MOST_PER_COMMIT, n - 1 - MOST_PER_COMMIT]


def test_a_failed_commit_hands_every_outcome_in_it_to_failed() -> None:
    r = Recorder(fail={2})
    with r.running(limit=8) as s:
        r.behind(s, 1, [2, 3])
        r.put(s, 4)  # the saver goes on after a failed commit
        s.flush()
        assert r.commits == [[1], [4]]
        assert r.held == [(2, "database gone"), (3, "database gone")]
        assert r.held_tried == {2: 2, 3: 2}  # both in the commit that failed
        assert sorted(r.then) == [(1, True), (2, None), (3, None), (4, True)]


def test_what_queued_behind_a_failed_commit_is_held_without_a_second_wait() -> None:
    r = Recorder(fail={1})
    with r.running(limit=8) as s:
        r.behind(s, 1, [2, 3])
        assert r.tried == [[1]]  # the database just failed: 2 and 3 are not tried
        assert [i for i, _ in r.held] == [1, 2, 3]
        assert r.held_tried == {1: 1, 2: 0, 3: 0}
        assert sorted(r.then) == [(1, None), (2, None), (3, None)]


def test_a_guard_that_fails_is_reported_per_outcome() -> None:
    r = Recorder(guard_fails={2})
    with r.running() as s:
        for i in (1, 2, 3):
            r.put(s, i)
        s.flush()
        assert sorted(r.then) == [(1, True), (2, False), (3, True)]
        assert r.held == []


def test_a_callback_that_raises_stops_neither_the_others_nor_the_saver() -> None:
    r = Recorder()
    seen: list[int] = []

    def boom(_saved: bool | None) -> None:
        raise ValueError("a bug in a callback")

    with r.running() as s:
        r.gate.clear()
        s.put(1, lambda _saved: seen.append(1))
        assert r.started.wait(5)
        s.put(2, boom)
        s.put(3, lambda _saved: seen.append(3))
        r.gate.set()
        s.flush()
        s.put(4, lambda _saved: seen.append(4), wait=True)
        assert seen == [1, 3, 4]


def test_wait_returns_once_written_and_says_how() -> None:
    r = Recorder(guard_fails={2}, fail={3})
    with r.running() as s:
        assert s.put(1, lambda _s: None, wait=True).saved is True
        assert s.put(2, lambda _s: None, wait=True).saved is False
        job = s.put(3, lambda _s: None, wait=True)
        assert job.saved is None and r.held == [(3, "database gone")]


def test_close_writes_what_is_queued_and_later_outcomes_are_written_by_their_caller(
        ) -> None:
    r = Recorder()
    s = r.saver(limit=8)
    r.gate.clear()
    r.put(s, 1)
    assert r.started.wait(5)
    r.put(s, 2)
    r.put(s, 3)
    closer = threading.Thread(target=s.close)
    closer.start()
    r.gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert [i for c in r.commits for i in c] == [1, 2, 3]
    r.put(s, 4)  # after close: written in the caller's thread, never dropped
    assert r.commits[-1] == [4] and (4, True) in r.then


def test_flush_waits_for_the_commit_in_progress() -> None:
    r = Recorder()
    with r.running() as s:
        r.gate.clear()
        r.put(s, 1)
        assert r.started.wait(5)
        done = flushing(s)
        time.sleep(0.1)
        assert not done.is_set()
        r.gate.set()
        wait_until(done.is_set, 5, what="flush to return")
        assert r.commits == [[1]]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Saver(lambda items: [True for _ in items], lambda _i, _e, _n: None, limit=0)


def test_room_outside_the_limit_is_given_at_once() -> None:
    """An application's on-demand refresh does not queue behind the pass's room."""
    r = Recorder()
    with r.running(limit=1) as s:
        with s.reserve():
            room = s.reserve(counted=False)  # the one room is taken: not waited for
            assert room.put(1, lambda _saved: None, wait=True).saved is True
        s.put(2, lambda _saved: None, wait=True)  # the counted room came back once
        assert r.commits == [[1], [2]]


def test_flush_waits_only_for_what_was_handed_in_before_it() -> None:
    r = Recorder()
    with r.running(limit=8) as s:
        r.gate.clear()
        r.put(s, 1)
        assert r.started.wait(5)
        r.put(s, 2)
        done = flushing(s)
        time.sleep(0.05)
        r.put(s, 3)  # handed in after the flush began
        r.gate.set()
        wait_until(done.is_set, 5, what="flush to return")
        assert [i for c in r.commits for i in c][:2] == [1, 2]
        s.flush()
        assert s.pending() == 0


def test_stopping_after_a_failed_commit_holds_without_another_try() -> None:
    """A stop while the database fails: no second wait (up to a connection timeout)
    before the tokens are on disk."""
    stopping = threading.Event()
    r = Recorder(fail={1})
    with r.running(limit=8, stopping=stopping) as s:
        s.put(1, lambda _saved: None, wait=True)  # the commit fails
        stopping.set()
        s.put(2, lambda _saved: None, wait=True)
        assert r.tried == [[1]] and [i for i, _ in r.held] == [1, 2]
        assert r.held_tried == {1: 1, 2: 0}
        stopping.clear()
        r.fail.clear()
        s.put(3, lambda _saved: None, wait=True)  # not stopping: tried again
        assert r.commits == [[3]]


def test_a_saver_thread_that_dies_leaves_nobody_waiting() -> None:
    class Fatal(BaseException):
        pass

    written: list[int] = []

    def write(items: Sequence[int]) -> list[bool]:
        if not written:
            written.append(0)
            raise Fatal("the thread ends")
        written.extend(items)
        return [True] * len(items)

    held: list[int] = []
    s: Saver[int] = Saver(write, lambda item, _e, _n: held.append(item), limit=1)
    job = s.put(1, lambda _saved: None)
    assert job.done.wait(5) and job.saved is None and held == [1]
    s.flush()  # returns
    assert s.put(2, lambda _saved: None).saved is True  # room came back; caller writes
    assert written == [0, 2]
    s.close()
