"""The local token API (``[api] listen``): applications in any language read tokens here.

    GET  /v1/token?client=C&user_id=U    (or ?grant_id=N; no user_id: client credentials)
    POST /v1/grants/N/refresh            (on demand, after the application got a 401)

200 ``{"access_token", "token_type", "expires_at", "grant_id", "status"}``; 404 unknown
grant; 409 re-consent needed (``reason``, and ``consent_url`` when ``[consent]`` is set);
401 bad or missing key; 403 a client the key (or ``[api] clients``) does not cover;
503 with ``Retry-After`` when no token can be had within ``[api] wait``.

Over TCP (loopback only) every request carries ``Authorization: Bearer <key>``, a key
of ``[api] key_file`` (compared in constant time); on the Unix socket its file mode
(0660, the socket unit's ``SocketGroup=``) is the check. :func:`answer` decides each
request (a pure function of the request and lookups passed in); the listener is
:class:`tokend.listener.BoundedHTTPServer`. Tokens are never logged: only the method,
the path without its query, the grant id and the status are.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import logs
from .api import GrantUnavailable, TokenStore
from .config import ApiKey, Config
from .errors import GrantNotFound, StoreError, TokendError
from .listener import BoundedHTTPServer, Served
from .model import ACTIVE, Grant, Status
from .ondemand import OnDemand, Unavailable

log = logs.get("tokend.api")
SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    grant_id: int | None = None


def allowed_clients(keys: tuple[ApiKey, ...], limit: tuple[str, ...],
                    authorization: str | None, needs_key: bool) -> frozenset[str] | bool:
    """The clients a request may read: a set (empty: all), or False if its key is wrong.

    Every key is compared (in constant time), so the answer's timing says nothing about
    which key, or how much of one, was right."""
    presented = ""
    if authorization and authorization[:7].lower() == "bearer ":
        presented = authorization[7:].strip()
    match: ApiKey | None = None
    for k in keys:
        if hmac.compare_digest(k.key.value.encode(), presented.encode()):
            match = k
    if needs_key and match is None:
        return False
    names = set(limit)
    if match is not None and match.clients:
        names = set(match.clients) & names if names else set(match.clients)
        if not names:
            return frozenset({""})  # the key's clients and [api] clients do not meet
    return frozenset(names)


def body_of(grant: Grant, token: str) -> dict[str, Any]:
    return {"access_token": token, "token_type": "Bearer",
            "expires_at": _iso(grant.access_expires_at), "grant_id": grant.id,
            "status": grant.status.value}


class TokenApi:
    """What each request gets; the HTTP shell is :class:`ApiServer`."""

    def __init__(self, config: Config, tokens: TokenStore, ondemand: OnDemand,
                 *, needs_key: bool) -> None:
        self.config = config
        self.tokens = tokens
        self.ondemand = ondemand
        self.needs_key = needs_key

    def answer(self, method: str, target: str, authorization: str | None) -> Reply:
        allowed = allowed_clients(self.config.api.keys, self.config.api.clients,
                                  authorization, self.needs_key)
        if allowed is False:
            return Reply(401, {"error": "unauthorized", "detail": "a valid bearer key is "
                               "required (Authorization: Bearer <key of [api] key_file>)"},
                         {"WWW-Authenticate": 'Bearer realm="tokend"'})
        assert not isinstance(allowed, bool)
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            if parts.path == "/v1/token":
                if method != "GET":
                    return _not_allowed("GET")
                return self._token(query, allowed)
            segs = parts.path.strip("/").split("/")
            if len(segs) == 4 and segs[:2] == ["v1", "grants"] and segs[3] == "refresh":
                if method != "POST":
                    return _not_allowed("POST")
                return self._refresh(_grant_id(segs[2]), allowed)
            return Reply(404, {"error": "not_found", "detail": "no such endpoint"})
        except _BadRequest as exc:
            return Reply(400, {"error": "invalid_request", "detail": str(exc)})
        except GrantNotFound:
            return Reply(404, {"error": "unknown_grant", "detail": "no such grant"})
        except Unavailable as exc:
            return Reply(503, {"error": "unavailable", "detail": str(exc)},
                         {"Retry-After": str(exc.retry_after)})
        except StoreError as exc:
            log.error("api_store_error", error=str(exc)[:300])
            return Reply(503, {"error": "unavailable", "detail": "the database is unavailable"},
                         {"Retry-After": "5"})

    def _token(self, query: dict[str, str], allowed: frozenset[str]) -> Reply:
        if "grant_id" in query:
            grant = self.tokens.by_id(_grant_id(query["grant_id"]))
        elif "client" in query:
            client = query["client"]
            if client not in self.config.clients:
                return Reply(404, {"error": "unknown_client", "detail": "no such client"})
            if not _covers(allowed, client):
                return _forbidden(client)
            try:
                grant = self.tokens.grant(client=client, user_id=query.get("user_id"))
            except GrantUnavailable:
                return Reply(404, {"error": "unknown_grant", "detail": "no such grant"})
        else:
            raise _BadRequest("give grant_id, or client (and user_id)")
        if not _covers(allowed, grant.client):
            return _forbidden(grant.client)
        now = self.ondemand.maintenance.clock()
        if grant.status in ACTIVE and (grant.access_expires_at is None
                                       or grant.access_expires_at <= now):
            grant = self.ondemand.refresh(grant.id)  # none valid yet: as a 401 would ask
        return self._reply(grant)

    def _refresh(self, grant_id: int, allowed: frozenset[str]) -> Reply:
        grant = self.tokens.by_id(grant_id)
        if not _covers(allowed, grant.client):
            return _forbidden(grant.client)
        return self._reply(self.ondemand.refresh(grant_id))

    def _reply(self, grant: Grant) -> Reply:
        if grant.status not in ACTIVE:
            body: dict[str, Any] = {"error": grant.status.value, "grant_id": grant.id,
                                    "status": grant.status.value, "reason": grant.reason}
            if grant.status == Status.RECONSENT_REQUIRED and self.config.consent.enabled:
                with contextlib.suppress(TokendError):
                    body["consent_url"] = self.tokens.consent_link(grant.id)
            return Reply(409, body, grant_id=grant.id)
        try:
            token = self.tokens.access_token_by_id(grant.id)
            grant = self.tokens.by_id(grant.id)
        except GrantUnavailable as exc:
            return Reply(503, {"error": "unavailable", "detail": str(exc)},
                         {"Retry-After": "5"}, grant.id)
        return Reply(200, body_of(grant, token), grant_id=grant.id)


class _BadRequest(ValueError):
    pass


def _grant_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise _BadRequest("grant_id must be a whole number")
    return int(text)


def _covers(allowed: frozenset[str], client: str) -> bool:
    return not allowed or client in allowed


def _forbidden(client: str) -> Reply:
    return Reply(403, {"error": "forbidden",
                       "detail": f"this key may not read tokens of client {client!r}"})


def _not_allowed(method: str) -> Reply:
    return Reply(405, {"error": "method_not_allowed"}, {"Allow": method})


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


# --------------------------------------------------------------------------- the listener

class _Handler(BaseHTTPRequestHandler):
    server_version = "tokend"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= 4096:
            self.rfile.read(length)  # nothing is read from a body; drained for keep-alive
        self._serve()

    def _serve(self) -> None:
        api: TokenApi = self.server.api  # type: ignore[attr-defined]
        started = time.monotonic()
        try:
            reply = api.answer(self.command, self.path, self.headers.get("Authorization"))
        except Exception as exc:  # a bug: say so without the request's contents
            log.error("api_request_crashed", error=type(exc).__name__)
            reply = Reply(500, {"error": "internal"})
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True
        log.info("api_request", method=self.command, path=urlsplit(self.path).path,
                 status=reply.status, grant_id=reply.grant_id,
                 duration_ms=round((time.monotonic() - started) * 1000, 1))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the structured line above; the default one would print the query


class _Server(BoundedHTTPServer):
    def __init__(self, *, unix_path: Path | None, address: tuple[str, int] | None,
                 inherited: socket.socket | None, request_timeout: float,
                 idle_timeout: float | None = None) -> None:
        self._unix_path = unix_path
        self._inherited = inherited
        if inherited is not None:
            self.address_family = inherited.family
        elif unix_path is not None:
            self.address_family = socket.AF_UNIX
        super().__init__(address or ("", 0), _Handler, name="tokend-api-http",
                         workers=8, request_timeout=request_timeout,
                         idle_timeout=idle_timeout)

    def server_bind(self) -> None:
        if self._inherited is not None:
            self.socket.close()
            self.socket = self._inherited
            self.server_address = self.socket.getsockname()
            return
        if self._unix_path is not None:
            path = self._unix_path
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()  # left by a process that ended without cleaning up
            old = os.umask(0o117)  # created 0660 at once: never readable by all first
            try:
                self.socket.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o660)
            self.server_address = str(path)  # type: ignore[assignment]
            return
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()[:2]

    def server_activate(self) -> None:
        if self._inherited is None:
            super().server_activate()


def inherited_socket(env: dict[str, str] | None = None) -> socket.socket | None:
    """The socket systemd handed over (``LISTEN_FDS``/``LISTEN_PID``, fd 3), if any."""
    e = os.environ if env is None else env
    if e.get("LISTEN_PID") != str(os.getpid()) or int(e.get("LISTEN_FDS") or 0) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.setblocking(True)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for any child process
    return sock


class ApiServer:
    def __init__(self, config: Config, tokens: TokenStore, ondemand: OnDemand, *,
                 inherited: socket.socket | None = None,
                 idle_timeout: float | None = None) -> None:
        api = config.api
        self.unix_path = api.socket_path if inherited is None else None
        is_unix = (inherited.family == socket.AF_UNIX if inherited is not None
                   else api.socket_path is not None)
        # Over TCP anything on the host can connect: a key is then always required.
        if not is_unix and not api.keys:
            raise TokendError("api.key_file: is required for a TCP listener "
                              "(socket handed over by systemd, or HOST:PORT)")
        timeout = (api.wait.total_seconds() + config.provider.timeout.total_seconds() * 2
                   + 10)
        self.server = _Server(unix_path=self.unix_path, address=api.address,
                              inherited=inherited, request_timeout=timeout,
                              idle_timeout=idle_timeout)
        self.server.api = TokenApi(config, tokens, ondemand,  # type: ignore[attr-defined]
                                   needs_key=not is_unix)
        self.served = Served(self.server, "tokend-api")

    @property
    def address(self) -> str:
        a = self.server.server_address
        if isinstance(a, tuple):
            return f"{a[0]!s}:{a[1]}"
        return a.decode() if isinstance(a, bytes) else str(a)

    def start(self) -> ApiServer:
        self.served.start()
        return self

    def stop(self) -> None:
        self.served.stop()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()


def start(config: Config, tokens: TokenStore, ondemand: OnDemand,
          inherited: Callable[[], socket.socket | None] = inherited_socket) -> ApiServer:
    return ApiServer(config, tokens, ondemand, inherited=inherited()).start()
