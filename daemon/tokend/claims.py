"""Leases: claiming due grants (the pass, probes, on demand), planning reads and moves,
releasing and expiring leases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Float,
    Interval,
    Select,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import NullType

from .errors import GrantUnreadable, StoreConflict
from .model import (
    ACTIVE,
    Grant,
    GrantType,
    Status,
)
from .planner import FIRST_S, LAST_S, Point, is_moment
from .rows import G, Reads, _at


class Claims(Reads):

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
        template, values = self._claim(now, limit, skip)
        return template.params(values)

    def _claim(self, now: datetime, limit: int,
               skip: Sequence[int]) -> tuple[Select[Any], dict[str, Any]]:
        """The claim SELECT as a statement built once (per limit) and its values: built
        anew for every claim it cost ~0.5 ms of CPU (building, then its cache key)."""
        key = (self.dialect, limit, bool(skip))
        q = _CLAIM_SELECTS.get(key)
        if q is None:
            now_ = bindparam("c_now", type_=G.c.next_attempt_at.type)
            q = self._select(with_tokens=True).where(G.c.next_attempt_at <= now_,
                                                     self._unleased(now_))
            if skip:
                q = q.where(G.c.id.not_in(bindparam("c_skip", expanding=True)))
            q = _CLAIM_SELECTS.setdefault(
                key, self._locked(q.order_by(G.c.next_attempt_at).limit(limit)))
        values: dict[str, Any] = {"c_now": now}
        if skip:
            values["c_skip"] = sorted(skip)
        return q, values

    def _unleased(self, now: datetime | BindParameter[datetime]) -> Any:
        """No lease on the row, or one that ran out (by the lease clock)."""
        return or_(G.c.lease_expires_at.is_(None), G.c.lease_expires_at <= self._lease_now(now))

    def _locked(self, q: Any) -> Any:
        """``q`` locking the rows it reads; on PostgreSQL it skips those another replica
        is claiming (SQLite has one writer: its write lock does the same)."""
        return q.with_for_update(skip_locked=True) if self.dialect == "postgresql" else q

    def _planned(self, now: datetime) -> Any:
        """The grants the planner sees: maintained, planned, not leased now."""
        return and_(
            G.c.status.in_([s.value for s in ACTIVE]), G.c.next_attempt_at.is_not(None),
            G.c.access_expires_at.is_not(None),
            self._unleased(now))

    @contextmanager
    def plan_snapshot(self, now: datetime, *, batch: int = 2000,
                      ) -> Iterator[tuple[int, Iterator[tuple[Point, Any]]]]:
        """``(how many, the grants)`` the planner sees, from ONE snapshot of the table
        (the count gives each expiry its rank, :class:`tokend.planner.Walk`): the
        planned grants latest access-token expiry first, each with its
        ``next_attempt_at`` exactly as stored (what :meth:`replan` compares against).

        Streamed (a server-side cursor on PostgreSQL) with the moments as seconds since
        the epoch computed by the database: a million rows never sit in memory, and no
        timestamp is parsed in Python. A row whose expiry or next attempt is not a time
        Python can hold (edited by hand: text, infinity, year 0 or 20000) is neither
        counted nor streamed; the claim sets it aside and logs it.
        """
        epoch = _epoch_sql(self.dialect)
        expires, at = epoch(G.c.access_expires_at), epoch(G.c.next_attempt_at)
        # NULL (SQLite: not a time), infinity, NaN and years out of range fail BETWEEN
        where = and_(self._planned(now), expires.between(FIRST_S, LAST_S),
                     at.between(FIRST_S, LAST_S))
        q = select(G.c.id, epoch(G.c.obtained_at), expires, at,
                   type_coerce(G.c.next_attempt_at, NullType())).where(where).order_by(
            expires.desc(), G.c.id.desc())
        with self.tx(readonly=True, snapshot=True) as conn:
            total = int(conn.execute(select(func.count()).select_from(G).where(where))
                        .scalar() or 0)

            def points() -> Iterator[tuple[Point, Any]]:
                result = conn.execution_options(yield_per=batch).execute(q)
                for rows in result.partitions():
                    for gid, got, until, moment, raw in rows:
                        obtained = got if got is not None and is_moment(got) else None
                        yield Point(gid, obtained, until, moment), raw

            yield total, points()

    def plan_points(self, now: datetime, *, batch: int = 2000,
                    ) -> Iterator[tuple[Point, Any]]:
        """The grants of :meth:`plan_snapshot`, without the count."""
        with self.plan_snapshot(now, batch=batch) as (_total, points):
            yield from points

    def replan(self, moves: Mapping[int, tuple[Any, datetime]]) -> int:
        """Move planned moments (id -> (as read, new)); a row changed meanwhile (refreshed,
        leased, edited) keeps its own."""
        if not moves:
            return 0
        now = self.clock()
        # The old value as plan_points read it (text on SQLite): compared as stored.
        stmt = update(G).where(
            G.c.id == bindparam("m_id"),
            type_coerce(G.c.next_attempt_at, NullType()) == bindparam("m_old", type_=NullType()),
            self._unleased(now),
        ).values(next_attempt_at=bindparam("m_at", type_=G.c.next_attempt_at.type))
        with self.tx() as conn:  # in id order, as every write of several rows (writes.py)
            moved = conn.execute(stmt, [{"m_id": gid, "m_old": old, "m_at": new}
                                        for gid, (old, new) in sorted(moves.items())]).rowcount
        return max(moved, 0)  # rows changed meanwhile (another replica planned) count not

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
                rows = conn.execute(*self._claim(now, limit, list(self.unreadable))).all()
                for r in rows:
                    try:
                        grants.append(self._grant(r, with_tokens=True))
                    except GrantUnreadable as exc:
                        bad.append(exc)  # not leased: the row stays exactly as it is
                leased = self._lease(conn, grants, owner, until, lease)
            self._set_aside(bad)
            if leased or not bad:
                return leased  # a batch of nothing but unreadable rows: claim past them

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
                self._unleased(now))
            skip = self.unreadable
            if skip:
                q = q.where(G.c.id.not_in(sorted(skip)))
            q = self._locked(q.order_by(G.c.access_expires_at.is_(None).desc(),
                                        G.c.access_expires_at, G.c.id).limit(1))
            with self.tx() as conn:
                row = conn.execute(q).first()
                if row is None:
                    return None
                try:
                    g = self._grant(row, with_tokens=True)
                except GrantUnreadable as exc:
                    bad = exc  # not leased: set aside below, then the next candidate
                else:
                    return self._lease(conn, [g], owner, until, lease)[0]
            self._set_aside([bad])

    def claim_one(self, grant_id: int, owner: str, lease: timedelta) -> Grant | None:
        """Lease one grant, due or not, for an on-demand refresh (:mod:`tokend.ondemand`);
        None while someone else's lease on it runs. Only active grants are claimed."""
        now = self.clock()
        until = now + lease
        q = self._select(with_tokens=True).where(
            G.c.id == grant_id, G.c.status.in_([s.value for s in ACTIVE]),
            self._unleased(now))
        q = self._locked(q)
        with self.tx() as conn:
            row = conn.execute(q).first()
            if row is None:
                return None
            return self._lease(conn, [self._grant(row, with_tokens=True)], owner, until,
                               lease)[0]

    def _lease(self, conn: Connection, grants: Sequence[Grant], owner: str,
               until: datetime, lease: timedelta) -> list[Grant]:
        """Lease ``grants`` (read in this transaction) to ``owner``; returns them as leased.

        A grant still leased to someone whose lease ran out had an attempt in flight:
        it is marked in doubt (its token may have rotated)."""
        if grants:
            conn.execute(_claim_update(self.dialect), {
                "ids": [g.id for g in grants], "c_owner": owner, "c_until": until,
                "c_lease": lease})
        return [replace(g, in_doubt=g.in_doubt or g.lease_owner is not None,
                        lease_owner=owner, lease_expires_at=until) for g in grants]

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
            # in id order, as every write of several rows (writes.py: no deadlock)
            conn.execute(stmt, [{"r_id": gid, "r_at": at}
                                for gid, at in sorted(order(held, now))])
        return len(held)

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

    def release(self, grant: Grant, owner: str, next_attempt_at: datetime | None) -> None:
        """Give a claimed grant back untouched (shutdown before its attempt started)."""
        with self.tx() as conn:
            conn.execute(
                update(G).where(G.c.id == grant.id, G.c.lease_owner == owner).values(
                    lease_owner=None, lease_expires_at=None, next_attempt_at=next_attempt_at,
                    in_doubt=grant.in_doubt,
                )
            )

    def due_query_plan(self, now: datetime, limit: int = 100) -> str:
        """The backend's plan for the claim query itself, for tests and ``bench/``."""
        compiled = self.claim_query(now, limit).compile(
            dialect=self.engine.dialect, compile_kwargs={"literal_binds": True})
        prefix = "EXPLAIN QUERY PLAN " if self.dialect == "sqlite" else "EXPLAIN "
        with self.tx(readonly=True) as conn:
            rows = conn.exec_driver_sql(prefix + str(compiled)).all()
        return "\n".join(" ".join(str(x) for x in r) for r in rows)


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
_CLAIM_SELECTS: dict[tuple[str, int, bool], Select[Any]] = {}


def _claim_update(dialect: str) -> Any:
    stmt = _CLAIM_STATEMENTS.get(dialect)
    if stmt is None:
        stmt = _CLAIM_STATEMENTS[dialect] = _claim_statement(dialect)
    return stmt



def _epoch_sql(dialect: str) -> Callable[[Any], Any]:
    """A timestamp column as float seconds since the epoch, by the database (NULL where
    SQLite's text is not a time)."""
    if dialect == "sqlite":
        return lambda col: type_coerce((func.julianday(col) - 2440587.5) * 86400.0, Float)
    return lambda col: sql_cast(func.extract("epoch", col), Float)
