"""The on-demand refresh's decision, as a table of cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tokend.model import Grant, Status
from tokend.ondemand import FRESH, Step, plan

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def grant(status: Status = Status.OK, obtained: timedelta | None = timedelta(hours=1),
          version: int = 3) -> Grant:
    return Grant(id=1, client="main", grant_type="authorization_code", user_id="1",
                 tenant_id=None, status=status, reason=None,
                 access_expires_at=NOW + timedelta(hours=1),
                 refresh_expires_at=NOW + timedelta(days=20),
                 obtained_at=None if obtained is None else NOW - obtained, consented_at=None,
                 failure_count=0, last_error=None, next_attempt_at=NOW, in_doubt=False,
                 token_version=version, has_refresh_token=True, created_at=NOW,
                 updated_at=NOW)


@pytest.mark.parametrize(("g", "asked", "step"), [
    (grant(), 3, Step.REFRESH),
    (grant(obtained=None), 3, Step.REFRESH),
    (grant(status=Status.RECONSENT_DUE), 3, Step.REFRESH),  # still works: refresh it
    (grant(obtained=FRESH - timedelta(seconds=1)), 3, Step.CURRENT),  # no refresh storms
    (grant(obtained=FRESH), 3, Step.REFRESH),
    (grant(version=4), 3, Step.CURRENT),  # somebody refreshed it since the caller asked
    (grant(status=Status.RECONSENT_REQUIRED), 3, Step.UNUSABLE),
    (grant(status=Status.DISABLED, obtained=timedelta(seconds=1)), 3, Step.UNUSABLE),
])
def test_plan(g: Grant, asked: int, step: Step) -> None:
    assert plan(g, asked, NOW) is step
