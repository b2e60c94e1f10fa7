"""The client circuit's decisions, as tables of cases."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tokend import circuit
from tokend.circuit import Circuit, State, Verdict
from tokend.config import ScheduleConfig
from tokend.errors import ErrorKind, ProviderError
from tokend.model import Grant, Status

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = ScheduleConfig()  # interval 60s, retry_max 15m
MIN = timedelta(minutes=1)

UNKNOWN = Circuit()
CLOSED = Circuit(State.CLOSED)


def opened(refusals: int = 1, at: datetime = NOW + MIN) -> Circuit:
    return Circuit(State.OPEN, refusals, at)


def err(kind: ErrorKind, code: str) -> ProviderError:
    return ProviderError(kind, code, status=400)


@pytest.mark.parametrize(("answer", "expected"), [
    (None, Verdict.ACCEPTED),
    (err(ErrorKind.CLIENT, "invalid_client"), Verdict.REFUSED),
    # league checks the client before the grant: a refused grant proves the client good
    (err(ErrorKind.PERMANENT, "invalid_grant"), Verdict.ACCEPTED),
    (err(ErrorKind.PERMANENT, "invalid_request"), Verdict.ACCEPTED),
    (err(ErrorKind.TRANSIENT, "timeout"), Verdict.UNDECIDED),
    (err(ErrorKind.TRANSIENT, "http_503"), Verdict.UNDECIDED),
    (err(ErrorKind.TRANSIENT, "rate_limited"), Verdict.UNDECIDED),
    # other client faults are about one grant type (client credentials' scope, ...)
    (err(ErrorKind.CLIENT, "unsupported_grant_type"), Verdict.UNDECIDED),
    (err(ErrorKind.CLIENT, "invalid_scope"), Verdict.UNDECIDED),
])
def test_verdict(answer: ProviderError | None, expected: Verdict) -> None:
    assert circuit.verdict(answer) is expected


@pytest.mark.parametrize(("c", "due", "admits"), [
    (UNKNOWN, True, True),              # start-up: probe at once, send the rest
    (CLOSED, False, True),
    (opened(at=NOW + MIN), False, False),
    (opened(at=NOW), True, False),
    (opened(at=NOW - MIN), True, False),
    (Circuit(State.OPEN, 1, None), True, False),
])
def test_probe_due_and_admission(c: Circuit, due: bool, admits: bool) -> None:
    assert circuit.probe_due(c, NOW) is due
    assert circuit.admits(c) is admits
    assert c.blocked is (not admits)


@pytest.mark.parametrize(("old", "v", "probe", "new"), [
    # accepted: closed, whatever it was
    (UNKNOWN, Verdict.ACCEPTED, True, CLOSED),
    (opened(3), Verdict.ACCEPTED, True, CLOSED),
    (opened(3), Verdict.ACCEPTED, False, CLOSED),
    (CLOSED, Verdict.ACCEPTED, False, CLOSED),
    # refused: opens with the first step (interval), each refused probe doubles it
    (UNKNOWN, Verdict.REFUSED, True, opened(1, NOW + MIN)),
    (CLOSED, Verdict.REFUSED, False, opened(1, NOW + MIN)),
    (opened(1), Verdict.REFUSED, True, opened(2, NOW + 2 * MIN)),
    (opened(2), Verdict.REFUSED, True, opened(3, NOW + 4 * MIN)),
    (opened(4), Verdict.REFUSED, True, opened(5, NOW + 15 * MIN)),   # capped at retry_max
    (opened(40), Verdict.REFUSED, True, opened(41, NOW + 15 * MIN)),
    # a refusal of an attempt sent before the circuit opened is no new step
    (opened(2, NOW + 3 * MIN), Verdict.REFUSED, False, opened(2, NOW + 3 * MIN)),
    # undecided: an open circuit probes again after the same step; others keep their state
    (opened(2, NOW), Verdict.UNDECIDED, True, opened(2, NOW + 2 * MIN)),
    (opened(2, NOW + 3 * MIN), Verdict.UNDECIDED, False, opened(2, NOW + 3 * MIN)),
    (UNKNOWN, Verdict.UNDECIDED, True, UNKNOWN),
    (CLOSED, Verdict.UNDECIDED, False, CLOSED),
])
def test_after(old: Circuit, v: Verdict, probe: bool, new: Circuit) -> None:
    assert circuit.after(old, v, NOW, S, probe=probe, rand=1.0) == new


@pytest.mark.parametrize(("rand", "step"), [
    (0.0, timedelta(seconds=30)), (0.5, timedelta(seconds=45)), (1.0, timedelta(seconds=60)),
])
def test_probe_steps_are_jittered(rand: float, step: timedelta) -> None:
    c = circuit.after(CLOSED, Verdict.REFUSED, NOW, S, probe=False, rand=rand)
    assert c.next_probe_at == NOW + step


@pytest.mark.parametrize(("old", "new", "is_opened", "is_closed"), [
    (UNKNOWN, opened(), True, False),
    (CLOSED, opened(), True, False),
    (opened(1), opened(2), False, False),
    (opened(), CLOSED, False, True),
    (UNKNOWN, CLOSED, False, True),
    (CLOSED, CLOSED, False, False),
])
def test_transitions(old: Circuit, new: Circuit, is_opened: bool, is_closed: bool) -> None:
    assert circuit.opened(old, new) is is_opened
    assert circuit.closed(old, new) is is_closed


@pytest.mark.parametrize(("old", "new"), [
    (UNKNOWN, CLOSED),       # nothing of this client to send: nothing to wait for
    (opened(2), opened(2)),  # blocked until a grant can be probed
    (CLOSED, CLOSED),
])
def test_nothing_to_probe(old: Circuit, new: Circuit) -> None:
    assert circuit.nothing_to_probe(old) == new


def grant(**kw: object) -> Grant:
    base = Grant(
        id=7, client="main", grant_type="authorization_code", user_id="1", tenant_id="2",
        status=Status.OK, reason=None, access_expires_at=NOW + timedelta(hours=1),
        refresh_expires_at=NOW + timedelta(days=20), obtained_at=NOW - timedelta(hours=23),
        consented_at=NOW - timedelta(days=10), failure_count=0, last_error=None,
        next_attempt_at=NOW, in_doubt=False, token_version=1, has_refresh_token=True,
        created_at=NOW, updated_at=NOW)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("refresh_end", "until"), [
    (NOW + timedelta(days=20), NOW + 15 * MIN),
    (NOW + 5 * MIN, NOW + 5 * MIN),       # its refresh token ends first: judged then
    (NOW - MIN, NOW + 15 * MIN),          # already over (flagged before the hold)
    (None, NOW + 15 * MIN),
])
def test_hold_until(refresh_end: datetime | None, until: datetime) -> None:
    assert circuit.hold_until(grant(refresh_expires_at=refresh_end), NOW, S) == until


def test_release_order_earliest_expiry_first_all_due_now() -> None:
    held = [(1, NOW + timedelta(hours=5)), (2, NOW - MIN), (3, None), (4, NOW + MIN),
            (5, NOW + MIN), (6, NOW + timedelta(hours=2))]
    order = circuit.release_order(held, NOW)
    assert [gid for gid, _ in order] == [3, 2, 4, 5, 6, 1]
    times = [at for _, at in order]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(at <= NOW for at in times)
    assert circuit.release_order([], NOW) == []


@pytest.mark.parametrize(("last_error", "waits"), [
    (ProviderError(ErrorKind.CLIENT, "invalid_client", status=401,
                   description="Client authentication failed").summary(), True),
    (circuit.HELD, True),
    (ProviderError(ErrorKind.TRANSIENT, "http_503", status=503).summary(), False),
    (ProviderError(ErrorKind.CLIENT, "unsupported_grant_type").summary(), False),
    ("no refresh token stored", False),
])
def test_markers_find_the_grants_that_wait_for_their_client(last_error: str,
                                                              waits: bool) -> None:
    assert last_error.startswith(circuit.MARKERS) is waits
