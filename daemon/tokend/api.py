"""The public Python API for the application that owns the grants.

    from tokend.api import TokenStore

    with TokenStore.from_config("/etc/tokend/tokend.toml") as tokens:
        headers = {"Authorization": "Bearer " + tokens.access_token(client="main", user_id="1234")}

It reads the same database and key as the daemon and never refreshes by itself: the
daemon keeps tokens fresh; this returns the current one or says why there is none.
After a 401, :meth:`TokenStore.refresh_now` asks for a new one (through the daemon's
token API when ``[api] listen`` is set, else in this process under the same lease
discipline); :class:`BearerAuth` does both for ``requests``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import requests

from .config import Config, load_config
from .errors import TokendError
from .model import Grant, GrantType, Status, UnreadableGrant
from .store import Store, open_store

if TYPE_CHECKING:
    from .ondemand import OnDemand


class GrantUnavailable(TokendError):
    """No usable access token: the grant needs re-consent, is disabled, or expired."""

    def __init__(self, message: str, grant: Grant | None = None) -> None:
        super().__init__(message)
        self.grant = grant


class TokenStore:
    def __init__(self, config: Config, *, store: Store | None = None,
                 api_key: str | None = None) -> None:
        self.config = config
        self._store = store or open_store(config)
        self._api_key = api_key or (config.api.keys[0].key.value if config.api.keys else None)
        self._ondemand: OnDemand | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> TokenStore:
        return cls(load_config(path))

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._ondemand is not None:
            self._ondemand.maintenance.close()
            self._ondemand.maintenance.provider.close()
        self._store.close()

    def refresh_now(self, grant_id: int) -> str:
        """A new access token for a grant whose token was just refused (a 401).

        Waits if the grant is being refreshed anyway; a token obtained in the last 10 s is
        returned as it is. Raises :class:`GrantUnavailable` (re-consent needed) or
        :class:`Busy` (no new token within ``[api] wait``; ``retry_after`` seconds)."""
        if self.config.api.enabled:
            return self._refresh_via_api(grant_id)
        from .ondemand import Unavailable

        try:
            grant = self._in_process().refresh(grant_id)
        except Unavailable as exc:
            raise Busy(str(exc), exc.retry_after) from None
        return self._usable(grant)

    def _in_process(self) -> OnDemand:
        with self._lock:
            if self._ondemand is None:
                from .maintenance import Maintenance
                from .ondemand import OnDemand
                from .provider import ProviderClient

                provider = ProviderClient(self.config.provider, pool_size=2)
                self._ondemand = OnDemand(Maintenance(self.config, self._store, provider),
                                          self.config.api.wait)
            return self._ondemand

    def _refresh_via_api(self, grant_id: int) -> str:
        status, headers, body = api_request(self.config, "POST",
                                            f"/v1/grants/{int(grant_id)}/refresh", self._api_key)
        if status == 200:
            return str(body["access_token"])
        if status == 409:
            raise GrantUnavailable(f"grant {grant_id} needs re-consent ({body.get('reason')})"
                                   + (f": {body['consent_url']}" if body.get("consent_url")
                                      else ""))
        if status == 503:
            raise Busy(str(body.get("detail", "unavailable")),
                       int(headers.get("retry-after", "5")))
        if status == 404:
            raise GrantUnavailable(f"grant {grant_id} does not exist")
        raise TokendError(f"token API answered {status}: {body.get('error')}")

    def grant(self, *, client: str, user_id: str | int | None = None) -> Grant:
        """The grant of ``user_id`` for ``client`` (its client-credentials grant if None)."""
        self.config.client(client)  # unknown client: a clear error
        uid = None if user_id is None else str(user_id)
        kind = GrantType.CLIENT_CREDENTIALS if uid is None else GrantType.AUTHORIZATION_CODE
        found = self._store.find(client, uid, kind)
        if isinstance(found, UnreadableGrant) and uid is not None:
            raise GrantUnavailable(f"grant {found.id} is unreadable: {found.error}")
        if not isinstance(found, Grant):
            who = f"user {uid}" if uid is not None else "client credentials"
            raise GrantUnavailable(f"no grant for {who} of client {client!r}")
        return found

    def by_id(self, grant_id: int) -> Grant:
        """Grant ``grant_id`` (tokens left out); GrantNotFound if there is none."""
        return self._store.get(grant_id)

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


class Busy(TokendError):
    """No new token now; ask again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def api_request(config: Config, method: str, target: str,
                key: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One request to the daemon's token API: status, headers (lower-case), JSON body."""
    timeout = config.api.wait.total_seconds() + config.provider.timeout.total_seconds() * 2 + 15
    conn: http.client.HTTPConnection
    if config.api.socket_path is not None:
        conn = _UnixConnection(str(config.api.socket_path), timeout)
    else:
        assert config.api.address is not None
        host, port = config.api.address
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        conn.request(method, target, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise TokendError(f"token API at {config.api.listen} is unreachable: "
                          f"{exc.strerror or type(exc).__name__}") from None
    finally:
        conn.close()
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        body = {}
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


class BearerAuth(requests.auth.AuthBase):
    """``requests`` auth: the grant's current access token; on a 401 the token is read
    again, and if it did not change one on-demand refresh is asked for; the request is
    then sent once more.

        session.auth = BearerAuth(tokens, client="main", user_id="1234")
    """

    def __init__(self, tokens: TokenStore, *, client: str,
                 user_id: str | int | None = None) -> None:
        self.tokens = tokens
        self.client = client
        self.user_id = user_id

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.tokens.access_token(client=self.client, user_id=self.user_id)
        r.headers["Authorization"] = "Bearer " + token
        r.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return r

    def _on_response(self, resp: requests.Response, **kwargs: Any) -> requests.Response:
        if resp.status_code != 401 or getattr(resp.request, "_tokend_retried", False):
            return resp
        sent = (resp.request.headers.get("Authorization") or "").removeprefix("Bearer ")
        grant = self.tokens.grant(client=self.client, user_id=self.user_id)
        token = self.tokens.access_token_by_id(grant.id)
        if token == sent:
            token = self.tokens.refresh_now(grant.id)
        resp.content  # noqa: B018 - read it, so the connection can be reused
        resp.close()
        retry = resp.request.copy()
        retry.headers["Authorization"] = "Bearer " + token
        retry._tokend_retried = True  # type: ignore[attr-defined]
        again: requests.Response = resp.connection.send(retry, **kwargs)
        again.history.append(resp)
        again.request = retry
        return again
