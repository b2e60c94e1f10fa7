"""Writing grants: inserts (imports, consent), operators' changes, and the save of an
attempt's outcome guarded by its lease.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    delete,
    insert,
    or_,
    select,
    text,
    update,
)

from .errors import GrantNotFound
from .model import (
    Grant,
    GrantType,
    NewGrant,
    Outcome,
    Status,
)
from .outbox import Outbox
from .rows import G, Reads, _at

# The policy's verdict on a row about to be written (``policy.initial``): status, reason
# and next attempt. The store takes it as a function rather than as values because the
# next attempt carries the grant's jitter (``policy.jitter_fraction(id)``) and the id is
# known only inside the inserting transaction (allocated there, or the replaced user's
# row found there). Likewise ``consent(event=...)`` gets the stored row and the status it
# replaced, both read in that transaction, and returns the payload (``events.on_consent``)
# the outbox queues in the same commit.
Decide = Callable[[Grant], tuple[Status, str | None, datetime | None]]
# One outcome to save: the grant as claimed, the outcome, the lease owner, the event.
SaveItem = tuple[Grant, Outcome, str, dict[str, Any] | None]
_INSERT_CHUNK = 2000


class Writes(Reads, Outbox):

    def _allocate_ids(self, conn: Connection, n: int) -> list[int]:
        """Ids before insert, so per-grant jitter can be computed for new rows."""
        if self.dialect == "postgresql":
            rows = conn.execute(
                text("SELECT nextval(pg_get_serial_sequence('grants', 'id')) "
                     "FROM generate_series(1, :n)"), {"n": n}
            ).scalars().all()
            return [int(r) for r in rows]
        # SQLite: the IMMEDIATE transaction holds the write lock, so both are stable.
        # AUTOINCREMENT's sqlite_sequence remembers the highest id ever used, also of a
        # deleted row: an id is never given twice (a refresh of a deleted grant still
        # in flight could otherwise be saved into the new one). Inserting explicit ids
        # moves sqlite_sequence on as well.
        used = conn.execute(text(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'grants'), 0),"
            " coalesce((SELECT max(id) FROM grants), 0))")).scalar_one()
        start = int(used)
        return list(range(start + 1, start + 1 + n))

    def _new_row(self, gid: int, new: NewGrant, now: datetime, decide: Decide) -> dict[str, Any]:
        grant = Grant(
            id=gid, client=new.client, grant_type=GrantType(new.grant_type), user_id=new.user_id,
            tenant_id=new.tenant_id, status=Status.OK, reason=None,
            access_expires_at=new.access_expires_at, refresh_expires_at=new.refresh_expires_at,
            obtained_at=new.obtained_at, consented_at=new.consented_at or new.obtained_at,
            failure_count=0, last_error=None, next_attempt_at=None, in_doubt=False,
            token_version=0, has_refresh_token=new.refresh_token is not None,
            created_at=now, updated_at=now,
        )
        status, reason, next_at = decide(grant)
        return {
            "id": gid, "client": new.client, "grant_type": new.grant_type,
            "user_id": new.user_id, "tenant_id": new.tenant_id,
            "access_token": self.cipher.encrypt(new.access_token),
            "access_expires_at": new.access_expires_at,
            "refresh_token": self.cipher.encrypt(new.refresh_token)
            if new.refresh_token is not None else None,
            "refresh_expires_at": new.refresh_expires_at,
            "obtained_at": new.obtained_at, "consented_at": grant.consented_at,
            "status": status.value, "reason": reason, "failure_count": 0, "last_error": None,
            "next_attempt_at": next_at, "lease_owner": None, "lease_expires_at": None,
            "in_doubt": False, "token_version": 0, "created_at": now, "updated_at": now,
        }

    def insert_grants(self, grants: Sequence[NewGrant], decide: Decide, *,
                      check: Callable[[Mapping[tuple[str, str], int]], None] | None = None,
                      progress: Callable[[int], None] | None = None) -> list[int]:
        """Insert all grants in ONE transaction (all or nothing).

        ``check`` sees, in the same transaction, the stored authorization-code grant of
        each (client, user) of ``grants`` that has one, and may raise to insert nothing.
        """
        now = self.clock()
        with self.tx() as conn:
            if check is not None:
                check(self._user_grants(conn, grants))
            ids = self._allocate_ids(conn, len(grants))
            for start in range(0, len(grants), _INSERT_CHUNK):
                chunk = grants[start:start + _INSERT_CHUNK]
                rows = [self._new_row(ids[start + i], g, now, decide) for i, g in enumerate(chunk)]
                conn.execute(insert(G), rows)
                if progress is not None:
                    progress(len(chunk))  # encrypted and sent; committed at the end
        return ids

    def _user_grants(self, conn: Connection, grants: Sequence[NewGrant],
                     ) -> dict[tuple[str, str], int]:
        users: dict[str, set[str]] = {}
        for g in grants:
            if g.user_id is not None and g.grant_type == GrantType.AUTHORIZATION_CODE.value:
                users.setdefault(g.client, set()).add(g.user_id)
        found: dict[tuple[str, str], int] = {}
        for client, ids in users.items():
            wanted = sorted(ids)
            for start in range(0, len(wanted), 1000):
                rows = conn.execute(select(G.c.user_id, G.c.id).where(
                    G.c.client == client, G.c.user_id.in_(wanted[start:start + 1000]),
                    G.c.grant_type == GrantType.AUTHORIZATION_CODE.value))
                for user_id, gid in rows:
                    found[(client, user_id)] = min(gid, found.get((client, user_id), gid))
        return found

    def consent(self, new: NewGrant, decide: Decide,
                event: Callable[[Grant, Status | None], dict[str, Any] | None] | None = None,
                ) -> tuple[int, Status | None]:
        """Store a freshly consented grant, replacing the same user's grant of that client.

        Returns the grant id and the status the replaced grant had (None if new). A
        daemon holding a lease on the old row loses its save guard (token_version moves).
        """
        now = self.clock()
        with self.tx() as conn:
            old = None
            if new.user_id is not None:
                old = conn.execute(
                    select(G.c.id, G.c.status).where(
                        G.c.client == new.client, G.c.user_id == new.user_id,
                        G.c.grant_type == GrantType.AUTHORIZATION_CODE.value,
                    ).order_by(G.c.id.desc()).limit(1)
                ).first()
            if old is None:
                gid, previous = self._allocate_ids(conn, 1)[0], None
                conn.execute(insert(G), [self._new_row(gid, new, now, decide)])
            else:
                gid = old[0]
                previous = Status(old[1]) if old[1] in Status.__members__.values() else None
                row = self._new_row(gid, new, now, decide)
                for key in ("id", "created_at"):
                    row.pop(key)
                row["token_version"] = G.c.token_version + 1
                conn.execute(update(G).where(G.c.id == gid).values(**row))
            if event is not None:
                stored = conn.execute(self._select().where(G.c.id == gid)).one()
                payload = event(self._grant(stored), previous)
                if payload is not None:
                    self._add_event(conn, payload, gid, now)
            return gid, previous

    def set_status(self, grant_id: int, status: Status, reason: str | None,
                   next_attempt_at: datetime | None) -> Grant:
        """An operator's change. ``next_attempt_at`` never moves before a live lease: a
        grant whose refresh is in flight (e.g. enabled meanwhile) stays leased to its
        claimer, whose save then sets the next attempt."""
        when: Any = next_attempt_at
        if next_attempt_at is not None:
            at = _at(next_attempt_at)
            live = and_(G.c.lease_owner.isnot(None), G.c.lease_expires_at > self._lease_now(),
                        G.c.lease_expires_at > at)
            when = case((live, G.c.lease_expires_at), else_=at)
        with self.tx() as conn:
            result = conn.execute(
                update(G).where(G.c.id == grant_id).values(
                    status=status.value, reason=reason, next_attempt_at=when,
                    failure_count=0, updated_at=self.clock(),
                )
            )
            if result.rowcount == 0:
                raise GrantNotFound(grant_id)
        return self.get(grant_id)

    def delete(self, grant_id: int) -> None:
        with self.tx() as conn:
            if conn.execute(delete(G).where(G.c.id == grant_id)).rowcount == 0:
                raise GrantNotFound(grant_id)

    def save(self, grant: Grant, outcome: Outcome, owner: str,
             event: dict[str, Any] | None = None) -> bool:
        """Write one attempt's outcome (and its notification) in one short transaction.

        Guarded by the lease, or by the token version when the lease was lost but nobody
        has written tokens since we claimed (then ours are still the newest). Returns
        False if the guard failed (the grant was re-consented or deleted meanwhile).
        """
        return self.save_many([(grant, outcome, owner, event)])[0]

    def save_many(self, items: Sequence[SaveItem]) -> list[bool]:
        """:meth:`save` of several outcomes (grant, outcome, owner, event) in ONE
        transaction (a group commit, :mod:`tokend.saver`): each guarded on its own (one
        result per item), all written or, if it fails, none."""
        now = self.clock()
        statements = [self._save_args(grant, outcome, owner, now)
                      for grant, outcome, owner, _event in items]
        # One round trip instead of three on PostgreSQL for a lone save without an
        # event: under load each round trip is a wait for the server process to be
        # scheduled.
        single = len(items) == 1 and items[0][3] is None
        saved = [False] * len(items)
        with self.tx(single=single) as conn:
            # Rows locked in id order, as by every write of several rows (keys rotate, a
            # plan, a release): two such transactions never wait for each other in a
            # circle (a deadlock PostgreSQL would end by failing one).
            for i in sorted(range(len(items)), key=lambda i: items[i][0].id):
                stmt, params = statements[i]
                grant, event = items[i][0], items[i][3]
                saved[i] = conn.execute(stmt, params).rowcount != 0
                if saved[i] and event is not None:
                    self._add_event(conn, event, grant.id, now)
        return saved

    def _save_args(self, grant: Grant, outcome: Outcome, owner: str,
                   now: datetime) -> tuple[Any, dict[str, Any]]:
        params: dict[str, Any] = {
            "g_id": grant.id, "g_owner": owner, "g_version": grant.token_version,
            "p_status": outcome.status.value, "p_reason": outcome.reason,
            "p_next_attempt_at": outcome.next_attempt_at,
            "p_failure_count": outcome.failure_count, "p_last_error": outcome.last_error,
            "p_in_doubt": outcome.in_doubt, "p_updated_at": now,
        }
        reminded = outcome.reminder_point is not None
        if reminded:
            params.update(p_reminder_deadline=outcome.reminder_deadline,
                          p_reminder_point=outcome.reminder_point)
        new_refresh = False
        if outcome.success:
            assert outcome.access_token is not None
            params.update(
                p_access_token=self.cipher.encrypt(outcome.access_token),
                p_access_expires_at=outcome.access_expires_at,
                p_refresh_expires_at=outcome.refresh_expires_at,
                p_obtained_at=outcome.obtained_at,
            )
            if outcome.refresh_token is not None:
                new_refresh = True
                params["p_refresh_token"] = self.cipher.encrypt(outcome.refresh_token)
        return _save_statement(outcome.success, new_refresh, reminded), params


_SAVE_STATEMENTS: dict[tuple[bool, bool, bool], Any] = {}


def _save_statement(success: bool, new_refresh: bool, reminded: bool = False) -> Any:
    """The UPDATE of :meth:`Store.save`, built once per shape with bound parameters.

    Building ``update().where().values()`` afresh for every saved grant (and computing
    its cache key) cost about as much CPU as the HTTP request it records.
    """
    key = (success, new_refresh, reminded)
    stmt = _SAVE_STATEMENTS.get(key)
    if stmt is not None:
        return stmt

    def p(column: str) -> Any:
        return bindparam(f"p_{column}", type_=G.c[column].type)

    values: dict[str, Any] = {
        name: p(name) for name in ("failure_count", "last_error", "in_doubt", "updated_at")
    }
    # An operator who disabled the grant while its refresh was in flight keeps it
    # disabled (the new tokens are saved all the same). SQL evaluates these against the
    # row as it was, on both backends.
    paused = G.c.status == Status.DISABLED.value
    values.update(
        status=case((paused, G.c.status), else_=p("status")),
        reason=case((paused, G.c.reason), else_=p("reason")),
        next_attempt_at=case((paused, None), else_=p("next_attempt_at")),
    )
    values.update(lease_owner=None, lease_expires_at=None)
    if success:
        values.update({name: p(name) for name in ("access_token", "access_expires_at",
                                                  "refresh_expires_at", "obtained_at")})
        values["token_version"] = G.c.token_version + 1
        if new_refresh:
            values["refresh_token"] = p("refresh_token")
    if reminded:
        values.update(reminder_deadline=p("reminder_deadline"),
                      reminder_point=p("reminder_point"))
    guard = and_(
        G.c.id == bindparam("g_id", type_=G.c.id.type),
        or_(G.c.lease_owner == bindparam("g_owner", type_=G.c.lease_owner.type),
            G.c.token_version == bindparam("g_version", type_=G.c.token_version.type)),
    )
    stmt = update(G).where(guard).values(**values)
    _SAVE_STATEMENTS[key] = stmt
    return stmt

