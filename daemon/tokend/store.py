"""The grant store: every SQL statement tokend runs, on SQLite or PostgreSQL.

Transactions are short and explicit. On SQLite every writing transaction is
``BEGIN IMMEDIATE`` so two claimers serialise instead of failing on upgrade; on
PostgreSQL claims use ``FOR UPDATE SKIP LOCKED`` so replicas never wait for each other.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    Connection,
    Engine,
    Interval,
    Select,
    Table,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import NullPool, QueuePool
from sqlalchemy.types import NullType

from . import logs
from .config import Config
from .crypto import Cipher, cipher_for
from .errors import GrantNotFound, GrantUnreadable, SchemaError, StoreConflict, StoreError
from .model import (
    ACTIVE,
    Grant,
    GrantType,
    NewGrant,
    Outcome,
    Stats,
    Status,
    UnreadableGrant,
)
from .planner import Row
from .schema import EventRow, GrantRow, ReplicaRow, UTCDateTime

G = cast(Table, GrantRow.__table__)
E = cast(Table, EventRow.__table__)
R = cast(Table, ReplicaRow.__table__)
Clock = Callable[[], datetime]
# The policy's verdict on a row about to be written (``policy.initial``): status, reason
# and next attempt. The store takes it as a function rather than as values because the
# next attempt carries the grant's jitter (``policy.jitter_fraction(id)``) and the id is
# known only inside the inserting transaction (allocated there, or the replaced user's
# row found there). Likewise ``consent(event=...)`` gets the stored row and the status it
# replaced, both read in that transaction, and returns the payload (``events.on_consent``)
# the outbox queues in the same commit.
Decide = Callable[[Grant], tuple[Status, str | None, datetime | None]]

# Timestamps are selected undecoded and decoded row by row in ``Store._grant``: SQLite
# keeps whatever text was written, and one value that does not parse must cost only its
# own row, not the claim or listing it is fetched with.
_GRANT_COLUMNS = [type_coerce(c, NullType()).label(c.name)
                  if isinstance(c.type, UTCDateTime) else c
                  for c in G.c if c.name not in ("access_token", "refresh_token")]
_INSERT_CHUNK = 2000
# How often set-aside (unreadable) rows are read again, so a row fixed by hand comes back.
UNREADABLE_RECHECK = 60.0
log = logs.get("tokend.store")


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine configured for tokend's access pattern on either backend."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            _create_private_file(Path(path))
            # Pooled: opening a connection costs four PRAGMAs, and closing the last one
            # checkpoints and deletes the WAL, which the next commit then recreates;
            # per saved grant that was most of the database time. An idle pooled
            # connection holds no lock (no transaction is open between uses).
            engine = create_engine(url, poolclass=QueuePool, pool_size=pool_size,
                                   max_overflow=pool_size,
                                   connect_args={"timeout": 30, "check_same_thread": False})
        else:
            engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" below decide how each transaction starts.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit (a saved rotated refresh token above all) is on disk when it
            # returns, also across an OS crash or power cut; NORMAL may lose the last ones.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = "DEFERRED" if conn.get_execution_options().get("readonly") else "IMMEDIATE"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                           pool_pre_ping=True, pool_recycle=1800,
                           connect_args={"connect_timeout": 10})

    @event.listens_for(engine, "handle_error")
    def _on_error(ctx: ExceptionContext) -> None:
        # A session on a node that became read-only (a failover; SQLSTATE 25006) stays
        # read-only for its lifetime: drop the pool, so the next try connects anew.
        if getattr(ctx.original_exception, "sqlstate", None) == "25006":
            ctx.is_disconnect = True

    if engine.dialect.driver == "psycopg":
        @event.listens_for(engine, "connect")
        def _on_pg_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.adapters.register_loader("timestamptz", _lenient_timestamptz())

    return engine


@cache
def _lenient_timestamptz() -> type:
    """psycopg's timestamptz loader, but a value Python cannot hold ('infinity', years
    past 9999) comes back as its text instead of failing the whole fetch: the row it is
    in is then set aside alone (``Store._grant``)."""
    from psycopg import DataError
    from psycopg.types.datetime import TimestamptzLoader

    class Lenient(TimestamptzLoader):
        def load(self, data: Any) -> Any:
            try:
                return super().load(data)
            except DataError:
                return bytes(data).decode("utf-8", "replace")

    return Lenient


_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _sqlite_write_lock(engine: Engine) -> threading.RLock:
    """One lock per SQLite database per process, held around each writing transaction.

    SQLite admits one writer at a time; a connection that finds the write lock taken
    polls in its busy handler with sleeps of 1, 2, 5, 10... ms. With a worker thread per
    concurrent refresh that turned every save into a wait far longer than the save
    itself; threads of one process now queue here instead (other processes are still
    kept out by SQLite and ``busy_timeout``).
    """
    key = str(engine.url)
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.RLock())


def _create_private_file(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite does (it would honour the umask)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "tokend:migrations")
    return cfg


class Store:
    def __init__(self, engine: Engine, cipher: Cipher, *, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.cipher = cipher
        self.clock = clock
        self._write_lock: AbstractContextManager[Any] = (
            _sqlite_write_lock(engine) if engine.dialect.name == "sqlite" else nullcontext())
        # Rows claims found undecodable (id -> what is wrong): left untouched in the
        # database, skipped by later claims until a re-check finds them readable.
        self._unreadable: dict[int, str] = {}
        self._unreadable_lock = threading.Lock()
        self._unreadable_checked = time.monotonic()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def tx(self, *, readonly: bool = False, single: bool = False) -> Iterator[Connection]:
        """A short transaction. ``single``: the caller runs ONE writing statement, which
        PostgreSQL then runs on its own in autocommit (as durable, and atomic as any
        single statement is), saving the BEGIN and COMMIT round trips."""
        try:
            with nullcontext() if readonly else self._write_lock, \
                    self.engine.connect() as raw:
                conn = raw
                if readonly:
                    conn = raw.execution_options(readonly=True)
                elif single and self.dialect == "postgresql":
                    conn = raw.execution_options(isolation_level="AUTOCOMMIT")
                with conn.begin():
                    yield conn
        # The one boundary for the database's errors: whatever SQLAlchemy raises (a lost
        # connection, a read-only node, bad data, a pool timeout) is a StoreError, which
        # every caller handles; a rotated token is never lost to an unexpected type.
        except IntegrityError as exc:
            raise StoreConflict(f"database constraint: {_short(exc)}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {_short(exc)}") from exc

    def close(self) -> None:
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head(self) -> str | None:
        return ScriptDirectory.from_config(_alembic_config()).get_current_head()

    def upgrade(self) -> tuple[str | None, str | None]:
        """Apply pending migrations; returns (revision before, revision after)."""
        before = self.revision()
        self._refuse_unknown(before)
        cfg = _alembic_config()
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise StoreError(f"migration failed: {_short(exc)}") from exc
        return before, self.revision()

    def check_schema(self, *, auto_upgrade: bool) -> None:
        """Make sure the schema is current; an empty SQLite database is set up."""
        try:
            current = self.revision()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot reach the database: {_short(exc)}") from exc
        if current == self.head():
            return
        self._refuse_unknown(current)
        if auto_upgrade or (current is None and self.dialect == "sqlite"):
            self.upgrade()
            return
        raise SchemaError(
            f"database schema is at {current or 'nothing'}, expected {self.head()}: "
            "run `tokend db upgrade`"
        )

    def _refuse_unknown(self, current: str | None) -> None:
        """A revision this tokend has no migration for was written by a newer tokend."""
        if current is None:
            return
        try:
            ScriptDirectory.from_config(_alembic_config()).get_revision(current)
        except CommandError:
            raise SchemaError(
                f"database schema is at {current}, newer than this tokend (which knows up "
                f"to {self.head()}): upgrade tokend on this host"
            ) from None

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

    # ------------------------------------------------------------------ writing

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

    # ------------------------------------------------------------------ the engine's

    def ensure_client_credentials(self, clients: Sequence[str]) -> list[str]:
        """Create an empty, immediately due row for each client-credentials client."""
        if not clients:
            return []
        now = self.clock()
        created = []
        with self.tx(readonly=True) as conn:
            have = set(conn.execute(
                select(G.c.client).where(G.c.grant_type == GrantType.CLIENT_CREDENTIALS.value,
                                         G.c.client.in_(list(clients)))
            ).scalars())
        for name in clients:
            if name in have:
                continue
            try:
                with self.tx() as conn:
                    conn.execute(insert(G).values(
                        client=name, grant_type=GrantType.CLIENT_CREDENTIALS.value,
                        status=Status.OK.value, failure_count=0, next_attempt_at=now,
                        in_doubt=False, token_version=0, created_at=now, updated_at=now,
                    ))
                created.append(name)
            except StoreConflict:
                pass  # another replica created it first: the unique index says so
        return created

    def claim_query(self, now: datetime, limit: int,
                    skip: Sequence[int] = ()) -> Select[Any]:
        """The SELECT of :meth:`claim_due` (also what ``due_query_plan`` and ``bench/`` see).

        Walks ``ix_grants_next_attempt_at`` from its low end and stops after ``limit``
        rows, so its cost does not grow with the table. ``skip``: ids set aside as
        unreadable (filtered during the same walk).
        """
        q = self._select(with_tokens=True).where(
            G.c.next_attempt_at <= now,
            or_(G.c.lease_expires_at.is_(None), G.c.lease_expires_at <= self._lease_now(now)))
        if skip:
            q = q.where(G.c.id.not_in(sorted(skip)))
        q = q.order_by(G.c.next_attempt_at).limit(limit)
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        return cast("Select[Any]", q)

    def plan_rows(self) -> list[Row]:
        """What :mod:`tokend.planner` sees: the maintained grants not leased now."""
        now = self.clock()
        # Raw values, decoded row by row: an unreadable row is left out of the plan
        # (the claim sets it aside and logs it), it does not end the pass.
        raw = [type_coerce(c, NullType()) for c in (G.c.id, G.c.obtained_at,
                                                    G.c.access_expires_at, G.c.next_attempt_at)]
        q = select(*raw).where(
            G.c.status.in_([s.value for s in ACTIVE]), G.c.next_attempt_at.is_not(None),
            or_(G.c.lease_expires_at.is_(None), G.c.lease_expires_at <= self._lease_now(now)))
        rows: list[Row] = []
        with self.tx(readonly=True) as conn:
            for r in conn.execute(q).all():
                try:
                    rows.append(Row(_integer(r[0]), _timestamp(r[1]), _timestamp(r[2]),
                                    _timestamp(r[3])))
                except (TypeError, ValueError, OverflowError):
                    continue
        return rows

    def replan(self, moves: Mapping[int, tuple[datetime, datetime]]) -> int:
        """Move planned moments (id -> (as read, new)); a row changed meanwhile (refreshed,
        leased, edited) keeps its own."""
        if not moves:
            return 0
        now = self.clock()
        stmt = update(G).where(
            G.c.id == bindparam("m_id"),
            G.c.next_attempt_at == bindparam("m_old", type_=G.c.next_attempt_at.type),
            or_(G.c.lease_expires_at.is_(None), G.c.lease_expires_at <= self._lease_now(now)),
        ).values(next_attempt_at=bindparam("m_at", type_=G.c.next_attempt_at.type))
        with self.tx() as conn:
            conn.execute(stmt, [{"m_id": gid, "m_old": old, "m_at": new}
                                for gid, (old, new) in moves.items()])
        return len(moves)

    def claim_due(self, owner: str, limit: int, lease: timedelta) -> list[Grant]:
        """Lease up to ``limit`` due grants to ``owner`` and commit the lease.

        The lease expiry becomes the grant's next_attempt_at, so nobody else sees it as
        due until the lease runs out. A grant still leased to someone whose lease expired
        had an attempt in flight: it is marked in doubt (the token may have rotated).

        On PostgreSQL a lease (and so the claimed grant's next_attempt_at) is counted
        and compared by the database's clock (``now()`` of the claiming transaction),
        the one clock all replicas share: a replica whose clock runs ahead cannot take
        over leases that are still live. Whether a grant is due (``next_attempt_at <=
        now``) is judged by the injected clock on both backends.
        """
        now = self.clock()
        until = now + lease
        self._recheck_unreadable()
        while True:
            grants: list[Grant] = []
            bad: list[GrantUnreadable] = []
            # Kept short: on SQLite every saving worker waits while a claim holds the lock.
            with self.tx() as conn:
                rows = conn.execute(self.claim_query(now, limit, list(self.unreadable))).all()
                for r in rows:
                    try:
                        grants.append(self._grant(r, with_tokens=True))
                    except GrantUnreadable as exc:
                        bad.append(exc)  # not leased: the row stays exactly as it is
                if grants:
                    conn.execute(_claim_update(self.dialect),
                                 {"ids": [g.id for g in grants], "c_owner": owner,
                                  "c_until": until, "c_lease": lease})
            self._set_aside(bad)
            if grants or not bad:
                break  # a batch of nothing but unreadable rows: claim past them
        return [
            _replace_grant(g, in_doubt=g.in_doubt or g.lease_owner is not None,
                           lease_owner=owner, lease_expires_at=until)
            for g in grants
        ]

    def claim_probe(self, client: str, markers: Sequence[str], owner: str,
                    lease: timedelta) -> Grant | None:
        """Lease the client's earliest-expiring grant that is due, or that waits for the
        client (``last_error`` starts with one of ``markers``), to probe the client with.

        Once per probe step and client: walks the client's rows, not the due index.
        """
        now = self.clock()
        until = now + lease
        waiting = and_(or_(*[G.c.last_error.startswith(m, autoescape=True) for m in markers]),
                       G.c.lease_owner.is_(None))
        while True:
            q = self._select(with_tokens=True).where(
                G.c.client == client, G.c.status.in_([s.value for s in ACTIVE]),
                or_(G.c.next_attempt_at <= now, waiting),
                or_(G.c.lease_expires_at.is_(None),
                    G.c.lease_expires_at <= self._lease_now(now)))
            skip = self.unreadable
            if skip:
                q = q.where(G.c.id.not_in(sorted(skip)))
            q = q.order_by(G.c.access_expires_at.is_(None).desc(), G.c.access_expires_at,
                           G.c.id).limit(1)
            if self.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            with self.tx() as conn:
                row = conn.execute(q).first()
                if row is None:
                    return None
                try:
                    g = self._grant(row, with_tokens=True)
                except GrantUnreadable as exc:
                    bad = exc  # not leased: set aside below, then the next candidate
                else:
                    conn.execute(_claim_update(self.dialect),
                                 {"ids": [g.id], "c_owner": owner, "c_until": until,
                                  "c_lease": lease})
                    return _replace_grant(g, in_doubt=g.in_doubt or g.lease_owner is not None,
                                          lease_owner=owner, lease_expires_at=until)
            self._set_aside([bad])

    def claim_one(self, grant_id: int, owner: str, lease: timedelta) -> Grant | None:
        """Lease one grant, due or not, for an on-demand refresh (:mod:`tokend.ondemand`);
        None while someone else's lease on it runs. Only active grants are claimed."""
        now = self.clock()
        until = now + lease
        q = self._select(with_tokens=True).where(
            G.c.id == grant_id, G.c.status.in_([s.value for s in ACTIVE]),
            or_(G.c.lease_expires_at.is_(None), G.c.lease_expires_at <= self._lease_now(now)))
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        with self.tx() as conn:
            row = conn.execute(q).first()
            if row is None:
                return None
            g = self._grant(row, with_tokens=True)
            conn.execute(_claim_update(self.dialect),
                         {"ids": [g.id], "c_owner": owner, "c_until": until, "c_lease": lease})
        return _replace_grant(g, in_doubt=g.in_doubt or g.lease_owner is not None,
                              lease_owner=owner, lease_expires_at=until)

    def release_held(self, client: str, markers: Sequence[str],
                     order: Callable[[Sequence[tuple[int, datetime | None]], datetime],
                                     list[tuple[int, datetime]]]) -> int:
        """Make the client's grants that wait for it (``markers``, see claim_probe) due
        now, in the order ``order`` gives them; leased grants are left alone."""
        now = self.clock()
        # No IN (...): its expanding parameter cannot be used with executemany().
        waiting = and_(G.c.client == client, or_(*[G.c.status == s.value for s in ACTIVE]),
                       or_(*[G.c.last_error.startswith(m, autoescape=True) for m in markers]),
                       G.c.lease_owner.is_(None))
        with self.tx() as conn:
            held = [(r[0], r[1]) for r in conn.execute(
                select(G.c.id, G.c.access_expires_at).where(waiting)).all()]
            if not held:
                return 0
            # Still waiting when written (a replica may have refreshed one meanwhile).
            stmt = update(G).where(G.c.id == bindparam("r_id"), waiting).values(
                next_attempt_at=bindparam("r_at", type_=G.c.next_attempt_at.type))
            conn.execute(stmt, [{"r_id": gid, "r_at": at} for gid, at in order(held, now)])
        return len(held)

    def _lease_now(self, now: datetime | None = None) -> Any:
        """The clock leases are compared with: the database's on PostgreSQL."""
        if self.dialect == "postgresql":
            return func.now()
        return _at(now if now is not None else self.clock())

    def expire_leases_of(self, owners: Sequence[str]) -> int:
        """End the leases of owners known to be gone (see :mod:`tokend.owners`) now.

        Their grants are due at once; ``lease_owner`` is kept, so the next claim marks
        them in doubt. A grant without a next attempt (disabled meanwhile) stays so.
        """
        if not owners:
            return 0
        now = self.clock()
        with self.tx() as conn:
            return int(conn.execute(
                update(G).where(G.c.lease_owner.in_(list(owners)),
                                G.c.next_attempt_at.isnot(None)).values(
                    next_attempt_at=case((G.c.next_attempt_at > _at(now), _at(now)),
                                         else_=G.c.next_attempt_at),
                    lease_expires_at=self._lease_now(now),
                )
            ).rowcount)

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

    def save(self, grant: Grant, outcome: Outcome, owner: str,
             event: dict[str, Any] | None = None) -> bool:
        """Write one attempt's outcome (and its notification) in one short transaction.

        Guarded by the lease, or by the token version when the lease was lost but nobody
        has written tokens since we claimed (then ours are still the newest). Returns
        False if the guard failed (the grant was re-consented or deleted meanwhile).
        """
        now = self.clock()
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
        # One round trip instead of three on PostgreSQL when there is no event to add:
        # under load each round trip is a wait for the server process to be scheduled,
        # and the worker holds its provider slot meanwhile.
        with self.tx(single=event is None) as conn:
            stmt = _save_statement(outcome.success, new_refresh, reminded)
            if conn.execute(stmt, params).rowcount == 0:
                return False
            if event is not None:
                self._add_event(conn, event, grant.id, now)
        return True

    def release(self, grant: Grant, owner: str, next_attempt_at: datetime | None) -> None:
        """Give a claimed grant back untouched (shutdown before its attempt started)."""
        with self.tx() as conn:
            conn.execute(
                update(G).where(G.c.id == grant.id, G.c.lease_owner == owner).values(
                    lease_owner=None, lease_expires_at=None, next_attempt_at=next_attempt_at,
                    in_doubt=grant.in_doubt,
                )
            )

    # ------------------------------------------------------------------ events (outbox)

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

    # ------------------------------------------------------------------ replicas

    def heartbeat(self, values: Mapping[str, Any]) -> None:
        """Write this process's row of ``replicas`` (keyed by ``owner``)."""
        row = dict(values, updated_at=self.clock())
        with self.tx() as conn:
            n = conn.execute(update(R).where(R.c.owner == row["owner"]).values(
                {k: v for k, v in row.items() if k != "owner"})).rowcount
            if n == 0:
                conn.execute(insert(R).values(row))

    def replicas(self, since: datetime | None = None) -> list[dict[str, Any]]:
        """The replicas' heartbeats, newest first (those updated since ``since``)."""
        q = select(R)
        if since is not None:
            q = q.where(R.c.updated_at >= since)
        with self.tx(readonly=True) as conn:
            return [dict(r._mapping) for r in conn.execute(
                q.order_by(R.c.updated_at.desc())).all()]

    def due_query_plan(self, now: datetime, limit: int = 100) -> str:
        """The backend's plan for the claim query itself, for tests and ``bench/``."""
        compiled = self.claim_query(now, limit).compile(
            dialect=self.engine.dialect, compile_kwargs={"literal_binds": True})
        prefix = "EXPLAIN QUERY PLAN " if self.dialect == "sqlite" else "EXPLAIN "
        with self.tx(readonly=True) as conn:
            rows = conn.exec_driver_sql(prefix + str(compiled)).all()
        return "\n".join(" ".join(str(x) for x in r) for r in rows)

    # ------------------------------------------------------------------ keys

    def reencrypt(self, batch: int = 500, *, rounds: int = 20,
                  progress: Callable[[int], None] | None = None) -> int:
        """Re-encrypt every token not under the newest key, in batches; resumable.

        Safe while daemons run: each row is written only if both ciphertexts are still
        the ones read (compare-and-swap). A refresh saved between the read and the write
        wins; the row is read again and, if still under an old key, rotated again.
        """
        done = 0
        last = 0
        while True:
            with self.tx(readonly=True) as conn:
                rows = conn.execute(
                    select(G.c.id, G.c.access_token, G.c.refresh_token)
                    .where(G.c.id > last).order_by(G.c.id).limit(batch)).all()
            if not rows:
                return done
            last = rows[-1][0]
            if progress is not None:
                progress(len(rows))
            pending = [(r[0], r[1], r[2]) for r in rows]
            for _ in range(rounds):
                changed = []
                with self.tx() as conn:
                    for gid, access, refresh in pending:
                        values = self._rotated(gid, access, refresh)
                        if not values:
                            continue
                        swapped = conn.execute(
                            update(G).where(G.c.id == gid,
                                            G.c.access_token.is_not_distinct_from(access),
                                            G.c.refresh_token.is_not_distinct_from(refresh))
                            .values(**values)).rowcount
                        if swapped:
                            done += 1
                        else:
                            changed.append(gid)
                if not changed:
                    break
                with self.tx(readonly=True) as conn:
                    pending = [(r[0], r[1], r[2]) for r in conn.execute(
                        select(G.c.id, G.c.access_token, G.c.refresh_token)
                        .where(G.c.id.in_(changed))).all()]
            else:
                raise StoreError(f"{len(pending)} grant(s) kept changing while being "
                                 "re-encrypted; run `tokend keys rotate` again")

    def _rotated(self, gid: int, access: str | None, refresh: str | None) -> dict[str, str]:
        values = {}
        if access and self.cipher.needs_rotation(access):
            values["access_token"] = self.cipher.rotate(access, grant_id=gid)
        if refresh and self.cipher.needs_rotation(refresh):
            values["refresh_token"] = self.cipher.rotate(refresh, grant_id=gid)
        return values


def _claim_statement(dialect: str) -> Any:
    """The UPDATE of :meth:`Store.claim_due`: on PostgreSQL the lease ends at the
    database's ``now() + lease``, elsewhere at the injected clock's ``now + lease``."""
    if dialect == "postgresql":
        until: Any = func.now() + bindparam("c_lease", type_=Interval())
    else:
        until = bindparam("c_until", type_=G.c.lease_expires_at.type)
    return update(G).where(G.c.id.in_(bindparam("ids", expanding=True))).values(
        in_doubt=or_(G.c.in_doubt, G.c.lease_owner.isnot(None)),
        lease_owner=bindparam("c_owner", type_=G.c.lease_owner.type),
        lease_expires_at=until,
        next_attempt_at=until,
    )


_CLAIM_STATEMENTS: dict[str, Any] = {}


def _claim_update(dialect: str) -> Any:
    stmt = _CLAIM_STATEMENTS.get(dialect)
    if stmt is None:
        stmt = _CLAIM_STATEMENTS[dialect] = _claim_statement(dialect)
    return stmt


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


def _replace_grant(grant: Grant, **changes: Any) -> Grant:
    return replace(grant, **changes)


def _short(exc: BaseException) -> str:
    """One line, no SQL parameters (they may hold tokens)."""
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip().splitlines()
    return text_[0][:300] if text_ else type(exc).__name__


def open_store(config: Config, *, clock: Clock = utcnow, auto_upgrade: bool = False,
               pool_size: int = 10) -> Store:
    """The store of this configuration, its schema checked (empty SQLite: created)."""
    cipher = cipher_for(config, create=config.database.is_sqlite)
    store = Store(make_engine(config.database.url, pool_size=pool_size), cipher, clock=clock)
    try:
        store.check_schema(auto_upgrade=auto_upgrade)
    except BaseException:
        store.close()
        raise
    return store
