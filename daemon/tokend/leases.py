"""Decisions about leases, as pure functions of durations and monotonic readings.

A claimed grant is leased to its claimer: nobody else claims it until the lease ends,
so nobody else presents its refresh token meanwhile. A refresh sent so late that it
could still be on the wire (or not yet saved) when the lease ends could race a takeover
by another process: with rotation on every refresh and no grace period, one of the two
spends the other's token. So a refresh is only sent while the lease has room for the
whole request (connect and read timeouts) and its saving; else the grant is given back
unsent, to be claimed afresh.

The time left is measured on this process's monotonic clock from a reading taken just
BEFORE the claim statement ran. The database counts the lease from inside that statement
(on PostgreSQL by its own clock, the one every replica's claim compares with), which is
later in real time: so the lease ends no earlier than ``claimed_at + lease`` whatever
the wall clocks of this host, the database and an injected test clock say.
"""

from __future__ import annotations

from datetime import timedelta

# Beyond the request itself: the saving and the scheduling of the threads around it.
MARGIN = timedelta(seconds=10)


def needed(timeout: timedelta) -> timedelta:
    """The lease one refresh may still use once sent: connect + read timeout, and saving."""
    return timeout * 2 + MARGIN


def remaining(claimed_at: float, lease: timedelta, now: float) -> timedelta:
    """The lease left at monotonic ``now`` of a lease of length ``lease`` claimed at
    monotonic ``claimed_at`` (read before the claim ran); negative once over."""
    return lease - timedelta(seconds=now - claimed_at)


def can_send(left: timedelta, timeout: timedelta) -> bool:
    """Whether a refresh may still be sent with ``left`` of its lease to go."""
    return left >= needed(timeout)
