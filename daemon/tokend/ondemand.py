"""On-demand refresh: an application just got a 401 and needs a new access token now.

Under the same discipline as the pass (:mod:`tokend.maintenance`): the grant is claimed
under a lease (one refresh per grant across all replicas), sent only while the lease has
room for it (:mod:`tokend.leases`), not sent while its client's circuit is open
(:mod:`tokend.circuit`) or while its rotated token waits to be saved
(:mod:`tokend.spool`), and it takes its turn in the same rate limiter, ahead of the
scheduled refreshes. If somebody else holds the grant's lease (a pass, another replica,
another caller), the caller waits for that refresh's result instead of sending one.

The decision of each step is :func:`plan`, a pure function of the row, the version of
the token when the caller asked, and ``now``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from . import circuit, logs
from .errors import TokendError
from .maintenance import Maintenance
from .model import ACTIVE, AttemptResult, Grant

log = logs.get("tokend.ondemand")
# A token obtained this recently is returned as it is: many workers of an application
# that all got a 401 at once cause one refresh, not one each.
FRESH = timedelta(seconds=10)
POLL = 0.1  # seconds between looks at a grant somebody else is refreshing


class Step(StrEnum):
    UNUSABLE = "unusable"  # needs re-consent or disabled: the caller says so (409)
    CURRENT = "current"  # the stored token is new enough: return it
    REFRESH = "refresh"  # claim the grant and refresh it now


def plan(grant: Grant, asked_version: int, now: datetime) -> Step:
    if grant.status not in ACTIVE:
        return Step.UNUSABLE
    if grant.token_version != asked_version:
        return Step.CURRENT  # refreshed since the caller asked
    if grant.obtained_at is not None and now - grant.obtained_at < FRESH:
        return Step.CURRENT
    return Step.REFRESH


class Unavailable(TokendError):
    """No new token within the caller's wait (busy, client blocked, provider failing);
    ``retry_after``: seconds until asking again makes sense."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass
class OnDemand:
    maintenance: Maintenance
    wait: timedelta = timedelta(seconds=20)

    def refresh(self, grant_id: int) -> Grant:
        """The grant after a refresh (ours or somebody else's) or with a token at most
        :data:`FRESH` old; the grant as it is if it needs re-consent. Raises
        :class:`GrantNotFound` or :class:`Unavailable`."""
        m = self.maintenance
        store = m.store
        deadline = time.monotonic() + self.wait.total_seconds()
        asked = store.get(grant_id).token_version
        waited = False
        while True:
            grant = store.get(grant_id)
            step = plan(grant, asked, m.clock())
            if step is not Step.REFRESH:
                return grant
            self._check_admitted(grant)
            if m.stop_event.is_set():
                raise Unavailable("tokend is stopping", retry_after=5)
            claimed_at = time.monotonic()  # before the lease starts: conservative
            claim = store.claim_one(grant_id, m.owner, m.lease)
            if claim is not None:
                return self._refresh(claim, asked, claimed_at)
            if not waited:
                log.info("ondemand_waiting", grant_id=grant_id, client=grant.client,
                         detail="somebody else is refreshing it: waiting for the result")
                waited = True
            left = deadline - time.monotonic()
            if m.stop_event.is_set():
                raise Unavailable("tokend is stopping", retry_after=5)
            if left <= 0:
                raise Unavailable(f"grant {grant_id} is being refreshed elsewhere; no result "
                                  f"within {self.wait.total_seconds():g} s",
                                  retry_after=min(m.lease.total_seconds(), 5))
            time.sleep(min(POLL, left))

    def _check_admitted(self, grant: Grant) -> None:
        m = self.maintenance
        if m.held.holds(grant.id):
            raise Unavailable(f"grant {grant.id}: its rotated token is being saved",
                              retry_after=m.save_retry * 2)
        with m._circuit_lock:
            c = m.circuits.get(grant.client, circuit.Circuit())
        if c.blocked:
            at = c.next_probe_at
            wait = (at - m.clock()).total_seconds() if at is not None else 60.0
            raise Unavailable(f"client {grant.client!r} is blocked: the provider refuses its "
                              "credentials", retry_after=max(wait, 1.0))

    def _refresh(self, claim: Grant, asked: int, claimed_at: float) -> Grant:
        m = self.maintenance
        if plan(claim, asked, m.clock()) is not Step.REFRESH:
            m._release(claim)  # refreshed between our look and our claim
            return m.store.get(claim.id)
        outcome = m._guarded(claim, claimed_at, priority=True)
        log.info("ondemand_refresh", grant_id=claim.id, client=claim.client,
                 outcome=outcome.value)
        grant = m.store.get(claim.id)
        if outcome is AttemptResult.OK or grant.status not in ACTIVE:
            return grant
        if grant.token_version != asked:
            return grant
        raise Unavailable(f"grant {claim.id} could not be refreshed now ({outcome.value})",
                          retry_after=_retry_after(grant, m.clock()))


def _retry_after(grant: Grant, now: datetime) -> float:
    if grant.next_attempt_at is None:
        return 5.0
    return min(max((grant.next_attempt_at - now).total_seconds(), 1.0), 300.0)
