"""Plain data passed between the store, the policy and the engine (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    OK = "ok"
    RECONSENT_DUE = "reconsent_due"
    RECONSENT_REQUIRED = "reconsent_required"
    DISABLED = "disabled"


class GrantType(StrEnum):
    AUTHORIZATION_CODE = "authorization_code"
    CLIENT_CREDENTIALS = "client_credentials"


class Reason(StrEnum):
    REFRESH_TOKEN_EXPIRING = "refresh_token_expiring"
    MAX_AGE = "max_age"
    REFRESH_TOKEN_EXPIRED = "refresh_token_expired"
    ROTATION_LOST = "rotation_lost"


ACTIVE = (Status.OK, Status.RECONSENT_DUE)


class AttemptResult(StrEnum):
    """How one attempt on a claimed grant ended (counted by the pass, told to on-demand)."""

    OK = "ok"  # refreshed and saved (or held for saving)
    SKIPPED = "skipped"  # nothing to send: a status change or a reminder only
    RELEASED = "released"  # given back unsent (stopping, rate limiter, lease too short)
    HELD = "held"  # not sent: its client is blocked, or its rotated token awaits saving
    # failures, named by their error kind (tokend.errors.ErrorKind):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CLIENT = "client"
    INTERNAL = "internal"  # tokend's own fault (undecryptable tokens, a crash)

    @property
    def failed(self) -> bool:
        return self not in (AttemptResult.OK, AttemptResult.SKIPPED, AttemptResult.RELEASED,
                            AttemptResult.HELD)

# OAuth error codes (RFC 6749 5.2) that, answered to a refresh or a code exchange, mean the
# user's grant is dead: declared once, for the classifier and for the reason the policy keeps.
PERMANENT_ERRORS = frozenset(
    {"invalid_request", "invalid_grant", "unauthorized_client", "invalid_scope"}
)


@dataclass(frozen=True)
class Grant:
    """One row of the grant table, tokens left encrypted (see ``Store.tokens``)."""

    id: int
    client: str
    grant_type: GrantType
    user_id: str | None
    tenant_id: str | None
    status: Status
    reason: str | None
    access_expires_at: datetime | None
    refresh_expires_at: datetime | None
    obtained_at: datetime | None
    consented_at: datetime | None
    failure_count: int
    last_error: str | None
    next_attempt_at: datetime | None
    in_doubt: bool
    token_version: int
    has_refresh_token: bool
    created_at: datetime
    updated_at: datetime
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    reminder_deadline: datetime | None = None  # see policy.due_reminder
    reminder_point: datetime | None = None
    access_token_enc: str | None = field(default=None, repr=False)
    refresh_token_enc: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The JSON view of ``grants list/show --json``: never a token."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat().replace("+00:00", "Z") if value else None

        return {
            "id": self.id,
            "client": self.client,
            "grant_type": self.grant_type,
            "user_id": self.user_id,
            "tenant_id": self.tenant_id,
            "status": self.status.value,
            "reason": self.reason,
            "access_expires_at": iso(self.access_expires_at),
            "refresh_expires_at": iso(self.refresh_expires_at),
            "obtained_at": iso(self.obtained_at),
            "consented_at": iso(self.consented_at),
            "failure_count": self.failure_count,
            "last_error": self.last_error,
            "next_attempt_at": iso(self.next_attempt_at),
            "in_doubt": self.in_doubt,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True)
class UnreadableGrant:
    """A stored row that cannot be decoded; listed as such, never maintained."""

    id: int
    error: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": "unreadable", "error": self.error}


@dataclass(frozen=True)
class NewGrant:
    """A grant about to be stored (import, consent); tokens in clear, encrypted by the store."""

    client: str
    grant_type: str
    access_token: str = field(repr=False)
    access_expires_at: datetime
    obtained_at: datetime
    refresh_token: str | None = field(default=None, repr=False)
    refresh_expires_at: datetime | None = None
    user_id: str | None = None
    tenant_id: str | None = None
    consented_at: datetime | None = None


@dataclass(frozen=True)
class Outcome:
    """What one attempt decided for a grant; the store writes exactly this."""

    status: Status
    reason: str | None
    next_attempt_at: datetime | None
    failure_count: int
    last_error: str | None
    in_doubt: bool
    # set only after a success:
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)  # None = keep the stored one
    access_expires_at: datetime | None = None
    refresh_expires_at: datetime | None = None
    obtained_at: datetime | None = None
    # set when a reminder moment is covered (sent, or covered by entering reconsent_due):
    reminder_deadline: datetime | None = None
    reminder_point: datetime | None = None

    @property
    def success(self) -> bool:
        return self.access_token is not None


@dataclass(frozen=True)
class TokenResponse:
    """A validated token endpoint answer."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: float
    token_type: str
    sent_at: datetime

    @property
    def access_expires_at(self) -> datetime:
        # From the moment the request was sent, not received: the server started the
        # token's clock no earlier than that, so this can only err on the early side.
        return self.sent_at + timedelta(seconds=self.expires_in)


@dataclass(frozen=True)
class Stats:
    """Aggregates of the table for the gauges (computed by SQL, never by loading rows)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (client, status) -> n
    access_earliest: dict[str, datetime] = field(default_factory=dict)
    refresh_earliest: dict[str, datetime] = field(default_factory=dict)
    due: dict[str, int] = field(default_factory=dict)
