"""The maintenance pass: claim due grants under a lease, refresh them, save each result.

The pass is the I/O shell around :mod:`tokend.policy`. Its order of events is what keeps
grants alive:

1. claim a small batch and COMMIT the lease (the refresh is now "in flight");
2. call the provider, bounded by ``schedule.concurrency`` and ``provider.rate_limit``;
3. save the outcome. New tokens go to the saver (:mod:`tokend.saver`): the worker takes
   its next grant while one thread writes what queued meanwhile in one transaction, the
   grant leased until then. If that save fails for any reason the rotated token is
   held: spooled to disk at once (:mod:`tokend.spool`) and saved by a background replay
   (or by the next process, before it claims): a rotated refresh token is never dropped.

Each grant is handled inside an error boundary: one grant's failure never ends a pass.

Its size is one concern: the order of claim, refresh, save and hold above, kept in one
class so that the steps which keep a rotated token alive can be read (and reviewed) together;
the decisions are in :mod:`tokend.policy`, the holding in :mod:`tokend.spool`.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from . import (
    circuit,
    consent,
    events,
    leases,
    logs,
    owners,
    planner,
    policy,
    saver,
    spool,
    state,
)
from .config import ClientConfig, Config
from .errors import DecryptError, ErrorKind, NotSent, ProviderError, StoreError
from .metrics import Metrics
from .model import AttemptResult, Grant, GrantType, Outcome, Status, TokenResponse
from .provider import ProviderClient
from .sharedlimit import SharedRateLimiter, limiter_for
from .store import Clock, Store

log = logs.get("tokend.maintenance")
PLAN_EVERY_MOST = 300.0  # seconds: the most the refresh_margin_min rule holds a plan back
PLAN_WRITE_BATCH = 1000  # planned moves written per transaction while the walk goes on


class _Rotated(NamedTuple):
    """An outcome with new tokens on its way to the saver."""

    grant: Grant
    outcome: Outcome
    event: dict[str, Any] | None


@dataclass
class PassResult:
    claimed: int = 0
    refreshed: int = 0
    failed: int = 0
    skipped: int = 0  # claimed but given back (shutdown) or nothing to do over HTTP
    failures: Counter[AttemptResult] = field(default_factory=Counter)  # by kind
    duration: float = 0.0
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return self.failed == 0


def lease_for(config: Config) -> timedelta:
    """Longer than any attempt can take: HTTP timeout (connect + read), a wait for the
    rate limiter, and the saving, with a wide margin."""
    return max(timedelta(minutes=2), config.provider.timeout * 6)


def owner_id() -> str:
    return owners.new_owner()


class Maintenance:
    def __init__(self, config: Config, store: Store, provider: ProviderClient, *,
                 metrics: Metrics | None = None, owner: str | None = None,
                 rand: Callable[[], float] = random.random,
                 save_retry: float = 1.0, stop: threading.Event | None = None,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.store = store
        self.provider = provider
        self.metrics = metrics or Metrics()
        self.owner = owner or owner_id()
        # Held for the lifetime of this engine: while it is, our leases are ours; once
        # this process is gone, a process of this host takes them over at once.
        self.owners_dir = state.prepare(config, "owners")
        self.owner_lock = owners.OwnerLock(self.owners_dir, self.owner)
        self.rand = rand
        self.save_retry = save_retry
        # Shared with the daemon (and its notifier): one signal stops every part.
        self.stop_event = stop if stop is not None else threading.Event()
        self.clock: Clock = clock or store.clock
        # Shared by all replicas on PostgreSQL (tokend.sharedlimit), per process on SQLite.
        self.limiter = limiter_for(store, config.provider.rate_limit,
                                   on_missed=self.metrics.slot_missed)
        # The schedule with the margin the planner chose (tokend.planner); refresh_before
        # until the first plan.
        self.schedule = config.schedule
        self.capacity: planner.Capacity | None = None
        self.planned_at: datetime | None = None  # of self.capacity (store clock)
        self._plan_after = 0.0  # monotonic: no plan before this
        self.metrics.capacity(0.0, self.limiter.rate)
        self.lease = lease_for(config)
        self.pool = ThreadPoolExecutor(config.schedule.concurrency,
                                       thread_name_prefix="tokend-refresh")
        self.pass_running = threading.Event()
        self.pass_started: float | None = None
        # One circuit per client (tokend.circuit); a new process starts them unknown.
        self.circuits: dict[str, circuit.Circuit] = {
            name: circuit.Circuit() for name in config.clients}
        self._circuit_lock = threading.Lock()
        self._probes: set[int] = set()  # ids of the grants now probing their client
        self._unreleased: set[str] = set()  # closed circuits whose release failed
        self.held = spool.Held(spool.Spool(lambda: state.prepare(config, "spool")),
                               store.cipher, self._replay_save,
                               on_count=self.metrics.held.set, retry=save_retry)
        self.saver: saver.Saver[_Rotated] = saver.Saver(
            self._write_rotated, self._hold_rotated,
            limit=saver.room_for(config.schedule.concurrency),
            stopping=self.stop_event.is_set)

    def stop(self) -> None:
        """Stop claiming; attempts in flight finish and are saved (or spooled)."""
        self.stop_event.set()

    def close(self) -> None:
        self.stop_event.set()
        self.pool.shutdown(wait=True)
        self.saver.close()  # what is queued is written (or held) first
        self.held.close()
        self.owner_lock.release()

    # ------------------------------------------------------------------ the pass

    def run_pass(self) -> PassResult:
        started = time.monotonic()
        self.pass_started = started
        self.pass_running.set()
        result = PassResult()
        try:
            cc = [c.name for c in self.config.clients.values() if c.client_credentials]
            # Held outcomes (also a dead predecessor's, from the spool) first: their grants'
            # stored refresh tokens are spent.
            self.held.recover()
            self.store.ensure_client_credentials(cc)
            self._take_over_dead_owners()
            self._probe(result)
            self._plan()
            self._drain(result)
        finally:
            self.saver.flush()  # the pass's tokens are written (or held) when it ends
            result.duration = time.monotonic() - started
            result.stopped = self.stop_event.is_set()
            self.pass_running.clear()
        return result

    def _take_over_dead_owners(self) -> None:
        """Leases of processes of this host that are gone end now (one directory listing
        when there are none)."""
        with owners.dead(self.owners_dir, self.owner) as gone:
            if gone:
                n = self.store.expire_leases_of(gone)
                log.warning("dead_owner_leases_taken_over", owners=gone, grants=n,
                            detail="a tokend of this host ended without a clean stop; its "
                                   "grants are due now, in doubt")

    def _plan(self) -> None:
        """The planner's margin and moves (tokend.planner); at most a tenth of the time
        goes to planning, and a table is planned at most every quarter of
        refresh_margin_min (5 minutes at most), so not every pass plans."""
        started = time.monotonic()
        if started < self._plan_after:
            return
        s = self.config.schedule
        moved = 0
        try:
            now = self.store.clock()
            moves: dict[int, tuple[Any, datetime]] = {}
            with self.store.plan_snapshot(now) as (total, points):
                walk = planner.Walk(now.timestamp(), self.limiter.rate,
                                    s.refresh_margin_min, total, sends=self._sends())
                for point, stored in points:
                    at = walk.step(point)
                    if at is not None:
                        moves[point.id] = (stored, datetime.fromtimestamp(at, UTC))
                    if len(moves) >= PLAN_WRITE_BATCH:  # written as found: flat memory
                        moved += self.store.replan(moves)
                        moves.clear()
            moved += self.store.replan(moves)
            capacity = walk.capacity(s.refresh_before)
        except Exception as exc:  # an optimisation: the pass goes on with the last plan
            log.warning("plan_failed", error=_error_text(exc))
            return
        finally:
            # A plan reads the whole table, and between two passes little changes: the
            # next comes after 9 x this one's time (a tenth of the time at most) and not
            # before a quarter of refresh_margin_min (at most 5 minutes): a wall that an
            # import makes meanwhile is levelled long before any margin runs out.
            self._plan_after = time.monotonic() + max(
                9 * (time.monotonic() - started),
                min(s.refresh_margin_min.total_seconds() / 4, PLAN_EVERY_MOST))
        if capacity.margin != self.schedule.refresh_before:
            log.warning("refresh_margin_changed", margin_s=capacity.margin.total_seconds(),
                        aim_s=s.refresh_before.total_seconds(),
                        needed_per_s=round(capacity.needed, 3), limit_per_s=capacity.limit)
        if capacity.limit and capacity.ratio > planner.ALERT_RATIO and (
                self.capacity is None or self.capacity.ratio <= planner.ALERT_RATIO):
            log.warning("capacity_low", needed_per_s=round(capacity.needed, 3),
                        limit_per_s=capacity.limit, detail=planner.describe(capacity))
        self.schedule = replace(s, refresh_before=capacity.margin)
        self.capacity = capacity
        self.planned_at = now
        self.metrics.capacity(capacity.needed, capacity.limit)
        if moved:
            log.info("refreshes_spread", moved=moved)

    def _sends(self) -> float:
        """Requests/s the limiter really sends (its interval carries a guard: 4.85/s of
        5/s, in-process or shared): the plan's budget is a share of this, not of the
        configured limit, which the gauge and the alert keep showing."""
        return 0.0 if self.limiter.unlimited else 1 / self.limiter.interval

    def _drain(self, result: PassResult) -> None:
        concurrency = self.config.schedule.concurrency
        batch = min(self.config.schedule.batch_size, concurrency * 2)
        # Claimed but unfinished attempts: enough that a worker never waits for the next
        # claim (the next batch is claimed while `concurrency` more are still queued
        # behind the running ones), few enough that leases stay short...
        most = 2 * concurrency + batch - 1
        rate = wait = backlog = 0.0
        if not self.limiter.unlimited:
            # ...also at the rate limiter's pace: the last one claimed must start well
            # within its lease, or another replica may take it over and spend its token;
            # and a grant due now must not queue behind claims longer than a quarter of
            # the smallest margin (tokend.planner: its token could expire meanwhile).
            # Shared by replicas, that queue is all of theirs (planner.claim_now).
            rate = self.limiter.rate
            wait = min(self.lease.total_seconds() / 2,
                       self.config.schedule.refresh_margin_min.total_seconds() / 4)
            most = max(1, min(most, int(rate * wait)))
        shared = self.limiter if isinstance(self.limiter, SharedRateLimiter) else None
        workers = concurrency if shared is not None else 0  # planner.claim_now
        # Finished attempts report here: the loop wakes once per finished attempt, in
        # O(1) (``concurrent.futures.wait`` re-registers a waiter on every pending future).
        finished: queue.SimpleQueue[Future[AttemptResult]] = queue.SimpleQueue()
        in_flight = 0
        exhausted = False
        try:
            while True:
                held_back = False
                while not exhausted and not self.stop_event.is_set():
                    n = planner.claim_now(in_flight=in_flight, most=most, batch=batch,
                                          workers=workers)
                    if n and shared is not None:
                        # Ours that hold slots are in the backlog; the queued ones not.
                        backlog = shared.backlog()
                        n = planner.claim_now(
                            in_flight=in_flight, most=most, batch=batch,
                            workers=workers, rate=rate, wait=wait, backlog=backlog,
                            ahead=max(0, in_flight - concurrency))
                        held_back = not n
                    if not n:
                        break
                    claimed_at = time.monotonic()  # before the lease starts: conservative
                    claims = self.store.claim_due(self.owner, n, self.lease)
                    result.claimed += len(claims)
                    exhausted = not claims
                    for grant in claims:
                        self.pool.submit(self._guarded, grant, claimed_at,
                                         wait_saved=False).add_done_callback(finished.put)
                        in_flight += 1
                if not in_flight:
                    if not held_back:
                        break
                    # Other replicas' slots fill the next `wait`: look again when a
                    # claim would fit (within a second).
                    self.stop_event.wait(min(1.0, max(backlog - wait, 1 / rate)))
                    continue
                try:
                    fut = finished.get(timeout=1.0)
                except queue.Empty:
                    continue
                in_flight -= 1
                _count(result, fut.result())
        finally:
            # A claim error (database down) ends the pass, but what is in flight is
            # finished and saved first.
            while in_flight:
                fut = finished.get()
                in_flight -= 1
                _count(result, fut.result())

    def _probe(self, result: PassResult) -> None:
        """Before anything else is claimed: one probe for each client whose circuit asks
        for one (all of them at start-up, an open one once per backoff step)."""
        for name in sorted(self._unreleased):
            self._release_held(name, was_blocked=False)
        now = self.clock()
        with self._circuit_lock:
            due = [name for name, c in self.circuits.items() if circuit.probe_due(c, now)]
        probes: list[Future[AttemptResult]] = []
        try:
            for name in due:
                if self.stop_event.is_set():
                    break
                claimed_at = time.monotonic()  # before the lease starts: conservative
                grant = self.store.claim_probe(name, circuit.MARKERS, self.owner, self.lease)
                if grant is None:
                    with self._circuit_lock:
                        self.circuits[name] = circuit.nothing_to_probe(self.circuits[name])
                    continue
                result.claimed += 1
                self._probes.add(grant.id)
                # A probe waits for its save: the plan, next, sees the table as it is.
                probes.append(self.pool.submit(self._guarded, grant, claimed_at))
        finally:
            # A claim error ends the pass, but the probes sent are judged first.
            for fut in probes:
                _count(result, fut.result())
            self._probes.clear()

    def _guarded(self, grant: Grant, claimed_at: float | None = None, *,
                 priority: bool = False, wait_saved: bool = True) -> AttemptResult:
        if self.held.holds(grant.id):
            # Its new refresh token waits to be saved; the stored one is spent.
            log.info("grant_held", grant_id=grant.id, client=grant.client,
                     detail="not refreshed: its rotated token is not saved yet")
            return AttemptResult.HELD
        try:
            return self.attempt(grant, claimed_at, priority=priority,
                                wait_saved=wait_saved)
        except Exception as exc:  # the error boundary: log, count, go on
            log.error("grant_attempt_crashed", grant_id=grant.id, client=grant.client,
                      error=type(exc).__name__, detail=str(exc)[:200])
            return AttemptResult.INTERNAL

    # ------------------------------------------------------------------ one grant

    def attempt(self, grant: Grant, claimed_at: float | None = None, *,
                priority: bool = False, wait_saved: bool = True) -> AttemptResult:
        """Handle one claimed grant; returns how the attempt ended.

        ``claimed_at``: the monotonic time read just before the claim (see
        :mod:`tokend.leases`); a refresh is only sent while the lease has room for it.
        ``priority``: an application waits for it (:mod:`tokend.ondemand`).
        ``wait_saved``: return once new tokens are written (or held); else as soon as
        the saver has them (a pass: ``run_pass`` waits for them all at its end).
        """
        now = self.clock()
        client = self.config.clients.get(grant.client)
        is_cc = grant.grant_type == GrantType.CLIENT_CREDENTIALS
        refresh: str | None = None
        tokens_error: str | None = None
        if client is not None:
            try:
                refresh = self.store.refresh_token(grant)
            except DecryptError as exc:
                tokens_error = str(exc)
        blocked = None
        if grant.id not in self._probes and not self._admits(grant.client):
            blocked = policy.Blocked(circuit.hold_until(grant, now, self.config.schedule),
                                     circuit.HELD)
        decision = policy.plan(grant, now, self.schedule, client_known=client is not None,
                               tokens_error=tokens_error, has_refresh=refresh is not None,
                               blocked=blocked, priority=priority)
        if isinstance(decision, policy.Fail):
            return self._failed(grant, decision.error, now, None)
        if isinstance(decision, policy.Save):
            if decision.why == policy.SAVE_UNDECRYPTABLE:
                log.error("grant_undecryptable", grant_id=grant.id, client=grant.client,
                          error=tokens_error)
            self._save(grant, decision.outcome)
            return decision.result
        assert client is not None
        # Room for the new tokens before they exist: requests in flight and tokens not
        # yet saved are never more than saver.room_for(concurrency) together (what a
        # kill -9 can lose). An application's refresh waits for its save: not counted.
        with self.saver.reserve(counted=not priority) as room:
            admitted = not self.stop_event.is_set() and self.limiter.acquire(
                self.stop_event, priority=priority)
            left = (leases.remaining(claimed_at, self.lease, time.monotonic())
                    if claimed_at is not None else None)
            go = policy.send_now(admitted=admitted, lease_left=left,
                                 timeout=self.config.provider.timeout)
            if isinstance(go, policy.Release):
                if go.why == policy.RELEASE_LEASE_TOO_SHORT:
                    assert left is not None
                    log.warning("lease_too_short", grant_id=grant.id, client=grant.client,
                                lease_left_s=round(left.total_seconds(), 1))
                room.cancel()
                self._release(grant)
                return AttemptResult.RELEASED
            t0 = time.monotonic()
            try:
                if is_cc:
                    resp = self.provider.client_credentials(client)
                else:
                    assert refresh is not None
                    resp = self.provider.refresh(client, refresh)
            except ProviderError as err:
                room.cancel()  # nothing rotated
                self.metrics.attempt(grant.client, grant.grant_type, time.monotonic() - t0)
                return self._failed(grant, err, self.clock(), client)
            except NotSent:  # stopping while it waited for a new slot: given back unsent
                room.cancel()
                self._release(grant)
                return AttemptResult.RELEASED
            self.metrics.attempt(grant.client, grant.grant_type, time.monotonic() - t0)
            return self._succeeded(grant, resp, refresh, room,
                                   wait_saved=wait_saved or priority)

    def _succeeded(self, grant: Grant, resp: TokenResponse, old_refresh: str | None,
                   room: saver.Room[_Rotated], *, wait_saved: bool) -> AttemptResult:
        now = self.clock()
        outcome = policy.after_success(grant, resp, now, self.schedule,
                                       self.config.provider.refresh_token_ttl,
                                       previous_refresh=old_refresh)
        outcome, event = self._with_event(grant, outcome)
        duration_ms = round((now - resp.sent_at).total_seconds() * 1000, 1)

        def then(saved: bool | None) -> None:  # in the saver's thread, once written
            if saved is not None:
                self._saved(grant, outcome, event, saved)
            log.info("refreshed", grant_id=grant.id, client=grant.client,
                     grant_type=grant.grant_type, outcome="ok", status=outcome.status.value,
                     rotated=outcome.refresh_token is not None,
                     access_expires_at=_iso(outcome.access_expires_at),
                     next_due=_iso(outcome.next_attempt_at), duration_ms=duration_ms,
                     saved=bool(saved))

        room.put(_Rotated(grant, outcome, event), then, wait=wait_saved)
        self._judge(grant, None)  # after the new tokens are in the saver's hands
        return AttemptResult.OK

    def _failed(self, grant: Grant, err: ProviderError, now: datetime,
                client: ClientConfig | None) -> AttemptResult:
        outcome = policy.after_failure(grant, err, now, self.schedule, rand=self.rand())
        kind = err.kind.value
        self.metrics.failure(grant.client, grant.grant_type, kind, err.error)
        level = "warning" if err.kind is ErrorKind.TRANSIENT else "error"
        getattr(log, level)(
            "refresh_failed", grant_id=grant.id, client=grant.client,
            grant_type=grant.grant_type, outcome="failed", kind=kind, error=err.error,
            http_status=err.status, hint=err.hint, status=outcome.status.value,
            reason=outcome.reason, failures=outcome.failure_count,
            in_doubt=outcome.in_doubt, next_due=_iso(outcome.next_attempt_at))
        self._save(grant, outcome)
        if client is not None:
            self._judge(grant, err)
        return AttemptResult(kind)

    # ------------------------------------------------------------------ the client's circuit

    def _admits(self, client: str) -> bool:
        with self._circuit_lock:
            return circuit.admits(self.circuits.get(client, circuit.Circuit()))

    def _judge(self, grant: Grant, err: ProviderError | None) -> None:
        """Update the grant's client circuit with the answer to its attempt."""
        name = grant.client
        with self._circuit_lock:
            old = self.circuits.get(name, circuit.Circuit())
            new = circuit.after(old, circuit.verdict(err), self.clock(),
                                self.config.schedule, probe=grant.id in self._probes,
                                rand=self.rand())
            self.circuits[name] = new
        if new == old:
            return
        self.metrics.client_blocked(name, new.blocked)
        if circuit.opened(old, new):
            log.error("client_authentication_failed", client=name, circuit="open",
                      next_probe=_iso(new.next_probe_at),
                      detail="the provider refuses the client's id/secret or auth_method; "
                             "its grants are NOT flagged for re-consent and are not sent; "
                             "one probe per backoff step until it is accepted")
        elif new.blocked:
            log.warning("client_probe_refused", client=name, refusals=new.refusals,
                        next_probe=_iso(new.next_probe_at))
        elif circuit.closed(old, new):
            self._release_held(name, was_blocked=old.blocked)

    def _release_held(self, name: str, *, was_blocked: bool) -> None:
        """The client is accepted: its grants that waited for it are due at once."""
        try:
            released = self.store.release_held(name, circuit.MARKERS, circuit.release_order)
        except StoreError as exc:  # tried again at the start of the next pass
            self._unreleased.add(name)
            log.error("client_release_failed", client=name, error=str(exc))
            return
        self._unreleased.discard(name)
        if was_blocked or released:
            log.warning("client_authentication_restored", client=name, circuit="closed",
                        released=released,
                        detail="the provider accepts the client again; its waiting grants "
                               "are due now, earliest access-token expiry first")

    # ------------------------------------------------------------------ saving

    def _with_event(self, grant: Grant, outcome: Outcome,
                    ) -> tuple[Outcome, dict[str, Any] | None]:
        """The outcome with its reminder moment, and the notification it raises."""
        outcome, reminder = policy.remind(grant, outcome, self.clock(), self.schedule)
        return outcome, self._event(grant, outcome, reminder)

    def _save(self, grant: Grant, outcome: Outcome) -> bool:
        """Save an outcome without new tokens, retrying while the database is
        unreachable; given up when the daemon stops (the lease then expires and the grant
        is simply retried). New tokens go to the saver instead (``_succeeded``)."""
        outcome, event = self._with_event(grant, outcome)
        delay = self.save_retry
        while True:
            try:
                return self._saved(grant, outcome, event,
                                   self.store.save(grant, outcome, self.owner, event))
            except StoreError as exc:
                if self.stop_event.is_set():
                    log.error("save_abandoned", grant_id=grant.id, error=str(exc))
                    return False
                log.error("save_failed_retrying", grant_id=grant.id, client=grant.client,
                          error=str(exc), holding_rotated_token=False, retry_in=delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _write_rotated(self, items: Sequence[_Rotated]) -> list[bool]:
        """The saver's commit: outcomes with new tokens, in one transaction."""
        return self.store.save_many([(i.grant, i.outcome, self.owner, i.event)
                                     for i in items])

    def _hold_rotated(self, item: _Rotated, error: Exception, tried: int) -> None:
        """A commit of new tokens failed (any error): the outcome is held, spooled to
        disk now, and the background replay saves it once the database takes it.
        ``tried``: outcomes in the failed commit (0: not tried, the one before failed);
        the error may be another grant's (the replay saves each alone)."""
        grant, outcome, event = item
        try:
            entry = spool.Entry.of(grant, outcome, self.owner, event, self.clock())
            spooled = self.held.hold(entry)
        except Exception as exc:  # a bug: say so loudly, the grant needs re-consent
            log.critical("rotated_token_lost", grant_id=grant.id, client=grant.client,
                         error=type(exc).__name__, detail=str(exc)[:200])
            raise
        log.error("save_failed_retrying", grant_id=grant.id, client=grant.client,
                  error=_error_text(error), holding_rotated_token=True, spooled=spooled,
                  held_outcomes=self.held.count(), retry_in=self.save_retry,
                  commit_size=tried)
        log.warning("save_handed_over", grant_id=grant.id, client=grant.client,
                    spooled=spooled, held_outcomes=self.held.count(),
                    detail="held; saved in the background once the database takes it")
        self.held.hand_over(entry)

    def _saved(self, grant: Grant, outcome: Outcome, event: dict[str, Any] | None,
               saved: bool) -> bool:
        if not saved:
            log.warning("save_discarded", grant_id=grant.id, client=grant.client,
                        detail="grant was re-consented or deleted during the attempt")
        else:
            _status_changed(grant, outcome, event, grant.status)
        return saved

    def _replay_save(self, entry: spool.Entry) -> bool:
        grant = entry.grant()
        saved = self.store.save(grant, entry.outcome, spool.REPLAY_OWNER, entry.event)
        if saved:
            _status_changed(grant, entry.outcome, entry.event, None)
        return saved

    def _release(self, grant: Grant) -> None:
        try:
            self.store.release(grant, self.owner, grant.next_attempt_at)
        except StoreError as exc:  # the lease expires by itself
            log.warning("release_failed", grant_id=grant.id, error=str(exc))

    def _event(self, grant: Grant, outcome: Outcome,
               reminder: bool = False) -> dict[str, Any] | None:
        name = events.event_for(grant.status, outcome.status)
        if name is None and reminder:
            name = events.REMINDER
            log.info("reconsent_reminder", grant_id=grant.id, client=grant.client,
                     refresh_expires_at=_iso(grant.refresh_expires_at))
        elif name is None:
            return None
        now = self.clock()
        payload = events.payload(name, grant, outcome.status, outcome.reason,
                                outcome.refresh_expires_at or grant.refresh_expires_at, now)
        return payload | consent.event_fields(self.config, grant, name, now)


def _status_changed(grant: Grant, outcome: Outcome, event: dict[str, Any] | None,
                    old: Status | None) -> None:
    """Logged once the change is saved: a discarded or unsaved one never happened.
    ``old``: None when saved from the spool (its entry keeps only the new status)."""
    if event is not None and event.get("event") != events.REMINDER:
        log.warning("status_changed", grant_id=grant.id, client=grant.client,
                    old=old.value if old is not None else None, new=outcome.status.value,
                    reason=outcome.reason)


def _count(result: PassResult, outcome: AttemptResult) -> None:
    if outcome is AttemptResult.OK:
        result.refreshed += 1
    elif not outcome.failed:
        result.skipped += 1
    else:
        result.failed += 1
        result.failures[outcome] += 1


def _error_text(exc: BaseException) -> str:
    """StoreError texts are made safe by the store; anything else is named, not quoted."""
    return str(exc)[:300] if isinstance(exc, StoreError) else type(exc).__name__


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
