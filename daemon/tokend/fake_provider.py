"""A fake Justimmo authorization server (league/oauth2-server 5.x to 9.x) on a real local port.

Tests, the demo and the benchmarks need a provider that behaves like the real one where
it matters to tokend: refresh-token rotation without grace period, the error bodies and
HTTP statuses of each league major version, ``client_secret_post`` and
``client_secret_basic``, and the failures seen in production (HTML 5xx pages, 429,
timeouts and dropped connections, including the ambiguous "rotated, then the answer was
lost"). It speaks real HTTP/1.1 with keep-alive so connection pooling and concurrency are
exercised as well.

All expiry decisions use the injected ``clock`` (so tests can jump a month ahead); latency
and hangs use real time. Control and inspection work in-process (methods) and over HTTP
(``/_fake/*``), so the fake can also run as a separate process:
``python -m tokend.fake_provider --port 8080 --latency 0.05``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import gc
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from types import FrameType, TracebackType
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlencode, urlsplit

from tokend.durations import Duration, parse_timedelta

League = Literal["5", "7", "8", "9"]
FAULTS = frozenset(
    {
        "html_500",
        "json_500",
        "rate_limited",
        "timeout",
        "timeout_after_rotate",
        "drop",
        "drop_after_rotate",
        "invalid_client",
        "malformed_json",
        "empty_200",
    }
)
ONE_MONTH = Duration(months=1)  # league's default refreshTokenTTL, P1M
GRANT_TYPES = ("refresh_token", "client_credentials", "authorization_code")
# league's check of code_challenge and code_verifier (RFC 7636 4.1), and its verifiers.
PKCE_FORMAT = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
PKCE_METHODS = ("S256", "plain")

# league's messages, verbatim: clients may log or match them.
MSG_INVALID_REQUEST = (
    "The request is missing a required parameter, includes an invalid parameter value, "
    "includes a parameter more than once, or is otherwise malformed."
)
MSG_INVALID_GRANT = (
    "The provided authorization grant (e.g., authorization code, resource owner credentials) "
    "or refresh token is invalid, expired, revoked, does not match the redirection URI used "
    "in the authorization request, or was issued to another client."
)
MSG_INVALID_REFRESH = "The refresh token is invalid."
MSG_INVALID_CLIENT = "Client authentication failed"
MSG_UNSUPPORTED_GRANT = "The authorization grant type is not supported by the authorization server."
MSG_SERVER_ERROR = (
    "The authorization server encountered an unexpected condition which prevented it from "
    "fulfilling the request."
)
MSG_ACCESS_DENIED = "The resource owner or authorization server denied the request."

_JSON = "application/json; charset=UTF-8"
_NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
# league's refresh tokens are ~750 chars of hex from defuse/php-encryption ("def50200"...);
# ours are random hex of the same size, so clients' column sizes and logs see the real thing.
_REFRESH_HEX_BYTES = 372


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    """What a client would store after a successful token response."""

    access_token: str
    refresh_token: str | None
    expires_in: int
    obtained_at: datetime
    access_expires_at: datetime
    refresh_expires_at: datetime | None
    user_id: int | None
    tenant_id: int | None
    client_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_in": self.expires_in,
            "obtained_at": self.obtained_at.isoformat(),
            "access_expires_at": self.access_expires_at.isoformat(),
            "refresh_expires_at": (
                self.refresh_expires_at.isoformat() if self.refresh_expires_at else None
            ),
            "user_id": self.user_id,
            "tenant_id": self.tenant_id,
        }


class ManualClock:
    """A settable UTC clock for ``FakeJustimmo(clock=...)``; thread-safe."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2024, 1, 31, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        with self._lock:
            self._now += step
            return self._now

    def set(self, moment: datetime) -> None:
        with self._lock:
            self._now = moment


@dataclass(slots=True)
class _Access:
    client_id: str
    user_id: int | None
    tenant_id: int | None
    expires_at: datetime
    revoked: bool = False


@dataclass(slots=True)
class _Refresh:
    client_id: str
    user_id: int | None
    tenant_id: int | None
    access_token: str
    chain: int
    expires_at: datetime
    revoked: bool = False
    rotated: bool = False  # revoked by a rotation: presenting it again is a reuse


@dataclass(slots=True)
class _Code:
    client_id: str
    redirect_uri: str
    user_id: int
    tenant_id: int
    expires_at: datetime
    code_challenge: str | None = None  # PKCE, as league keeps it in the code's payload
    code_challenge_method: str = "plain"
    used: bool = False


