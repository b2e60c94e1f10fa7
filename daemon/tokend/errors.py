"""The one error hierarchy of tokend.

Every failure that crosses a module boundary is a ``TokendError``; the ones that come
from the provider carry the data needed to decide what to do next (``kind``, HTTP
status, OAuth error code, ``Retry-After``). Classification of provider outcomes lives
in :mod:`tokend.classify`, nowhere else.
"""

from __future__ import annotations

from enum import StrEnum


class TokendError(Exception):
    """Base of every error tokend raises on purpose."""

    exit_code = 1


class ConfigError(TokendError):
    """The configuration is unusable; the message names the key and the problem."""

    exit_code = 78


class UsageError(TokendError):
    """The command line is wrong."""

    exit_code = 2


class InputError(TokendError):
    """A file or record given to a command is invalid (nothing was written)."""


class NotSent(TokendError):
    """A request was not sent: stopping while it waited for a new slot of the rate limit
    (its first one had passed, :mod:`tokend.sendgate`). Nothing reached the provider."""


class StoreError(TokendError):
    """The grant store failed or holds something it cannot use."""


class StoreConflict(StoreError):
    """A write broke a unique constraint (e.g. a second client-credentials row)."""


class GrantNotFound(StoreError):
    def __init__(self, grant_id: int) -> None:
        super().__init__(f"grant {grant_id} not found")
        self.grant_id = grant_id


class SchemaError(StoreError):
    """The database's schema is not the one this tokend works with.

    Not a passing fault: waiting or restarting does not change it, an operator must act
    (``tokend db upgrade``, or a newer tokend on this host). EX_CONFIG, so the unit's
    ``RestartPreventExitStatus=78`` does not restart it in a loop.
    """

    exit_code = 78


class DecryptError(StoreError):
    """A token could not be decrypted with any configured key."""


class GrantUnreadable(StoreError):
    """A stored row cannot be decoded (a status that is no status, a bad timestamp)."""

    def __init__(self, grant_id: int, problem: str) -> None:
        super().__init__(f"grant {grant_id} is unreadable: {problem}")
        self.grant_id = grant_id
        self.problem = problem


class ErrorKind(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CLIENT = "client"


class ProviderError(TokendError):
    """A failed call to the provider, already classified.

    ``error`` is the OAuth error code when the provider sent one, else a short
    synthetic code (``timeout``, ``connection``, ``http_503``, ``rate_limited``,
    ``bad_response``) that is safe to use as a metric label.
    ``maybe_applied`` is true when the request may have reached the server and been
    acted upon (a timeout or a dropped connection after sending): the provider may
    have rotated the refresh token without us seeing the new one.
    """

    def __init__(
        self,
        kind: ErrorKind,
        error: str,
        *,
        status: int | None = None,
        description: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
        maybe_applied: bool = False,
    ) -> None:
        self.kind = kind
        self.error = error
        self.status = status
        self.description = description
        self.hint = hint
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied
        super().__init__(self.summary())

    def summary(self) -> str:
        parts = [f"{self.kind.value} provider error {self.error}"]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.description:
            parts.append(self.description)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        if self.retry_after is not None:
            parts.append(f"retry after {self.retry_after:g}s")
        return "; ".join(parts)

    @property
    def transient(self) -> bool:
        return self.kind is ErrorKind.TRANSIENT
