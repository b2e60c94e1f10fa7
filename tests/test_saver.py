"""The saver (tokend.saver): group commit, a bounded queue, failures held, nothing lost
at close. Driven with a recording ``write`` (no database: the store's own ``save_many``
is in test_store; the pass with it in test_maintenance)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from faultlib import wait_until
from tokend.saver import MOST_PER_COMMIT, Saver


class Recorder:
    """A ``write`` that records each commit; ``gate``: a commit waits until it is set;
    ``fail``: items whose commit raises."""

    def __init__(self, *, fail: set[int] | None = None, guard_fails: set[int] | None = None,
                 ) -> None:
        self.commits: list[list[int]] = []
        self.tried: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = fail or set()
        self.guard_fails = guard_fails or set()
        self.held: list[tuple[int, str]] = []
        self.then: list[tuple[int, bool | None]] = []

    def write(self, items: Sequence[int]) -> list[bool]:
        self.tried.append(list(items))
        self.started.set()
        self.gate.wait(10)
        if self.fail & set(items):
            raise RuntimeError("database gone")
        self.commits.append(list(items))
        return [i not in self.guard_fails for i in items]

    def failed(self, item: int, error: BaseException) -> None:
        self.held.append((item, str(error)))

    def saver(self, limit: int = 4) -> Saver[int]:
        return Saver(self.write, self.failed, limit=limit)

    def put(self, saver: Saver[int], item: int, **kw: bool) -> None:
        saver.put(item, lambda saved: self.then.append((item, saved)), **kw)


def test_what_queues_during_a_commit_goes_in_the_next_one() -> None:
    r = Recorder()
    s = r.saver(limit=8)
    try:
        r.gate.clear()
        r.put(s, 1)
        assert r.started.wait(5)  # 1 is being written; 2..5 queue meanwhile
        for i in range(2, 6):
            r.put(s, i)
        r.gate.set()
        s.flush()
        assert r.commits == [[1], [2, 3, 4, 5]]
        assert sorted(r.then) == [(i, True) for i in range(1, 6)]
        assert s.pending() == 0
    finally:
        s.close()


def test_room_is_taken_before_the_outcome_exists_and_given_back_once_it_is_written(
        ) -> None:
    """``limit`` bounds requests in flight (room reserved) and outcomes queued or being
    written, together: what a kill -9 could lose."""
    r = Recorder()
    s = r.saver(limit=2)
    try:
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
    finally:
        s.close()


def test_room_not_used_is_given_back_and_a_room_holds_one_outcome() -> None:
    r = Recorder()
    s = r.saver(limit=1)
    try:
        with s.reserve():
            pass  # the request failed: nothing to save
        room = s.reserve()  # the room came back
        room.put(1, lambda _saved: None, wait=True)
        with pytest.raises(RuntimeError):
            room.put(2, lambda _saved: None)
        room.cancel()  # used: nothing to give back twice
        s.put(3, lambda _saved: None, wait=True)  # the saver's one room is free again
        assert r.commits == [[1], [3]]
    finally:
        s.close()


def test_a_commit_is_never_larger_than_the_most_per_commit() -> None:
    r = Recorder()
    n = MOST_PER_COMMIT + 10
    s = r.saver(limit=n)
    try:
        r.gate.clear()
        r.put(s, 0)
        assert r.started.wait(5)
        for i in range(1, n):
            r.put(s, i)
        r.gate.set()
        s.flush()
        assert [len(c) for c in r.commits] == [1, MOST_PER_COMMIT, n - 1 - MOST_PER_COMMIT]
    finally:
        s.close()


def test_a_failed_commit_hands_every_outcome_in_it_to_failed() -> None:
    r = Recorder(fail={2})
    s = r.saver(limit=8)
    try:
        r.gate.clear()
        r.put(s, 1)
        assert r.started.wait(5)
        r.put(s, 2)
        r.put(s, 3)
        r.gate.set()
        s.flush()
        r.put(s, 4)  # the saver goes on after a failed commit
        s.flush()
        assert r.commits == [[1], [4]]
        assert r.held == [(2, "database gone"), (3, "database gone")]
        assert sorted(r.then) == [(1, True), (2, None), (3, None), (4, True)]
    finally:
        s.close()


def test_what_queued_behind_a_failed_commit_is_held_without_a_second_wait() -> None:
    r = Recorder(fail={1})
    s = r.saver(limit=8)
    try:
        r.gate.clear()
        r.put(s, 1)
        assert r.started.wait(5)
        r.put(s, 2)
        r.put(s, 3)
        r.gate.set()
        s.flush()
        assert r.tried == [[1]]  # the database just failed: 2 and 3 are not tried
        assert [i for i, _ in r.held] == [1, 2, 3]
        assert sorted(r.then) == [(1, None), (2, None), (3, None)]
    finally:
        s.close()


def test_a_guard_that_fails_is_reported_per_outcome() -> None:
    r = Recorder(guard_fails={2})
    s = r.saver()
    try:
        for i in (1, 2, 3):
            r.put(s, i)
        s.flush()
        assert sorted(r.then) == [(1, True), (2, False), (3, True)]
        assert r.held == []
    finally:
        s.close()


def test_a_callback_that_raises_stops_neither_the_others_nor_the_saver() -> None:
    r = Recorder()
    s = r.saver()
    seen: list[int] = []

    def boom(_saved: bool | None) -> None:
        raise ValueError("a bug in a callback")

    try:
        r.gate.clear()
        s.put(1, lambda _saved: seen.append(1))
        assert r.started.wait(5)
        s.put(2, boom)
        s.put(3, lambda _saved: seen.append(3))
        r.gate.set()
        s.flush()
        s.put(4, lambda _saved: seen.append(4), wait=True)
        assert seen == [1, 3, 4]
    finally:
        s.close()


def test_wait_returns_once_written_and_says_how() -> None:
    r = Recorder(guard_fails={2}, fail={3})
    s = r.saver()
    try:
        assert s.put(1, lambda _s: None, wait=True).saved is True
        assert s.put(2, lambda _s: None, wait=True).saved is False
        job = s.put(3, lambda _s: None, wait=True)
        assert job.saved is None and r.held == [(3, "database gone")]
    finally:
        s.close()


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
    s = r.saver()
    try:
        r.gate.clear()
        r.put(s, 1)
        assert r.started.wait(5)
        done = threading.Event()

        def flush() -> None:
            s.flush()
            done.set()

        t = threading.Thread(target=flush)
        t.start()
        time.sleep(0.1)
        assert not done.is_set()
        r.gate.set()
        wait_until(done.is_set, 5, what="flush to return")
        assert r.commits == [[1]]
    finally:
        s.close()


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Saver(lambda items: [True for _ in items], lambda _i, _e: None, limit=0)