@dataclass(slots=True)
class _Fault:
    kind: str
    remaining: int | None
    grant_type: str | None
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    error: str | None = None  # tallied in stats()["errors_by_code"] for the token endpoint


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the handler does with a token request: answer, or hang and/or hang up."""

    response: _Response | None  # None: close the connection without answering
    hang: float = 0.0


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    token_requests: int = 0
    connections: int = 0
    by_grant: Counter[str] = field(default_factory=Counter)
    successes: int = 0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    reuse_count: int = 0
    rotations: int = 0
    faults_served: int = 0
    faults_by_kind: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_concurrent: int = 0


def _json_response(
    status: int, payload: object, extra: tuple[tuple[str, str], ...] = ()
) -> _Response:
    body = json.dumps(payload).encode()
    return _Response(status, body, (("Content-Type", _JSON), *_NO_STORE, *extra))


class FakeJustimmo:
    """The fake provider. ``start()`` it (or use ``with``), point clients at ``token_url``."""

    def __init__(
        self,
        *,
        clients: Mapping[str, str] | None = None,
        access_ttl: float = 86400.0,
        refresh_ttl: Duration = ONE_MONTH,
        code_ttl: float = 60.0,
        cc_ttl: float = 86400.0,
        league: League = "5",
        latency: float = 0.0,
        clock: Callable[[], datetime] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        users: Mapping[int, int] | None = None,
        request_times_limit: int = 10_000,
        consent_page: bool = False,
    ) -> None:
        if league not in ("5", "7", "8", "9"):
            raise ValueError(f"league must be one of 5, 7, 8, 9, not {league!r}")
        self.clients = dict(clients if clients is not None else {"demo-client": "demo-secret"})
        self.users = dict(users if users is not None else {1234: 5678})
        if not self.users:
            raise ValueError("at least one user is needed for the authorize flow")
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.code_ttl = code_ttl
        self.cc_ttl = cc_ttl
        self.league: League = league
        self._latency = latency
        # Looked up at call time so freezegun's patched ``datetime`` is honoured.
        self._clock = clock or (lambda: datetime.now(UTC))
        self._host = host
        self._port = port

        self._lock = threading.Lock()  # guards tokens, codes, faults and counters
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._codes: dict[str, _Code] = {}
        self._chains = count(1)
        self._chain_head: dict[int, str] = {}
        self._grant_chain: dict[tuple[int | None, str], int] = {}
        self._faults: list[_Fault] = []
        self._deny = False
        # (code_challenge, code_challenge_method) of the last code issued; tests read it.
        self._last_challenge: tuple[str | None, str | None] = (None, None)
        # A real authorize page (choose user, approve or deny) instead of an instant redirect.
        self.consent_page = consent_page
        self._c = _Counters()
        self._request_times: deque[float] = deque(maxlen=max(request_times_limit, 0))

        self._life = threading.Lock()  # serialises start/stop/pause/resume
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # set on stop/pause so hanging handlers give up

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeJustimmo:
        with self._life:
            if self._server is not None:
                raise RuntimeError("FakeJustimmo is already running")
            self._bind()
        return self

    def stop(self) -> None:
        with self._life:
            self._unbind()

    def pause(self) -> None:
        """Go away like a crashed server: new connections are refused, open ones cut."""
        with self._life:
            self._unbind()

    def resume(self) -> None:
        with self._life:
            if self._server is None:
                self._bind()  # same port: _bind reuses the one chosen first

    def __enter__(self) -> FakeJustimmo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> None:
        self._wake = threading.Event()  # before the server: it hands this one to handlers
        server = _Server((self._host, self._port), self)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll
            name=f"fake-justimmo-{self._port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread

    def _unbind(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        self._wake.set()
        server.shutdown()
        server.server_close()
        server.cut_connections()
        if thread is not None:
            thread.join(1.0)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        if not self._port:
            raise RuntimeError("not started yet: the port is chosen by start()")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def authorize_url(self) -> str:
        return f"{self.base_url}/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/access_token"

    @property
    def user_url(self) -> str:
        return f"{self.base_url}/oauth/user/current"

    # ------------------------------------------------------------------ seeding

    def issue(
        self,
        client_id: str,
        *,
        user_id: int | None = 1234,
        tenant_id: int | None = 5678,
        with_refresh: bool = True,
    ) -> IssuedTokens:
        """Tokens as if a grant had just been made; ``user_id=None`` is a client-credentials
        token (``cc_ttl``, never a refresh token)."""
        return self.issue_many(
            client_id, 1, user_id_start=user_id, tenant_id=tenant_id, with_refresh=with_refresh
        )[0]

    def issue_many(
        self,
        client_id: str,
        n: int,
        *,
        user_id_start: int | None = 1,
        tenant_id: int | None = 5678,
        with_refresh: bool = True,
    ) -> list[IssuedTokens]:
        """``n`` grants for users ``user_id_start``, ``user_id_start + 1``, ...; fast enough
        to seed 100k grants for a benchmark."""
        if client_id not in self.clients:
            raise KeyError(f"unknown client {client_id!r}")
        users: Sequence[int | None] = (
            [None] * n if user_id_start is None else range(user_id_start, user_id_start + n)
        )
        now = self._now()
        # The cyclic GC rescans the growing token tables over and over while 300k objects
        # are created (~40 % of the time); none of them form cycles, so pause it.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with self._lock:
                return self._mint(client_id, users, tenant_id, now, with_refresh=with_refresh)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _mint(
        self,
        client_id: str,
        user_ids: Sequence[int | None],
        tenant_id: int | None,
        now: datetime,
        *,
        with_refresh: bool,
        chain: int | None = None,
    ) -> list[IssuedTokens]:
        """Create tokens, one grant per user; caller holds ``_lock``. Without ``chain`` each
        grant starts a new chain; a rotation passes the chain it continues. Client-credentials
        tokens (no user) get ``cc_ttl`` and never a refresh token."""
        cc = bool(user_ids) and user_ids[0] is None
        access_exp = now + timedelta(seconds=self.cc_ttl if cc else self.access_ttl)
        expires_in = int((access_exp - now).total_seconds())
        refresh_exp = self.refresh_ttl.after(now) if with_refresh and not cc else None
        out: list[IssuedTokens] = []
        for user_id, blob in zip(user_ids, _random_hex(len(user_ids)), strict=True):
            access = "fjat_" + blob[:40]
            self._access[access] = _Access(client_id, user_id, tenant_id, access_exp)
            refresh: str | None = None
            if refresh_exp is not None:
                refresh = "def50200" + blob[40:]
                link = chain if chain is not None else next(self._chains)
                self._grant_chain[(user_id, client_id)] = link
                self._refresh[refresh] = _Refresh(
                    client_id, user_id, tenant_id, access, link, refresh_exp
                )
                self._chain_head[link] = refresh
            out.append(
                IssuedTokens(
                    access,
                    refresh,
                    expires_in,
                    now,
                    access_exp,
                    refresh_exp,
                    user_id,
                    tenant_id,
                    client_id,
                )
            )
        return out

    # ------------------------------------------------------------------ inspection

    def stats(self, *, request_times: bool = True) -> dict[str, Any]:
        with self._lock:
            c = self._c
            out: dict[str, Any] = {
                "requests": c.requests,
                "token_requests": c.token_requests,
                "connections": c.connections,
                "by_grant": {g: c.by_grant.get(g, 0) for g in (*GRANT_TYPES, "other")},
                "successes": c.successes,
                "errors_by_code": dict(c.errors_by_code),
                "reuse_count": c.reuse_count,
                "rotations": c.rotations,
                "faults_served": c.faults_served,
                "faults_by_kind": dict(c.faults_by_kind),
                "faults_pending": len(self._faults),
                "in_flight": c.in_flight,
                "max_concurrent": c.max_concurrent,
                "latency": self._latency,
                "last_code_challenge": self._last_challenge[0],
                "last_code_challenge_method": self._last_challenge[1],
            }
            if request_times:
                out["request_times"] = list(self._request_times)
            return out

    def reset_stats(self) -> None:
        with self._lock:
            in_flight = self._c.in_flight
            self._c = _Counters(in_flight=in_flight, max_concurrent=in_flight)
            self._request_times.clear()

    def reuse_count(self) -> int:
        with self._lock:
            return self._c.reuse_count

    def access_token_valid(self, token: str) -> bool:
        now = self._now()
        with self._lock:
            rec = self._access.get(token)
            return rec is not None and not rec.revoked and rec.expires_at > now

    def refresh_token_valid(self, token: str) -> bool:
        now = self._now()
        with self._lock:
            rec = self._refresh.get(token)
            return rec is not None and not rec.revoked and rec.expires_at > now

    def current_refresh_token(self, user_id: int | None, client_id: str) -> str | None:
        """The newest refresh token of the latest grant of that user and client, if live."""
        with self._lock:
            chain = self._grant_chain.get((user_id, client_id))
            head = self._chain_head.get(chain) if chain is not None else None
        return head if head is not None and self.refresh_token_valid(head) else None

    # ------------------------------------------------------------------ control

    def expire_refresh_token(self, token: str) -> None:
        now = self._now()
        with self._lock:
            self._refresh_record(token).expires_at = now - timedelta(seconds=1)

    def revoke_refresh_token(self, token: str) -> None:
        """Revoke as an admin would (not a rotation, so a later use is no "reuse")."""
        with self._lock:
            self._refresh_record(token).revoked = True

    def _refresh_record(self, token: str) -> _Refresh:
        try:
            return self._refresh[token]
        except KeyError:
            raise KeyError("unknown refresh token") from None

    def inject(
        self,
        fault: str,
        *,
        count: int | None = None,
        grant_type: str | None = None,
        **params: Any,
    ) -> None:
        """Queue a fault for ``POST /access_token``; ``count=None`` lasts until
        ``clear_faults()``. The first queued fault matching a request's grant type wins."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(FAULTS))}")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1 (or None for unlimited)")
        if fault == "html_500":
            HTTPStatus(int(params.get("status", 503)))  # fail here, not in a handler thread
        with self._lock:
            self._faults.append(_Fault(fault, count, grant_type, dict(params)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency cannot be negative")
        self._latency = seconds

    def deny_authorizations(self, deny: bool = True) -> None:
        self._deny = deny

    def _now(self) -> datetime:
        return self._clock()

    def _take_fault(self, grant_type: str) -> _Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.grant_type not in (None, grant_type):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        del self._faults[i]
                self._c.faults_served += 1
                self._c.faults_by_kind[fault.kind] += 1
                return fault
        return None

    # ------------------------------------------------------------------ errors

    def _error(
        self,
        error: str,
        message: str,
        status: int,
        hint: str | None = None,
        *,
        authorization: str | None = None,
    ) -> _Response:
        extra: tuple[tuple[str, str], ...] = ()
        # 5.x-7.x always challenge on invalid_client; 8.x+ only if the client sent credentials
        # in a header (league 7.1.1 changed it; "7" here stands for the older 7.x releases).
        if error == "invalid_client" and (self.league in ("5", "7") or authorization):
            scheme = "Bearer" if (authorization or "").startswith("Bearer") else "Basic"
            extra = (("WWW-Authenticate", f'{scheme} realm="OAuth"'),)
        payload = self._error_payload(error, message, hint)
        return replace(_json_response(status, payload, extra), error=error)

    def _error_payload(self, error: str, message: str, hint: str | None) -> dict[str, str]:
        payload = {"error": error}
        if self.league in ("8", "9"):
            payload["error_description"] = message
        if self.league != "9":
            payload["message"] = message
        if hint is not None:
            payload["hint"] = hint
        return payload

    def _invalid_request(self, parameter: str, hint: str | None = None) -> _Response:
        return self._error(
            "invalid_request",
            MSG_INVALID_REQUEST,
            400,
            hint or f"Check the `{parameter}` parameter",
        )

    def _invalid_client(self, authorization: str | None) -> _Response:
        return self._error("invalid_client", MSG_INVALID_CLIENT, 401, authorization=authorization)

    def _bad_refresh_token(self, hint: str) -> _Response:
        if self.league == "9":
            return self._error("invalid_grant", MSG_INVALID_REFRESH, 400, hint)
        status = 400 if self.league == "5" else 401
        return self._error("invalid_request", MSG_INVALID_REFRESH, status, hint)

    def _bad_code(self, hint: str) -> _Response:
        # 9.1.0 turned expired/revoked codes into invalid_grant; other code errors stayed.
        if self.league == "9" and hint.startswith(
            ("Authorization code has expired", "Authorization code has been revoked")
        ):
            return self._error("invalid_grant", MSG_INVALID_GRANT, 400, hint)
        return self._invalid_request("code", hint)

    def _success(self, tokens: IssuedTokens) -> _Response:
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": tokens.expires_in,
            "access_token": tokens.access_token,
        }
        if tokens.refresh_token is not None:
            body["refresh_token"] = tokens.refresh_token
        return _json_response(200, body)

    # ------------------------------------------------------------------ endpoints

    def _token_request(self, form: Mapping[str, str], authorization: str | None) -> _Outcome:
        grant = form.get("grant_type", "")
        with self._lock:
            self._c.token_requests += 1
            self._c.by_grant[grant if grant in GRANT_TYPES else "other"] += 1
            if self._request_times.maxlen:
                self._request_times.append(time.monotonic())
        fault = self._take_fault(grant)
        if fault is None:
            outcome = _Outcome(self._process_token(form, authorization))
        else:
            outcome = self._faulty(fault, form, authorization)
        resp = outcome.response
        with self._lock:
            if resp is not None and resp.error:
                self._c.errors_by_code[resp.error] += 1
            elif resp is not None and fault is None:
                self._c.successes += 1
        return outcome

    def _faulty(
        self, fault: _Fault, form: Mapping[str, str], authorization: str | None
    ) -> _Outcome:
        p = fault.params
        seconds = float(p.get("seconds", 30.0))
        match fault.kind:
            case "drop":
                return _Outcome(None)
            case "timeout":
                return _Outcome(None, hang=seconds)
            case "drop_after_rotate":
                self._process_token(form, authorization)
                return _Outcome(None)
            case "timeout_after_rotate":
                self._process_token(form, authorization)
                return _Outcome(None, hang=seconds)
            case "html_500":
                status = int(p.get("status", 503))
                phrase = HTTPStatus(status).phrase
                html = (
                    f"<!DOCTYPE html>\n<html><head><title>{status} {phrase}</title></head>"
                    f"<body><h1>{phrase}</h1><p>nginx</p></body></html>\n"
                )
                html_type = (("Content-Type", "text/html; charset=UTF-8"),)
                return _Outcome(_Response(status, html.encode(), html_type, f"http_{status}"))
            case "json_500":
                return _Outcome(self._error("server_error", MSG_SERVER_ERROR, 500))
            case "rate_limited":
                retry_after = p.get("retry_after", 2)
                headers = (("Retry-After", str(retry_after)),)
                if p.get("empty"):
                    return _Outcome(_Response(429, b"", headers, "http_429"))
                resp = _json_response(429, {"message": "Too Many Requests"}, headers)
                return _Outcome(replace(resp, error="http_429"))
            case "invalid_client":
                return _Outcome(self._invalid_client(authorization))
            case "malformed_json":
                body = b'{"token_type":"Bearer","expires_in":86400,"access_token":"fjat_'
                return _Outcome(_Response(200, body, (("Content-Type", _JSON), *_NO_STORE)))
            case _:  # "empty_200"
                return _Outcome(_Response(200, b"", (("Content-Type", _JSON), *_NO_STORE)))

    def _client_credentials(
        self, form: Mapping[str, str], authorization: str | None
    ) -> tuple[str | None, str | None]:
        """league's getClientCredentials: Basic first, then the body overrides it."""
        user: str | None = None
        password: str | None = None
        if authorization and authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            if ":" in decoded:
                user, password = decoded.split(":", 1)
        return form.get("client_id", user), form.get("client_secret", password)

    def _process_token(self, form: Mapping[str, str], authorization: str | None) -> _Response:
        grant = form.get("grant_type", "")
        if grant not in GRANT_TYPES:
            return self._error(
                "unsupported_grant_type",
                MSG_UNSUPPORTED_GRANT,
                400,
                "Check that all required parameters have been provided",
            )
        client_id, secret = self._client_credentials(form, authorization)
        if client_id is None:
            return self._invalid_request("client_id")
        expected = self.clients.get(client_id)
        if expected is None or secret is None or not secrets.compare_digest(expected, secret):
            return self._invalid_client(authorization)
        if grant == "refresh_token":
            return self._grant_refresh(form, client_id, authorization)
        if grant == "authorization_code":
            return self._grant_code(form, client_id)
        now = self._now()
        with self._lock:
            (tokens,) = self._mint(client_id, [None], None, now, with_refresh=False)
        return self._success(tokens)

    def _grant_refresh(
        self, form: Mapping[str, str], client_id: str, authorization: str | None
    ) -> _Response:
        # league compares redirect_uri with the registered one and answers invalid_client;
        # a refresh has no business sending one, so any value is treated as a mismatch.
        if "redirect_uri" in form:
            return self._invalid_client(authorization)
        token = form.get("refresh_token")
        if not token:
            return self._invalid_request("refresh_token")
        now = self._now()
        hint: str | None = None
        tokens: IssuedTokens | None = None
        # Check and rotate under one lock: unlike league, a token can never be used twice.
        with self._lock:
            rec = self._refresh.get(token)
            if rec is None:
                hint = "Cannot decrypt the refresh token"
            elif rec.client_id != client_id:
                hint = "Token is not linked to client"
            else:
                if rec.rotated:
                    self._c.reuse_count += 1
                if rec.expires_at <= now:
                    hint = "Token has expired"
                elif rec.revoked:
                    hint = "Token has been revoked"
                else:
                    old_access = self._access.get(rec.access_token)
                    if old_access is not None:
                        old_access.revoked = True
                    rec.revoked = rec.rotated = True
                    self._c.rotations += 1
                    (tokens,) = self._mint(
                        client_id,
                        [rec.user_id],
                        rec.tenant_id,
                        now,
                        with_refresh=True,
                        chain=rec.chain,
                    )
        if tokens is None:
            return self._bad_refresh_token(hint or "Cannot decrypt the refresh token")
        return self._success(tokens)

    def _grant_code(self, form: Mapping[str, str], client_id: str) -> _Response:
        code = form.get("code")
        if not code:
            return self._invalid_request("code")
        now = self._now()
        hint: str | None = None
        tokens: IssuedTokens | None = None
        with self._lock:
            rec = self._codes.get(code)
            if rec is None:
                hint = "Cannot decrypt the authorization code"
            elif rec.expires_at <= now:
                hint = "Authorization code has expired"
            elif rec.used:
                hint = "Authorization code has been revoked"
            elif rec.client_id != client_id:
                hint = "Authorization code was not issued to this client"
            elif "redirect_uri" not in form:
                hint = "Check the `redirect_uri` parameter"
            elif form["redirect_uri"] != rec.redirect_uri:
                hint = "Invalid redirect URI"
            elif (refused := self._check_verifier(rec, form.get("code_verifier"))) is not None:
                # league leaves the code usable after a PKCE failure (revoked on success)
                return refused
            else:
                rec.used = True
                (tokens,) = self._mint(
                    client_id, [rec.user_id], rec.tenant_id, now, with_refresh=True
                )
        if tokens is None:
            return self._bad_code(hint or "Cannot decrypt the authorization code")
        return self._success(tokens)

    def _check_verifier(self, rec: _Code, verifier: str | None) -> _Response | None:
        """league's PKCE check of the code exchange; only when the authorize request had
        a ``code_challenge``; a verifier without one is ignored here (tokend sends both)."""
        if rec.code_challenge is None:
            return None
        if verifier is None:
            return self._invalid_request("code_verifier")
        if PKCE_FORMAT.fullmatch(verifier) is None:
            return self._invalid_request(
                "code_verifier", "Code Verifier must follow the specifications of RFC-7636."
            )
        if rec.code_challenge_method == "S256":
            digest = hashlib.sha256(verifier.encode("ascii")).digest()
            expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        else:
            expected = verifier
        if not hmac.compare_digest(expected, rec.code_challenge):
            return self._error(
                "invalid_grant", MSG_INVALID_GRANT, 400, "Failed to verify `code_verifier`."
            )
        return None

    def _authorize(self, query: Mapping[str, str], *, submitted: bool = False) -> _Response:
        """The authorize endpoint.

        With ``consent_page`` on, a GET shows a page where a person chooses the user and
        approves or denies (a POST of that form, ``submitted``). Otherwise, or when the
        query names a ``user_id`` (scripted callers), consent is given (or refused) at
        once, as the first or the chosen user.
        """
        if query.get("response_type") != "code" or "client_id" not in query:
            return self._error(
                "unsupported_grant_type",
                MSG_UNSUPPORTED_GRANT,
                400,
                "Check that all required parameters have been provided",
            )
        redirect_uri = query.get("redirect_uri")
        if query["client_id"] not in self.clients or not redirect_uri:
            return self._invalid_client(None)
        challenge = query.get("code_challenge")
        method = query.get("code_challenge_method", "plain")  # league's default, RFC 7636 4.3
        if challenge is not None:
            if method not in PKCE_METHODS:
                return self._invalid_request(
                    "code_challenge_method",
                    "Code challenge method must be one of "
                    + ", ".join(f"`{m}`" for m in PKCE_METHODS),
                )
            if PKCE_FORMAT.fullmatch(challenge) is None:
                return self._invalid_request(
                    "code_challenge", "Code challenge must follow the specifications of RFC-7636."
                )
        if self.consent_page and not submitted and "user_id" not in query:
            return self._consent_page(query)
        user_id = next(iter(self.users))
        if "user_id" in query:
            try:
                user_id = int(query["user_id"])
            except ValueError:
                user_id = -1
            if user_id not in self.users:
                return self._invalid_request("user_id", "Unknown user")
        params: dict[str, str]
        if self._deny or (submitted and query.get("decision") != "approve"):
            params = self._error_payload(
                "access_denied", MSG_ACCESS_DENIED, "The user denied the request"
            )
        else:
            code = "def50200" + secrets.token_hex(160)
            expires = self._now() + timedelta(seconds=self.code_ttl)
            with self._lock:
                self._codes[code] = _Code(
                    query["client_id"], redirect_uri, user_id, self.users[user_id], expires,
                    challenge, method,
                )
                self._last_challenge = (challenge, method if challenge is not None else None)
            params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        sep = "&" if "?" in redirect_uri else "?"
        return _Response(302, b"", (("Location", redirect_uri + sep + urlencode(params)),))

    def _consent_page(self, query: Mapping[str, str]) -> _Response:
        keep = ("response_type", "client_id", "redirect_uri", "state", "scope",
                "code_challenge", "code_challenge_method")
        hidden = "".join(
            f'<input type="hidden" name="{k}" value="{html.escape(query[k])}">'
            for k in keep if k in query
        )
        options = "".join(
            f'<option value="{uid}">User {uid} (tenant {tid})</option>'
            for uid, tid in self.users.items()
        )
        page = (
            '<!doctype html><html><head><meta charset="utf-8"><title>Fake Justimmo: '
            "authorize</title></head><body><h1>Authorize application</h1>"
            f"<p>The application <b>{html.escape(query['client_id'])}</b> asks for access "
            "to your account.</p>"
            f'<form method="post" action="/authorize">{hidden}'
            f'<label>Sign in as <select name="user_id" id="user">{options}</select></label>'
            '<p><button type="submit" name="decision" value="approve" id="approve">Approve'
            '</button> <button type="submit" name="decision" value="deny" id="deny">Deny'
            "</button></p></form></body></html>"
        )
        return _Response(200, page.encode(), (("Content-Type", "text/html; charset=UTF-8"),))

    def _user_current(self, authorization: str | None) -> _Response:
        if not authorization or not authorization.startswith("Bearer "):
            return self._access_denied(401, 'Missing "Authorization" header')
        now = self._now()
        with self._lock:
            rec = self._access.get(authorization[7:].strip())
        # league's ResourceServer hints; all are 401 access_denied.
        if rec is None:
            return self._access_denied(401, "Access token could not be verified")
        if rec.revoked:
            return self._access_denied(401, "Access token has been revoked")
        if rec.expires_at <= now:
            return self._access_denied(401, "Access token is invalid")
        if rec.user_id is None:
            return self._access_denied(403, "Access token has no user (client credentials)")
        return _json_response(200, {"id": rec.user_id, "tenant": {"id": rec.tenant_id}})

    def _access_denied(self, status: int, hint: str) -> _Response:
        return self._error("access_denied", MSG_ACCESS_DENIED, status, hint)

    # ------------------------------------------------------------------ HTTP control

    def _control(self, method: str, path: str, payload: Any) -> _Response:
        """``/_fake/*``: the in-process API for a fake running in another process."""
        try:
            if method == "GET" and path == "/_fake/stats":
                return _json_response(200, self.stats())
            if method != "POST":
                return _json_response(405, {"error": "method_not_allowed"})
            args = payload if isinstance(payload, dict) else {}
            if path == "/_fake/issue":
                issued = self.issue_many(
                    str(args["client_id"]),
                    int(args.get("n", 1)),
                    user_id_start=args.get("user_id_start", 1),
                    tenant_id=args.get("tenant_id", 5678),
                    with_refresh=bool(args.get("with_refresh", True)),
                )
                return _json_response(200, [t.to_json() for t in issued])
            if path == "/_fake/faults":
                self.inject(
                    str(args["fault"]),
                    count=args.get("count"),
                    grant_type=args.get("grant_type"),
                    **(args.get("params") or {}),
                )
            elif path == "/_fake/clear":
                self.clear_faults()
            elif path == "/_fake/latency":
                self.set_latency(float(args["seconds"]))
            elif path == "/_fake/reset_stats":
                self.reset_stats()
            elif path == "/_fake/consent_page":
                self.consent_page = bool(args.get("on", True))
            elif path == "/_fake/deny":
                self.deny_authorizations(bool(args.get("deny", True)))
            elif path == "/_fake/expire":
                self.expire_refresh_token(str(args["refresh_token"]))
            elif path == "/_fake/revoke":
                self.revoke_refresh_token(str(args["refresh_token"]))
            else:
                return _json_response(404, {"error": "not_found"})
            return _json_response(200, {"ok": True})
        except (KeyError, ValueError, TypeError) as exc:
            return _json_response(400, {"error": "bad_request", "message": str(exc)})

    # ------------------------------------------------------------------ called by handlers

    def _enter(self) -> None:
        with self._lock:
            self._c.requests += 1
            self._c.in_flight += 1
            self._c.max_concurrent = max(self._c.max_concurrent, self._c.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._c.in_flight -= 1

    def _connected(self) -> None:
        with self._lock:
            self._c.connections += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for hanging handlers
    allow_reuse_address = True  # resume() rebinds the port while old sockets are in TIME_WAIT
    request_queue_size = 128  # 16-50 clients connecting at once must not overflow the backlog

    def __init__(self, address: tuple[str, int], fake: FakeJustimmo) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.fake = fake
        self.wake = fake._wake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._cut = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conns_lock:
            if not alive:
                self._conns.discard(conn)
            elif not self._cut:
                self._conns.add(conn)
                return
        if alive:  # accepted just before cut_connections(): a paused server serves nothing
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def cut_connections(self) -> None:
        with self._conns_lock:
            self._cut = True
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (and our own cut_connections) are normal here, not tracebacks.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "FakeJustimmo/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms stalls
    timeout = 120  # idle keep-alive connections eventually free their thread

    @property
    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        self._srv.track(self.connection, True)
        self._srv.fake._connected()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._srv.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # benchmarks make thousands of requests; stderr is not the place for them

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        # Always drain the body, even for requests we refuse, or keep-alive framing breaks.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        fake = self._srv.fake
        if url.path.startswith("/_fake/"):
            try:
                payload = json.loads(body) if body else {}
            except ValueError:
                payload = None
            self._send(fake._control(self.command, url.path, payload))
            return
        fake._enter()
        try:
            if fake._latency > 0:
                time.sleep(fake._latency)
            self._provider(fake, url.path, url.query, body)
        finally:
            fake._leave()

    def _provider(self, fake: FakeJustimmo, path: str, query: str, body: bytes) -> None:
        auth = self.headers.get("Authorization")
        if path == "/access_token":
            if self.command != "POST":
                self._send(
                    _json_response(405, {"error": "method_not_allowed"}, (("Allow", "POST"),))
                )
                return
            form = _first_values(body.decode("utf-8", "replace"))
            outcome = fake._token_request(form, auth)
            if outcome.hang > 0:
                self._srv.wake.wait(outcome.hang)
            if outcome.response is None:
                self._hang_up()
            else:
                self._send(outcome.response)
        elif path == "/authorize" and self.command == "GET":
            self._send(fake._authorize(_first_values(query)))
        elif path == "/authorize" and self.command == "POST":
            form = _first_values(body.decode("utf-8", "replace"))
            self._send(fake._authorize(form, submitted=True))
        elif path == "/oauth/user/current" and self.command == "GET":
            self._send(fake._user_current(auth))
        else:
            self._send(_json_response(404, {"error": "not_found"}))

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, resp: _Response) -> None:
        self.send_response(resp.status)
        for name, value in resp.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body:
            self.wfile.write(resp.body)


def _random_hex(n: int) -> Iterator[str]:
    """``n`` random hex strings of 40 + 2 * _REFRESH_HEX_BYTES chars (access + refresh part).

    One urandom call per block of tokens: a call per token dominated ``issue_many``.
    """
    width = 20 + _REFRESH_HEX_BYTES
    for start in range(0, n, 1024):
        k = min(1024, n - start)
        blob = os.urandom(k * width).hex()
        for i in range(k):
            yield blob[2 * width * i : 2 * width * (i + 1)]


def _first_values(encoded: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(encoded, keep_blank_values=True).items()}


# ---------------------------------------------------------------------- CLI


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return parse_timedelta(text).total_seconds()


def _duration(text: str) -> Duration:
    try:
        return Duration.of(timedelta(seconds=float(text)))
    except ValueError:
        return Duration.parse(text)


def _pair(text: str) -> tuple[str, str]:
    left, sep, right = text.partition(":")
    if not sep or not left:
        raise argparse.ArgumentTypeError(f"expected A:B, got {text!r}")
    return left, right


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokend.fake_provider",
        description="Run a fake Justimmo OAuth server until SIGTERM/SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--access-ttl", type=_seconds, default=86400.0, help="e.g. 30, 15m")
    parser.add_argument(
        "--refresh-ttl",
        type=_duration,
        default=Duration(months=1),
        help="e.g. 3m (minutes), P1M (a calendar month)",
    )
    parser.add_argument("--code-ttl", type=_seconds, default=60.0)
    parser.add_argument("--cc-ttl", type=_seconds, default=86400.0)
    parser.add_argument("--league", choices=["5", "7", "8", "9"], default="5")
    parser.add_argument(
        "--client",
        type=_pair,
        action="append",
        metavar="ID:SECRET",
        help="repeatable; default demo-client:demo-secret",
    )
    parser.add_argument(
        "--user",
        type=_pair,
        action="append",
        metavar="USER:TENANT",
        help="repeatable; default 1234:5678",
    )
    parser.add_argument(
        "--consent-page",
        action="store_true",
        help="show an authorize page (choose user, approve or deny) instead of redirecting",
    )
    args = parser.parse_args(argv)
    try:
        users = {int(u): int(t) for u, t in args.user} if args.user else None
    except ValueError:
        parser.error("--user takes integer ids, e.g. 1234:5678")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake = FakeJustimmo(
        clients=dict(args.client) if args.client else None,
        access_ttl=args.access_ttl,
        refresh_ttl=args.refresh_ttl,
        code_ttl=args.code_ttl,
        cc_ttl=args.cc_ttl,
        league=args.league,
        latency=args.latency,
        host=args.host,
        port=args.port,
        users=users,
        consent_page=args.consent_page,
    ).start()
    print(f"listening on {fake.base_url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
