"""The grant store: every SQL statement tokend runs, on SQLite or PostgreSQL.

A facade composed of its parts: :mod:`tokend.db` (engine, transactions, error
translation, schema), :mod:`tokend.rows` (reads), :mod:`tokend.claims` (leases),
:mod:`tokend.writes` (saves), :mod:`tokend.outbox` (events), :mod:`tokend.rekey`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Table,
    insert,
    select,
    update,
)

from .claims import Claims
from .config import Config
from .crypto import cipher_for
from .db import Clock, _alembic_config, make_engine, utcnow
from .rekey import Rekey
from .rows import G
from .schema import ReplicaRow
from .writes import Decide, SaveItem, Writes

R = cast(Table, ReplicaRow.__table__)

__all__ = [
    "Clock",
    "Decide",
    "G",
    "SaveItem",
    "Store",
    "_alembic_config",
    "make_engine",
    "open_store",
    "utcnow",
]


class Store(Claims, Writes, Rekey):
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
