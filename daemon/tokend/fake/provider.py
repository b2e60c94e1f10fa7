"""The fake provider: token state (rotation without grace, reuse counting, chains),
the endpoints of league's authorization server, and its lifecycle on a real local port.

One concern that needs more than ~400 lines: every endpoint reads and changes the same
token tables under one lock, and splitting them would spread that lock over modules.
"""

from __future__ import annotations

import base64
import binascii
import gc
import hashlib
import hmac
import html
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import count
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from tokend.durations import Duration
from tokend.fake import answers, control, faults
from tokend.fake.faults import Fault
from tokend.fake.league import (
    GRANT_TYPES,
    MSG_ACCESS_DENIED,
    MSG_INVALID_GRANT,
    MSG_SERVER_ERROR,
    MSG_UNSUPPORTED_GRANT,
    ONE_MONTH,
    PKCE_FORMAT,
    PKCE_METHODS,
    Access,
    Code,
    Counters,
    IssuedTokens,
    League,
    Outcome,
    Refresh,
    Response,
    json_response,
    random_hex,
)
from tokend.fake.server import Server


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
        self._access: dict[str, Access] = {}
        self._refresh: dict[str, Refresh] = {}
        self._codes: dict[str, Code] = {}
        self._chains = count(1)
        self._chain_head: dict[int, str] = {}
        self._grant_chain: dict[tuple[int | None, str], int] = {}
        self._faults: list[Fault] = []
        self._deny = False
        # (code_challenge, code_challenge_method) of the last code issued; tests read it.
        self._last_challenge: tuple[str | None, str | None] = (None, None)
        # A real authorize page (choose user, approve or deny) instead of an instant redirect.
        self.consent_page = consent_page
        self._c = Counters()
        self._request_times: deque[float] = deque(maxlen=max(request_times_limit, 0))

        self._life = threading.Lock()  # serialises start/stop/pause/resume
        self._server: Server | None = None
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
        server = Server((self._host, self._port), self)
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
        for user_id, blob in zip(user_ids, random_hex(len(user_ids)), strict=True):
            access = "fjat_" + blob[:40]
            self._access[access] = Access(client_id, user_id, tenant_id, access_exp)
            refresh: str | None = None
            if refresh_exp is not None:
                refresh = "def50200" + blob[40:]
                link = chain if chain is not None else next(self._chains)
                self._grant_chain[(user_id, client_id)] = link
                self._refresh[refresh] = Refresh(
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
            if request_times:  # arrival moments, in time order (answers may overtake)
                out["request_times"] = sorted(self._request_times)
            return out

    def reset_stats(self) -> None:
        with self._lock:
            in_flight = self._c.in_flight
            self._c = Counters(in_flight=in_flight, max_concurrent=in_flight)
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

    def _refresh_record(self, token: str) -> Refresh:
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
        faults.check(fault, count, params)
        with self._lock:
            self._faults.append(Fault(fault, count, grant_type, dict(params)))

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

    def _take_fault(self, grant_type: str) -> Fault | None:
        with self._lock:
            fault = faults.take(self._faults, grant_type)
            if fault is not None:
                self._c.faults_served += 1
                self._c.faults_by_kind[fault.kind] += 1
            return fault

    # ------------------------------------------------------------------ endpoints

    def _token_request(self, form: Mapping[str, str], authorization: str | None, *,
                       arrived: float | None = None) -> Outcome:
        """``arrived``: the monotonic moment the request arrived (before any latency),
        the moment ``request_times`` keeps; now if not given."""
        grant = form.get("grant_type", "")
        with self._lock:
            self._c.token_requests += 1
            self._c.by_grant[grant if grant in GRANT_TYPES else "other"] += 1
            if self._request_times.maxlen:
                self._request_times.append(time.monotonic() if arrived is None else arrived)
        fault = self._take_fault(grant)
        if fault is None:
            outcome = Outcome(self._process_token(form, authorization))
        else:
            outcome = self._faulty(fault, form, authorization)
        resp = outcome.response
        with self._lock:
            if resp is not None and resp.error:
                self._c.errors_by_code[resp.error] += 1
            elif resp is not None and fault is None:
                self._c.successes += 1
        return outcome

    def _faulty(self, fault: Fault, form: Mapping[str, str], authorization: str | None) -> Outcome:
        return faults.outcome(
            fault,
            process=lambda: self._process_token(form, authorization),
            server_error=lambda: answers.error(self.league, "server_error", MSG_SERVER_ERROR, 500),
            invalid_client=lambda: answers.invalid_client(self.league, authorization),
        )

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

    def _process_token(self, form: Mapping[str, str], authorization: str | None) -> Response:
        grant = form.get("grant_type", "")
        if grant not in GRANT_TYPES:
            return answers.error(self.league,
                "unsupported_grant_type",
                MSG_UNSUPPORTED_GRANT,
                400,
                "Check that all required parameters have been provided",
            )
        client_id, secret = self._client_credentials(form, authorization)
        if client_id is None:
            return answers.invalid_request(self.league, "client_id")
        expected = self.clients.get(client_id)
        if expected is None or secret is None or not secrets.compare_digest(expected, secret):
            return answers.invalid_client(self.league, authorization)
        if grant == "refresh_token":
            return self._grant_refresh(form, client_id, authorization)
        if grant == "authorization_code":
            return self._grant_code(form, client_id)
        now = self._now()
        with self._lock:
            (tokens,) = self._mint(client_id, [None], None, now, with_refresh=False)
        return answers.success(tokens)

    def _grant_refresh(
        self, form: Mapping[str, str], client_id: str, authorization: str | None
    ) -> Response:
        # league compares redirect_uri with the registered one and answers invalid_client;
        # a refresh has no business sending one, so any value is treated as a mismatch.
        if "redirect_uri" in form:
            return answers.invalid_client(self.league, authorization)
        token = form.get("refresh_token")
        if not token:
            return answers.invalid_request(self.league, "refresh_token")
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
            hint = hint or "Cannot decrypt the refresh token"
            return answers.bad_refresh_token(self.league, hint)
        return answers.success(tokens)

    def _grant_code(self, form: Mapping[str, str], client_id: str) -> Response:
        code = form.get("code")
        if not code:
            return answers.invalid_request(self.league, "code")
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
            return answers.bad_code(self.league, hint or "Cannot decrypt the authorization code")
        return answers.success(tokens)

    def _check_verifier(self, rec: Code, verifier: str | None) -> Response | None:
        """league's PKCE check of the code exchange; only when the authorize request had
        a ``code_challenge``; a verifier without one is ignored here (tokend sends both)."""
        if rec.code_challenge is None:
            return None
        if verifier is None:
            return answers.invalid_request(self.league, "code_verifier")
        if PKCE_FORMAT.fullmatch(verifier) is None:
            return answers.invalid_request(self.league,
                "code_verifier", "Code Verifier must follow the specifications of RFC-7636."
            )
        if rec.code_challenge_method == "S256":
            digest = hashlib.sha256(verifier.encode("ascii")).digest()
            expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        else:
            expected = verifier
        if not hmac.compare_digest(expected, rec.code_challenge):
            return answers.error(self.league,
                "invalid_grant", MSG_INVALID_GRANT, 400, "Failed to verify `code_verifier`."
            )
        return None

    def _authorize(self, query: Mapping[str, str], *, submitted: bool = False) -> Response:
        """The authorize endpoint.

        With ``consent_page`` on, a GET shows a page where a person chooses the user and
        approves or denies (a POST of that form, ``submitted``). Otherwise, or when the
        query names a ``user_id`` (scripted callers), consent is given (or refused) at
        once, as the first or the chosen user.
        """
        if query.get("response_type") != "code" or "client_id" not in query:
            return answers.error(self.league,
                "unsupported_grant_type",
                MSG_UNSUPPORTED_GRANT,
                400,
                "Check that all required parameters have been provided",
            )
        redirect_uri = query.get("redirect_uri")
        if query["client_id"] not in self.clients or not redirect_uri:
            return answers.invalid_client(self.league, None)
        challenge = query.get("code_challenge")
        method = query.get("code_challenge_method", "plain")  # league's default, RFC 7636 4.3
        if challenge is not None:
            if method not in PKCE_METHODS:
                return answers.invalid_request(self.league,
                    "code_challenge_method",
                    "Code challenge method must be one of "
                    + ", ".join(f"`{m}`" for m in PKCE_METHODS),
                )
            if PKCE_FORMAT.fullmatch(challenge) is None:
                return answers.invalid_request(self.league,
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
                return answers.invalid_request(self.league, "user_id", "Unknown user")
        params: dict[str, str]
        if self._deny or (submitted and query.get("decision") != "approve"):
            params = answers.error_payload(self.league,
                "access_denied", MSG_ACCESS_DENIED, "The user denied the request"
            )
        else:
            code = "def50200" + secrets.token_hex(160)
            expires = self._now() + timedelta(seconds=self.code_ttl)
            with self._lock:
                self._codes[code] = Code(
                    query["client_id"], redirect_uri, user_id, self.users[user_id], expires,
                    challenge, method,
                )
                self._last_challenge = (challenge, method if challenge is not None else None)
            params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        sep = "&" if "?" in redirect_uri else "?"
        return Response(302, b"", (("Location", redirect_uri + sep + urlencode(params)),))

    def _consent_page(self, query: Mapping[str, str]) -> Response:
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
        return Response(200, page.encode(), (("Content-Type", "text/html; charset=UTF-8"),))

    def _user_current(self, authorization: str | None) -> Response:
        if not authorization or not authorization.startswith("Bearer "):
            return answers.access_denied(self.league, 401, 'Missing "Authorization" header')
        now = self._now()
        with self._lock:
            rec = self._access.get(authorization[7:].strip())
        # league's ResourceServer hints; all are 401 access_denied.
        if rec is None:
            return answers.access_denied(self.league, 401, "Access token could not be verified")
        if rec.revoked:
            return answers.access_denied(self.league, 401, "Access token has been revoked")
        if rec.expires_at <= now:
            return answers.access_denied(self.league, 401, "Access token is invalid")
        if rec.user_id is None:
            hint = "Access token has no user (client credentials)"
            return answers.access_denied(self.league, 403, hint)
        return json_response(200, {"id": rec.user_id, "tenant": {"id": rec.tenant_id}})

    # ------------------------------------------------------------------ HTTP control

    def _control(self, method: str, path: str, payload: Any) -> Response:
        """``/_fake/*``: the in-process API for a fake running in another process."""
        return control.handle(self, method, path, payload)

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

