"""Reading grants: rows decoded one by one (an unreadable row costs only itself), the
set-aside unreadable rows, finding a grant, and the aggregates for metrics and status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    func,
    select,
    type_coerce,
)
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import NullType

from . import logs
from .crypto import Cipher
from .db import Clock, Database, utcnow
from .errors import GrantNotFound, GrantUnreadable
from .model import (
    ACTIVE,
    Grant,
    GrantType,
    Stats,
    Status,
    UnreadableGrant,
)
from .schema import GrantRow, UTCDateTime

G = cast(Table, GrantRow.__table__)

# Timestamps are selected undecoded and decoded row by row in ``Store._grant``: SQLite
# keeps whatever text was written, and one value that does not parse must cost only its
# own row, not the claim or listing it is fetched with.
_GRANT_COLUMNS = [type_coerce(c, NullType()).label(c.name)
                  if isinstance(c.type, UTCDateTime) else c
                  for c in G.c if c.name not in ("access_token", "refresh_token")]
# How often set-aside (unreadable) rows are read again, so a row fixed by hand comes back.
UNREADABLE_RECHECK = 60.0
log = logs.get("tokend.store")


class Reads(Database):
    """Reading grants: decoding row by row, unreadable rows set aside, aggregates."""

    def __init__(self, engine: Engine, cipher: Cipher, *, clock: Clock = utcnow) -> None:
        super().__init__(engine, clock=clock)
        self.cipher = cipher
        # Rows claims found undecodable (id -> what is wrong): left untouched in the
        # database, skipped by later claims until a re-check finds them readable.
        self._unreadable: dict[int, str] = {}
        self._unreadable_lock = threading.Lock()
        self._unreadable_checked = time.monotonic()

    # ------------------------------------------------------------------ reading

    def _grant(self, row: Any, *, with_tokens: bool = False) -> Grant:
        """Decode one row; :class:`GrantUnreadable` names the column that is wrong."""
        m = row._mapping
        gid = m["id"]
        ts = {name: _decode(gid, name, m[name], _timestamp, "a timestamp")
              for name in _TIMESTAMPS}
        status = _decode(gid, "status", m["status"], Status, "a status")
        grant_type = _decode(gid, "grant_type", m["grant_type"], GrantType, "a grant type")
        counts = {name: _decode(gid, name, m[name], _integer, "a whole number")
                  for name in ("failure_count", "token_version")}
        if ts["created_at"] is None or ts["updated_at"] is None:
            raise GrantUnreadable(gid, "created_at or updated_at is empty")
        return Grant(
            id=gid, client=m["client"], grant_type=grant_type, user_id=m["user_id"],
            tenant_id=m["tenant_id"], status=status, reason=m["reason"],
            access_expires_at=ts["access_expires_at"],
            refresh_expires_at=ts["refresh_expires_at"],
            obtained_at=ts["obtained_at"], consented_at=ts["consented_at"],
            failure_count=counts["failure_count"], last_error=m["last_error"],
            next_attempt_at=ts["next_attempt_at"], in_doubt=bool(m["in_doubt"]),
            token_version=counts["token_version"], has_refresh_token=bool(m["has_refresh"]),
            created_at=ts["created_at"], updated_at=ts["updated_at"],
            lease_owner=m["lease_owner"], lease_expires_at=ts["lease_expires_at"],
            reminder_deadline=ts["reminder_deadline"], reminder_point=ts["reminder_point"],
            access_token_enc=m["access_token"] if with_tokens else None,
            refresh_token_enc=m["refresh_token"] if with_tokens else None,
        )

    def _select(self, *, with_tokens: bool = False) -> Any:
        cols: list[Any] = [*_GRANT_COLUMNS, G.c.refresh_token.isnot(None).label("has_refresh")]
        if with_tokens:
            cols += [G.c.access_token, G.c.refresh_token]
        return select(*cols)

    def get(self, grant_id: int, *, with_tokens: bool = False) -> Grant:
        with self.tx(readonly=True) as conn:
            row = conn.execute(
                self._select(with_tokens=with_tokens).where(G.c.id == grant_id)
            ).first()
        if row is None:
            raise GrantNotFound(grant_id)
        return self._grant(row, with_tokens=with_tokens)

    def iter_grants(self, *, status: str | None = None, client: str | None = None,
                    user_id: str | None = None, page: int = 1000) -> Iterator[Grant]:
        """All matching grants by id, a page at a time (flat memory); unreadable rows
        are left out (see :meth:`iter_rows`)."""
        for g in self.iter_rows(status=status, client=client, user_id=user_id, page=page):
            if isinstance(g, Grant):
                yield g

    def iter_rows(self, *, status: str | None = None, client: str | None = None,
                  user_id: str | None = None, page: int = 1000,
                  ) -> Iterator[Grant | UnreadableGrant]:
        """Like :meth:`iter_grants`, with each undecodable row as an :class:`UnreadableGrant`."""
        last = 0
        while True:
            q = self._select().where(G.c.id > last)
            if status:
                q = q.where(G.c.status == status)
            if client:
                q = q.where(G.c.client == client)
            if user_id is not None:
                q = q.where(G.c.user_id == user_id)
            with self.tx(readonly=True) as conn:
                rows = conn.execute(q.order_by(G.c.id).limit(page)).all()
            if not rows:
                return
            for row in rows:
                try:
                    yield self._grant(row)
                except GrantUnreadable as exc:
                    yield UnreadableGrant(exc.grant_id, exc.problem)
            last = rows[-1]._mapping["id"]

    def tokens(self, grant: Grant) -> tuple[str | None, str | None]:
        """The grant's tokens in clear (the grant must have been read ``with_tokens``)."""
        access = grant.access_token_enc
        refresh = grant.refresh_token_enc
        return (
            self.cipher.decrypt(access, grant_id=grant.id) if access else None,
            self.cipher.decrypt(refresh, grant_id=grant.id) if refresh else None,
        )

    def refresh_token(self, grant: Grant) -> str | None:
        """The refresh token in clear, all a refresh needs: one decryption, not two (the
        access token it replaces is never read). A grant without one (client credentials)
        has its access token decrypted instead: a wrong key stops its attempt too, before
        a new token is stored under that key."""
        if grant.refresh_token_enc:
            return self.cipher.decrypt(grant.refresh_token_enc, grant_id=grant.id)
        if grant.access_token_enc:
            self.cipher.decrypt(grant.access_token_enc, grant_id=grant.id)
        return None

    def find(self, client: str, user_id: str | None, grant_type: GrantType,
             ) -> Grant | UnreadableGrant | None:
        """The newest grant of that type of ``user_id`` (None: the grant without a user)
        for ``client``; if there is none, the newest unreadable row of that user (its type
        may be what is unreadable); None if neither. One SELECT on ``ix_grants_client_user``,
        however many grants the client has."""
        uid = G.c.user_id.is_(None) if user_id is None else G.c.user_id == user_id
        q = self._select().where(G.c.client == client, uid).order_by(G.c.id.desc())
        bad: UnreadableGrant | None = None
        with self.tx(readonly=True) as conn:
            rows = conn.execute(q).all()
        for row in rows:
            try:
                g = self._grant(row)
            except GrantUnreadable as exc:
                bad = bad or UnreadableGrant(exc.grant_id, exc.problem)
                continue
            if g.grant_type == grant_type:
                return g
        return bad

    def _lease_now(self, now: datetime | BindParameter[datetime] | None = None) -> Any:
        """The clock leases are compared with: the database's on PostgreSQL, else ``now``
        (a moment, or the bound parameter of a statement built once)."""
        if self.dialect == "postgresql":
            return func.now()
        if isinstance(now, BindParameter):
            return now
        return _at(now if now is not None else self.clock())

    # ------------------------------------------------------------------ unreadable rows

    @property
    def unreadable(self) -> dict[int, str]:
        """Rows set aside by claims of this store: grant id -> what is wrong."""
        with self._unreadable_lock:
            return dict(self._unreadable)

    def _set_aside(self, bad: Sequence[GrantUnreadable]) -> None:
        with self._unreadable_lock:
            new = [exc for exc in bad if exc.grant_id not in self._unreadable]
            for exc in bad:
                self._unreadable[exc.grant_id] = exc.problem
        for exc in new:  # once per row, not once per claim
            log.warning("grant_unreadable", grant_id=exc.grant_id, error=exc.problem,
                        detail="row set aside and left untouched; fix or delete it "
                               "(tokend grants show/delete ID)")

    def recheck_unreadable(self) -> None:
        """Read the set-aside rows again; fixed (or deleted) ones are claimable again."""
        ids = sorted(self.unreadable)
        self._unreadable_checked = time.monotonic()
        if not ids:
            return
        with self.tx(readonly=True) as conn:
            rows = conn.execute(self._select().where(G.c.id.in_(ids))).all()
        still: dict[int, str] = {}
        for row in rows:
            try:
                self._grant(row)
            except GrantUnreadable as exc:
                still[exc.grant_id] = exc.problem
        with self._unreadable_lock:
            for gid in ids:
                if gid not in still:
                    self._unreadable.pop(gid, None)
                    log.info("grant_readable_again", grant_id=gid)
                else:
                    self._unreadable[gid] = still[gid]

    def _recheck_unreadable(self) -> None:
        if self._unreadable and \
                time.monotonic() - self._unreadable_checked >= UNREADABLE_RECHECK:
            self.recheck_unreadable()

    # ------------------------------------------------------------------ aggregates

    def stats(self, clients: Sequence[str] = ()) -> Stats:
        now = self.clock()
        active = [s.value for s in ACTIVE]
        with self.tx(readonly=True) as conn:
            counts = {
                (c, s): n for c, s, n in conn.execute(
                    select(G.c.client, G.c.status, func.count()).group_by(G.c.client, G.c.status)
                ).all()
            }
            names = sorted({c for c, _ in counts} | set(clients))
            access: dict[str, datetime] = {}
            refresh: dict[str, datetime] = {}
            for name in names:
                a = _earliest(conn, G.c.access_expires_at, name, active)
                r = _earliest(conn, G.c.refresh_expires_at, name, active)
                if a is not None:
                    access[name] = a
                if r is not None:
                    refresh[name] = r
            due_q = select(G.c.client, func.count()).where(G.c.next_attempt_at <= now)
            if self._unreadable:  # set aside: due for ever, never a backlog to work off
                due_q = due_q.where(G.c.id.not_in(sorted(self.unreadable)))
            due: dict[str, int] = dict(conn.execute(due_q.group_by(G.c.client)).all())
        return Stats(counts=counts, access_earliest=access, refresh_earliest=refresh, due=due)

    def deadlines(self, limit: int = 10) -> list[Grant]:
        """The active grants whose refresh tokens end first (``tokend status``)."""
        q = self._select().where(G.c.status.in_([s.value for s in ACTIVE]),
                                 G.c.refresh_expires_at.isnot(None))
        with self.tx(readonly=True) as conn:
            rows = conn.execute(q.order_by(G.c.refresh_expires_at).limit(limit)).all()
        out: list[Grant] = []
        for r in rows:
            try:
                out.append(self._grant(r))
            except GrantUnreadable:
                continue  # shown by `tokend grants list`; not a reason to fail status
        return out


