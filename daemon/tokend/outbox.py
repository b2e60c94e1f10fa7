"""The event outbox: notifications queued in the transaction of the change they report,
delivered later (:mod:`tokend.notify`) and marked delivered or retried here.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Table,
    insert,
    select,
    update,
)

from .db import Database
from .schema import EventRow

E = cast(Table, EventRow.__table__)


class Outbox(Database):

    def _add_event(self, conn: Connection, payload: dict[str, Any], grant_id: int | None,
                   now: datetime) -> str:
        event_id = str(uuid.uuid4())
        body = {"id": event_id, **payload}
        conn.execute(insert(E).values(
            id=event_id, event=payload["event"], grant_id=grant_id,
            payload=json.dumps(body, sort_keys=True), created_at=now, attempts=0,
            next_attempt_at=now,
        ))
        return event_id

    def add_event(self, payload: dict[str, Any], grant_id: int | None) -> str:
        with self.tx() as conn:
            return self._add_event(conn, payload, grant_id, self.clock())

    def due_events(self, limit: int = 100) -> list[tuple[str, str, str, int]]:
        """(id, event, payload, attempts) of undelivered events whose time has come."""
        with self.tx(readonly=True) as conn:
            rows = conn.execute(
                select(E.c.id, E.c.event, E.c.payload, E.c.attempts)
                .where(E.c.next_attempt_at <= self.clock())
                .order_by(E.c.next_attempt_at).limit(limit)
            ).all()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def event_delivered(self, event_id: str) -> None:
        with self.tx() as conn:
            conn.execute(update(E).where(E.c.id == event_id).values(
                delivered_at=self.clock(), next_attempt_at=None, last_error=None,
                attempts=E.c.attempts + 1))

    def event_failed(self, event_id: str, error: str, retry_at: datetime) -> None:
        with self.tx() as conn:
            conn.execute(update(E).where(E.c.id == event_id).values(
                next_attempt_at=retry_at, last_error=error[:500], attempts=E.c.attempts + 1))

    def events(self) -> list[dict[str, Any]]:
        with self.tx(readonly=True) as conn:
            rows = conn.execute(select(E).order_by(E.c.created_at)).all()
        return [dict(r._mapping) for r in rows]
