"""The public Python API for the application that owns the grants.

    from tokend.api import TokenStore

    with TokenStore.from_config("/etc/tokend/tokend.toml") as tokens:
        headers = {"Authorization": "Bearer " + tokens.access_token(client="main", user_id="1234")}

It reads the same database and key as the daemon and never refreshes by itself: the
daemon keeps tokens fresh; this returns the current one or says why there is none.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from types import TracebackType

from .config import Config, load_config
from .errors import TokendError
from .model import Grant, GrantType, Status, UnreadableGrant
from .store import Store, open_store


class GrantUnavailable(TokendError):
    """No usable access token: the grant needs re-consent, is disabled, or expired."""

    def __init__(self, message: str, grant: Grant | None = None) -> None:
        super().__init__(message)
        self.grant = grant


class TokenStore:
    def __init__(self, config: Config, *, store: Store | None = None) -> None:
        self.config = config
        self._store = store or open_store(config)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> TokenStore:
        return cls(load_config(path))

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._store.close()

    def grant(self, *, client: str, user_id: str | int | None = None) -> Grant:
        """The grant of ``user_id`` for ``client`` (its client-credentials grant if None)."""
        self.config.client(client)  # unknown client: a clear error
        uid = None if user_id is None else str(user_id)
        kind = GrantType.CLIENT_CREDENTIALS if uid is None else GrantType.AUTHORIZATION_CODE
        rows = list(self._store.iter_rows(client=client, user_id=uid))
        found = [g for g in rows if isinstance(g, Grant)
                 and g.grant_type == kind and (uid is not None or g.user_id is None)]
        bad = [r for r in rows if isinstance(r, UnreadableGrant)]
        if not found and bad and uid is not None:
            raise GrantUnavailable(f"grant {bad[-1].id} is unreadable: {bad[-1].error}")
        if not found:
            who = f"user {uid}" if uid is not None else "client credentials"
            raise GrantUnavailable(f"no grant for {who} of client {client!r}")
        return found[-1]

    def consent_link(self, grant_id: int) -> str:
        """A signed link the grant's user opens to re-consent (``[consent]`` must be set)."""
        from .consent import link_for

        return link_for(self.config, self._store.get(grant_id), datetime.now(UTC))

    def access_token(self, *, client: str, user_id: str | int | None = None) -> str:
        return self._usable(self.grant(client=client, user_id=user_id))

    def access_token_by_id(self, grant_id: int) -> str:
        return self._usable(self._store.get(grant_id))

    def _usable(self, grant: Grant) -> str:
        if grant.status == Status.RECONSENT_REQUIRED:
            raise GrantUnavailable(
                f"grant {grant.id} needs re-consent ({grant.reason}): run "
                f"`tokend authorize --client {grant.client}` as user {grant.user_id}", grant)
        if grant.status == Status.DISABLED:
            raise GrantUnavailable(f"grant {grant.id} is disabled", grant)
        now = datetime.now(UTC)
        if grant.access_expires_at is None or grant.access_expires_at <= now:
            when = grant.access_expires_at.isoformat() if grant.access_expires_at else "never"
            raise GrantUnavailable(f"grant {grant.id} has no valid access token (expired: {when});"
                                   " is the daemon running?", grant)
        full = self._store.get(grant.id, with_tokens=True)
        access, _ = self._store.tokens(full)
        if access is None:
            raise GrantUnavailable(f"grant {grant.id} has no access token yet", grant)
        return access