def _at(moment: datetime) -> Any:
    """A moment as a bound parameter of the timestamp columns' type: inside ``case()``
    a bare datetime would be bound as SQLite's own text, which does not sort like ours."""
    return bindparam(None, moment, type_=G.c.next_attempt_at.type)


def _earliest(conn: Connection, column: Any, client: str, active: list[str]) -> datetime | None:
    """The client's earliest ``column`` among active grants.

    Walks the (client, expiry) index from its low end; the first active row ends the
    scan. A value that is no timestamp (SQLite) is passed over, not fatal to the gauges.
    """
    skip: list[int] = []
    while True:
        q = select(G.c.id, type_coerce(column, NullType())).where(
            G.c.client == client, G.c.status.in_(active), column.isnot(None))
        if skip:
            q = q.where(G.c.id.not_in(skip))
        row = conn.execute(q.order_by(column).limit(1)).first()
        if row is None:
            return None
        try:
            return _timestamp(row[1])
        except (ValueError, TypeError, OverflowError):
            skip.append(row[0])


_TIMESTAMPS = ("access_expires_at", "refresh_expires_at", "obtained_at", "consented_at",
               "next_attempt_at", "lease_expires_at", "created_at", "updated_at",
               "reminder_deadline", "reminder_point")
_UTC = UTCDateTime()


def _timestamp(value: Any) -> datetime | None:
    if value is not None and not isinstance(value, str | datetime):
        raise TypeError(type(value).__name__)
    return _UTC.process_result_value(value, cast(Any, None))


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(type(value).__name__)
    return value


def _decode(gid: int, column: str, value: Any, decode: Callable[[Any], Any], what: str) -> Any:
    try:
        return decode(value)
    except (ValueError, TypeError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise GrantUnreadable(gid, f"{column} {shown} is not {what}") from None

