"""The database side of the web re-consent: consent states and storing into one grant.

States live in the database (``consent_states``), so the provider's redirect may reach
any replica; a state is consumed by one atomic UPDATE, so it completes at most once.
The PKCE verifier of the flow lives with its state (encrypted like the tokens), for the
replica that receives the callback.
Uses the :class:`~tokend.store.Store`'s transactions, on SQLite or PostgreSQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, update

from .consent import Link, LinkRefused, Refusal, consent_mark
from .errors import TokendError
from .model import NewGrant, Status
from .schema import ConsentStateRow
from .store import Decide, G, Store

S = cast(Table, ConsentStateRow.__table__)
KEEP_USED = timedelta(days=1)  # old rows are removed as new ones come


class WrongUser(TokendError):
    """The person who consented is not the grant's user: nothing is stored."""


@dataclass(frozen=True)
class Pending:
    grant_id: int
    mark: str
    redirect_uri: str
    code_verifier: str = field(repr=False)


def _digest(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


class ConsentStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def begin(self, state: str, link: Link, redirect_uri: str, ttl: timedelta,
              code_verifier: str) -> None:
        now = self.store.clock()
        with self.store.tx() as conn:
            conn.execute(delete(S).where(S.c.expires_at < now - KEEP_USED))
            conn.execute(insert(S).values(
                id=_digest(state), grant_id=link.grant_id, mark=link.mark,
                redirect_uri=redirect_uri, created_at=now, expires_at=now + ttl,
                used_at=None, code_verifier=self.store.cipher.encrypt(code_verifier)))

    def take(self, state: str) -> Pending | None:
        """Consume a state: only the first callback that presents it, in time, gets it."""
        now = self.store.clock()
        digest = _digest(state)
        with self.store.tx() as conn:
            taken = conn.execute(update(S).where(
                S.c.id == digest, S.c.used_at.is_(None), S.c.expires_at > now,
            ).values(used_at=now)).rowcount
            if taken != 1:
                return None
            row = conn.execute(select(S.c.grant_id, S.c.mark, S.c.redirect_uri,
                                      S.c.code_verifier).where(S.c.id == digest)).one()
        # A key dropped from the key file within the state's lifetime: DecryptError (a
        # StoreError), and the person starts again from the link.
        return Pending(int(row[0]), str(row[1]), str(row[2]),
                       self.store.cipher.decrypt(str(row[3])))

    def store_consent(self, pending: Pending, new: NewGrant, decide: Decide,
                      event: Callable[[Any, Status], dict[str, Any] | None]) -> Status:
        """Put the new tokens into exactly the linked grant; returns its previous status.

        Refused (nothing written) when the grant is gone, was consented to since the link
        was made, or belongs to another user. A daemon refreshing the grant right now
        loses its save guard (token_version moves), as with ``tokend authorize``.
        """
        store = self.store
        now = store.clock()
        with store.tx() as conn:
            q = store._select().where(G.c.id == pending.grant_id)
            if store.dialect == "postgresql":
                q = q.with_for_update()
            row = conn.execute(q).first()
            if row is None:
                raise LinkRefused(Refusal.UNKNOWN)
            grant = store._grant(row)
            if consent_mark(grant.consented_at) != pending.mark:
                raise LinkRefused(Refusal.USED)
            if grant.status == Status.DISABLED:
                raise LinkRefused(Refusal.UNAVAILABLE)
            if grant.user_id != new.user_id or grant.client != new.client:
                raise WrongUser
            values = store._new_row(grant.id, new, now, decide)
            for key in ("id", "created_at", "client", "grant_type", "user_id"):
                values.pop(key)
            values.update(token_version=G.c.token_version + 1, reminder_deadline=None,
                          reminder_point=None)
            conn.execute(update(G).where(G.c.id == grant.id).values(**values))
            stored = store._grant(conn.execute(store._select().where(G.c.id == grant.id)).one())
            payload = event(stored, grant.status)
            if payload is not None:
                store._add_event(conn, payload, grant.id, now)
        return grant.status
