"""The database: the engine, SQLite's write lock, transactions, schema checks.

Transactions are short and explicit. On SQLite every writing transaction is
``BEGIN IMMEDIATE`` so two claimers serialise instead of failing on upgrade (threads of
one process queue on a lock first); on PostgreSQL claims use ``FOR UPDATE SKIP LOCKED``
so replicas never wait for each other. Database errors become tokend's own here, and
nowhere else.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import (
    DisconnectionError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import NullPool, QueuePool

from .errors import SchemaError, StoreConflict, StoreError

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
    "keepalives_count": 3, "tcp_user_timeout": 30_000,
}
PING_AFTER_IDLE = 5.0  # seconds a pooled PostgreSQL connection may idle unpinged


def make_engine(url: str, *, pool_size: int = 10,
                ping_after_idle: float = PING_AFTER_IDLE) -> Engine:
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
            # Straight to the driver: through exec_driver_sql this one statement cost
            # as much CPU as the save it opens. Its error is wrapped here as
            # SQLAlchemy's own would be, so ``tx`` still turns it into a StoreError.
            try:
                conn.connection.dbapi_connection.execute(f"BEGIN {mode}")  # type: ignore[union-attr]
            except sqlite3.Error as exc:
                raise OperationalError(f"BEGIN {mode}", None, exc) from exc

        return engine
    # A server that vanishes without closing the connection (a host or network gone, a
    # failover behind a virtual IP) would leave a save blocked in recv() forever, holding
    # its rotated token in memory: TCP keepalives and a TCP user timeout end such a
    # connection within about 30 s, as a StoreError the save retries (and spools).
    # Values in the URL's query win.
    given = make_url(url).query
    connect_args = {key: value for key, value in PG_CONNECT_ARGS.items() if key not in given}
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                           pool_recycle=1800, connect_args=connect_args)

    # A pooled connection is pinged before use only if it sat idle ``ping_after_idle``:
    # SQLAlchemy's pool_pre_ping pings on every checkout, a round trip that cost as
    # much CPU as the save it preceded (docs/benchmarks.md). A connection used a moment
    # ago that fails anyway (the server restarted in between) fails its statement: a
    # StoreError every caller retries, and SQLAlchemy drops the whole pool with it.
    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["tokend_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("tokend_idle_since")
        if since is None or time.monotonic() - since < ping_after_idle:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # any failure: the pool connects anew (up to 3 times)
            raise DisconnectionError(f"stale pooled connection: {exc}") from exc

    @event.listens_for(engine, "handle_error")
    def _on_error(ctx: ExceptionContext) -> None:
        # A session on a node that became read-only (a failover; SQLSTATE 25006) stays
        # read-only for its lifetime: drop the pool, so the next try connects anew.
        if getattr(ctx.original_exception, "sqlstate", None) == "25006":
            ctx.is_disconnect = True

    if engine.dialect.driver == "psycopg":
        @event.listens_for(engine, "connect")
        def _on_pg_connect(dbapi_conn: Any, _record: Any) -> None:
            from psycopg.pq import Format

            oid = dbapi_conn.adapters.types["timestamptz"].oid
            fast = dbapi_conn.adapters.get_loader(oid, Format.TEXT)
            if fast is not None and fast.__name__ != "Lenient":
                dbapi_conn.adapters.register_loader(oid, _lenient_timestamptz(fast))

    return engine


@cache
def _lenient_timestamptz(fast: type) -> type:
    """psycopg's timestamptz loader ``fast`` (the C one of psycopg-binary when installed),
    but a value Python cannot hold ('infinity', years past 9999) comes back as its text
    instead of failing the whole fetch: the row it is in is then set aside alone
    (``Store._grant``). Wrapped, not subclassed: the C loader cannot be a base class,
    and the pure-Python one costs a tenth of a claim's CPU."""
    from psycopg import DataError
    from psycopg.adapt import Loader

    class Lenient(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._load = fast(oid, context).load

        def load(self, data: Any) -> Any:
            try:
                return self._load(data)
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


class Database:
    """An engine and its short transactions: the one place SQLAlchemy's errors become
    tokend's (:class:`StoreError`, :class:`StoreConflict`, :class:`SchemaError`)."""

    def __init__(self, engine: Engine, *, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.clock = clock
        self._write_lock: AbstractContextManager[Any] = (
            _sqlite_write_lock(engine) if engine.dialect.name == "sqlite" else nullcontext())

    @contextmanager
    def tx(self, *, readonly: bool = False, single: bool = False,
           snapshot: bool = False) -> Iterator[Connection]:
        """A short transaction. ``single``: the caller runs ONE writing statement, which
        PostgreSQL then runs on its own in autocommit (as durable, and atomic as any
        single statement is), saving the BEGIN and COMMIT round trips. ``snapshot`` (with
        ``readonly``): all its statements see the same table (PostgreSQL: REPEATABLE
        READ; a SQLite read transaction always does)."""
        try:
            with nullcontext() if readonly else self._write_lock, \
                    self.engine.connect() as raw:
                conn = raw
                if readonly:
                    conn = raw.execution_options(readonly=True)
                    if snapshot and self.dialect == "postgresql":
                        conn = conn.execution_options(isolation_level="REPEATABLE READ")
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
        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot reach the database: {_short(exc)}") from exc

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
        current = self.revision()
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


def _short(exc: BaseException) -> str:
    """One line, no SQL parameters (they may hold tokens)."""
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip().splitlines()
    return text_[0][:300] if text_ else type(exc).__name__
