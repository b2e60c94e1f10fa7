"""Notification payloads: which status change sends which event, and what it carries.

Pure data, shared by the maintenance pass, the consent paths (``tokend consent`` and the
consent links) and the store that queues them in its outbox, so every event of one name
has the same fields whichever code path made it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .model import Grant, Status

REMINDER = "reconsent_reminder"
RECOVERED = "recovered"


def event_for(old: Status, new: Status) -> str | None:
    """The notification a status change sends, if any."""
    if old == new:
        return None
    if new in (Status.RECONSENT_DUE, Status.RECONSENT_REQUIRED):
        return new.value
    if new == Status.OK and old in (Status.RECONSENT_DUE, Status.RECONSENT_REQUIRED):
        return RECOVERED
    return None


def payload(name: str, grant: Grant, status: Status, reason: str | None,
            refresh_expires_at: datetime | None, now: datetime) -> dict[str, Any]:
    return {
        "event": name, "grant_id": grant.id, "client": grant.client,
        "user_id": grant.user_id, "tenant_id": grant.tenant_id, "status": status.value,
        "reason": reason, "refresh_expires_at": iso(refresh_expires_at),
        "timestamp": iso(now),
    }


def on_consent(stored: Grant, previous: Status | None, now: datetime) -> dict[str, Any] | None:
    """The event a fresh consent sends for the grant it replaced (``recovered``), if any."""
    name = event_for(previous, stored.status) if previous is not None else None
    if name is None:
        return None
    return payload(name, stored, stored.status, stored.reason, stored.refresh_expires_at, now)


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
