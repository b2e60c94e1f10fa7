"""Group commit of rotated tokens: one thread saves what the refresh workers hand it.

A worker that received new tokens hands the outcome here and takes its next grant: it
does not wait while the database answers. The saver writes whatever queued meanwhile in
ONE transaction (on SQLite one commit and one fsync for all of them): the busier the
pass, the more each commit carries, and the database work of a pass runs in one thread
instead of sixteen that take turns on the GIL. Measured on a 2-core machine: throughput
went from 0.89-0.94 to 0.97-1.0 of a bare-requests reference (docs/benchmarks.md).

What keeps the rotated token safe is unchanged:

* the grant stays leased until its outcome is written: nobody refreshes it meanwhile;
* a worker takes room for its outcome (``reserve``) BEFORE the request that rotates the
  token, and the room is given back once the outcome is written or held: requests in
  flight and outcomes waiting here are never more than ``limit`` together
  (:func:`room_for`: a quarter more than the workers), the most a ``kill -9`` can lose;
* on PostgreSQL a commit locks its rows in id order, as every write of several rows
  does (no deadlock with ``keys rotate`` or a plan);
* an outcome whose save fails is handed to ``failed`` (the caller holds it: spooled to
  disk at once and replayed in the background, :mod:`tokend.spool`), and so is what
  queued behind it;
* ``flush`` returns once everything handed in before it is written or held: a pass
  ends only then, and ``close`` writes what is left before the process exits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from . import logs

log = logs.get("tokend.saver")
T = TypeVar("T")
MOST_PER_COMMIT = 64  # a commit's size stays small: one slow statement delays few


def room_for(concurrency: int) -> int:
    """Room for new tokens not yet saved (requests in flight and outcomes waiting) with
    ``concurrency`` workers: a quarter more than the workers, so that a worker whose
    outcome waits for the commit can send its next request at once (with room for
    exactly ``concurrency`` it waited for the saver, and the pass was no faster than
    when each worker saved its own). The most a ``kill -9`` can lose."""
    return concurrency + max(1, concurrency // 4)


@dataclass(eq=False)
class Job(Generic[T]):
    """One outcome to write. ``then(saved)`` runs once it is written (True; False: its
    guard failed) or, after ``failed``, held (None)."""

    item: T
    then: Callable[[bool | None], None]
    counted: bool = True  # holds one of the saver's ``limit`` rooms
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    saved: bool | None = None  # None: not written (held by ``failed``)


class Room(Generic[T]):
    """Room for one outcome in a :class:`Saver`, taken before the request; given back by
    the saver once the outcome put here is written or held, or by ``cancel`` (also at
    the end of a ``with`` block) if none was put."""

    def __init__(self, saver: Saver[T], *, counted: bool = True) -> None:
        self._saver = saver
        self._counted = counted
        self._open = True

    def put(self, item: T, then: Callable[[bool | None], None], *,
            wait: bool = False) -> Job[T]:
        """Queue ``item``; ``wait``: return once it is written or held."""
        if not self._open:
            raise RuntimeError("this room is used or given back")
        self._open = False
        return self._saver._put(Job(item, then, self._counted), wait)

    def cancel(self) -> None:
        if self._open:
            self._open = False
            if self._counted:
                self._saver._room.release()

    def __enter__(self) -> Room[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Saver(Generic[T]):
    """``write(items)``: the store's save of several outcomes in one transaction, one
    bool per item (True written, False guard failed); raises if the commit failed (then
    none of it is written). ``failed(item, error, tried)``: what to do with an item
    whose write failed (hold it); ``tried``: how many outcomes the failed commit held (0:
    not tried, because the commit before it failed). ``stopping()``: True once the
    process stops; then, after a failed commit, outcomes are held without another try."""

    def __init__(self, write: Callable[[Sequence[T]], list[bool]],
                 failed: Callable[[T, Exception, int], None], *, limit: int,
                 stopping: Callable[[], bool] = lambda: False,
                 name: str = "tokend-saver") -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._write = write
        self._failed = failed
        self._stopping = stopping
        self.limit = limit
        self._room = threading.BoundedSemaphore(limit)
        self._queue: list[Job[T]] = []
        self._current: list[Job[T]] = []  # the commit being written
        self._handed = 0  # jobs queued so far
        self._finished = 0  # of those, written or held (in queue order)
        self._closed = False
        self._last_error: Exception | None = None  # of the last commit, if it failed
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def reserve(self, *, counted: bool = True) -> Room[T]:
        """Room for one outcome; blocks while ``limit`` are taken (in flight or queued).
        ``counted=False``: outside the limit, at once (an application waits for it, and
        for its save: :mod:`tokend.ondemand`)."""
        if counted:
            self._room.acquire()
        return Room(self, counted=counted)

    def put(self, item: T, then: Callable[[bool | None], None], *,
            wait: bool = False) -> Job[T]:
        """``reserve()`` and put ``item`` there."""
        return self.reserve().put(item, then, wait=wait)

    def _put(self, job: Job[T], wait: bool) -> Job[T]:
        """Queue a job that holds room; after ``close`` the caller writes it itself."""
        with self._cond:
            closed = self._closed
            self._handed += 1
            if not closed:
                self._queue.append(job)
                self._cond.notify_all()
        if closed:
            self._commit([job])
        elif wait:
            job.done.wait()
        return job

    def pending(self) -> int:
        """Outcomes handed in and not yet written or held."""
        with self._cond:
            return self._handed - self._finished

    def flush(self) -> None:
        """Return once everything handed in before this call is written or held (what is
        handed in meanwhile does not keep it waiting)."""
        with self._cond:
            target = self._handed
            while self._finished < target:
                self._cond.wait()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        try:
            while self._one_commit():
                pass
        except BaseException as exc:  # never leave workers waiting for room or a flush
            log.critical("saver_stopped", error=type(exc).__name__, detail=str(exc)[:200])
            with self._cond:
                self._closed = True
                left = [j for j in self._current if not j.done.is_set()] + self._queue
                self._queue.clear()
            self._finish(left, exc if isinstance(exc, Exception) else RuntimeError(
                "the saver thread stopped"), 0)

    def _one_commit(self) -> bool:
        """Write the next commit's jobs; False once closed and empty."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return False
            jobs = self._current = self._queue[:MOST_PER_COMMIT]
            del self._queue[:MOST_PER_COMMIT]
        if self._last_error is not None and self._stopping():
            # Stopping, and the database just failed: held at once, no second wait (up
            # to a connection timeout) before systemd's stop timeout.
            self._finish(jobs, self._last_error, 0)
            return True
        self._last_error = self._commit(jobs)
        if self._last_error is not None:
            # What queued behind a failed commit is held at once too.
            with self._cond:
                behind = self._queue[:]
                self._queue.clear()
            self._finish(behind, self._last_error, 0)
        return True

    def _commit(self, jobs: list[Job[T]]) -> Exception | None:
        """Write ``jobs`` in one commit; the error if it failed (they are then held)."""
        try:
            written = self._write([j.item for j in jobs])
            if len(written) != len(jobs):
                raise RuntimeError(f"{len(written)} results for {len(jobs)} outcomes")
        except Exception as exc:  # every job is held; the replay saves them one by one
            self._finish(jobs, exc, len(jobs))
            return exc
        self._finish(jobs, written, len(jobs))
        return None

    def _finish(self, jobs: list[Job[T]], results: list[bool] | Exception,
                tried: int) -> None:
        """The error boundary of a commit's jobs: whatever happens, each ends written or
        handed to ``failed``, its callback runs, its room is given back and its waiter
        is woken."""
        for i, job in enumerate(jobs):
            try:
                if isinstance(results, Exception):
                    self._failed(job.item, results, tried)
                    job.then(None)
                else:
                    job.saved = results[i]
                    job.then(results[i])
            except Exception as exc:  # one job's callback never stops the others
                log.error("saver_callback_failed", error=type(exc).__name__,
                          detail=str(exc)[:200])
            finally:
                job.done.set()
                if job.counted:
                    self._room.release()
                with self._cond:
                    self._finished += 1
                    self._cond.notify_all()
