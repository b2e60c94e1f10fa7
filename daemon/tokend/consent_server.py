"""The re-consent web endpoint (``[consent] listen``): link page, provider redirect, callback.

``ConsentFlow`` decides what each request gets (a :class:`~tokend.consent_pages.Page`);
``ConsentServer`` is the HTTP listener around it (:mod:`tokend.listener`): at most
``max_connections`` at once (more are answered 503 at once), a connection idle for
``idle_timeout`` or older than ``max_lifetime`` is dropped, so a browser's pre-connect
or a slow client never blocks a redirect.

Flow: ``GET /consent/<token>`` shows the page; its button POSTs to the same URL, which
stores a fresh ``state`` in the database and redirects to the provider; the provider
redirects to ``{public_url}/callback``, which consumes the state, exchanges the code at
once (it lives one minute), checks the user and stores the tokens in the linked grant.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from . import consent, consent_pages, events, logs, pkce, policy
from .config import ClientConfig, Config
from .consent_pages import Page
from .consent_store import ConsentStore, Pending, WrongUser
from .errors import GrantNotFound, ProviderError, StoreError
from .listener import BoundedHTTPServer, Served
from .model import Grant, GrantType, NewGrant, Status
from .provider import ProviderClient
from .store import Store

log = logs.get("tokend.consent")
STATE_TTL = timedelta(minutes=15)  # from the button to the provider's redirect
BODY_MAX = 4096

_PAGES = {
    consent.Refusal.MALFORMED: consent_pages.invalid,
    consent.Refusal.SIGNATURE: consent_pages.invalid,
    consent.Refusal.EXPIRED: consent_pages.expired,
    consent.Refusal.USED: consent_pages.used,
    consent.Refusal.UNKNOWN: consent_pages.unavailable,
    consent.Refusal.UNAVAILABLE: consent_pages.unavailable,
}


class ConsentFlow:
    def __init__(self, config: Config, store: Store, provider: ProviderClient) -> None:
        if config.consent.link_key is None or not config.consent.public_url:
            raise ValueError("the consent endpoint needs consent.public_url and link_key")
        self.config = config
        self.key = config.consent.link_key.value
        self.store = store
        self.states = ConsentStore(store)
        self.provider = provider
        self.prefix = urlsplit(config.consent.public_url).path.rstrip("/")
        self.headers = consent_pages.security_headers(config.provider.authorize_url)

    def handle(self, method: str, target: str) -> Page:
        parts = urlsplit(target)
        path = parts.path
        if self.prefix and path.startswith(self.prefix + "/"):
            path = path[len(self.prefix):]  # the proxy may pass the prefix on, or not
        try:
            if path.startswith("/consent/") and path.count("/") == 2:
                token = path.removeprefix("/consent/")
                if method == "GET":
                    return self.link_page(token)
                if method == "POST":
                    return self.begin(token)
                return consent_pages.not_allowed()
            if path == "/callback":
                if method != "GET":
                    return consent_pages.not_allowed()
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                return self.callback(query)
        except StoreError as exc:
            log.error("consent_store_unavailable", error=str(exc))
            return consent_pages.failed()
        return consent_pages.not_found()

    # ------------------------------------------------------------------ the link

    def _check(self, token: str) -> tuple[consent.Link, Grant, ClientConfig]:
        link = consent.verify(self.key, token, self.store.clock())
        try:
            grant = self.store.get(link.grant_id)
        except GrantNotFound:
            raise consent.LinkRefused(consent.Refusal.UNKNOWN) from None
        consent.check_grant(link, grant)
        client = self.config.clients.get(grant.client)
        if client is None:
            raise consent.LinkRefused(consent.Refusal.UNAVAILABLE)
        return link, grant, client

    def link_page(self, token: str) -> Page:
        try:
            _link, grant, client = self._check(token)
        except consent.LinkRefused as exc:
            log.info("consent_link_refused", reason=exc.reason.value)
            return _PAGES[exc.reason]()
        log.info("consent_link_opened", grant_id=grant.id, client=client.name)
        return consent_pages.start(client.name)

    def begin(self, token: str) -> Page:
        try:
            link, grant, client = self._check(token)
        except consent.LinkRefused as exc:
            log.info("consent_link_refused", reason=exc.reason.value)
            return _PAGES[exc.reason]()
        state = secrets.token_urlsafe(32)
        redirect = self.config.consent.redirect_uri
        proof = pkce.new_pair()
        self.states.begin(state, link, redirect, STATE_TTL, proof.verifier)
        log.info("consent_started", grant_id=grant.id, client=client.name)
        return consent_pages.redirect(
            self.provider.authorize_url(client, redirect, state, proof.challenge))

    # ------------------------------------------------------------------ the callback

    def callback(self, query: dict[str, str]) -> Page:
        state = query.get("state")
        pending = self.states.take(state) if state else None
        if pending is None:
            log.info("consent_callback_refused", reason="state")
            return consent_pages.session_expired()
        if "error" in query:
            log.info("consent_denied", grant_id=pending.grant_id, error=query["error"][:64])
            return consent_pages.denied()
        code = query.get("code")
        if not code:
            return consent_pages.session_expired()
        try:
            grant = self.store.get(pending.grant_id)
        except GrantNotFound:
            return consent_pages.unavailable()
        client = self.config.clients.get(grant.client)
        if client is None or grant.grant_type != GrantType.AUTHORIZATION_CODE:
            return consent_pages.unavailable()
        return self._complete(pending, grant, client, code)

    def _complete(self, pending: Pending, grant: Grant, client: ClientConfig,
                  code: str) -> Page:
        try:
            resp = self.provider.exchange_code(client, code, pending.redirect_uri,
                                               pending.code_verifier)
            user_id, tenant_id = self.provider.current_user(resp.access_token)
        except ProviderError as exc:
            log.warning("consent_exchange_failed", grant_id=grant.id, client=client.name,
                        error=exc.error, http_status=exc.status)
            return consent_pages.failed()
        if user_id != grant.user_id:
            log.warning("consent_wrong_user", grant_id=grant.id, client=client.name)
            return consent_pages.wrong_user()
        ttl = self.config.provider.refresh_token_ttl
        new = NewGrant(
            client=client.name, grant_type=GrantType.AUTHORIZATION_CODE.value,
            access_token=resp.access_token, access_expires_at=resp.access_expires_at,
            obtained_at=resp.sent_at, refresh_token=resp.refresh_token,
            refresh_expires_at=ttl.after(resp.sent_at) if resp.refresh_token else None,
            user_id=user_id, tenant_id=tenant_id, consented_at=resp.sent_at,
        )
        now = self.store.clock()

        def event(stored: Grant, previous: Status) -> dict[str, Any] | None:
            return events.on_consent(stored, previous, now)

        try:
            previous = self.states.store_consent(
                pending, new, lambda g: policy.initial(g, now, self.config.schedule), event)
        except WrongUser:
            log.warning("consent_wrong_user", grant_id=grant.id, client=client.name)
            return consent_pages.wrong_user()
        except consent.LinkRefused as exc:
            log.info("consent_store_refused", grant_id=grant.id, reason=exc.reason.value)
            return _PAGES[exc.reason]()
        log.info("consent_stored", grant_id=grant.id, client=client.name,
                 previous=previous.value, via="link")
        return consent_pages.done(client.name)


# --------------------------------------------------------------------------- the listener


def _answer_busy(headers: list[tuple[str, str]]) -> Callable[[socket.socket], None]:
    page = consent_pages.busy()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
           f"Content-Length: {len(page.html)}\r\nConnection: close\r\n{head}\r\n").encode()

    def answer(conn: socket.socket) -> None:
        conn.sendall(raw + page.html)

    return answer


class _Server(BoundedHTTPServer):
    flow: ConsentFlow


class _Handler(BaseHTTPRequestHandler):
    server_version = "tokend"
    sys_version = ""

    @property
    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self._srv.idle_timeout)  # each read waits at most this

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= BODY_MAX:
            self.rfile.read(length)  # the form's body carries nothing we need
        elif length > BODY_MAX:
            self.close_connection = True
        self._serve()

    def do_HEAD(self) -> None:
        self._send(consent_pages.not_allowed())

    def do_PUT(self) -> None:
        self._send(consent_pages.not_allowed())

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def _serve(self) -> None:
        try:
            page = self._srv.flow.handle(self.command, self.path)
        except Exception as exc:  # the error boundary: a page, never a traceback
            log.error("consent_request_crashed", error=type(exc).__name__)
            page = consent_pages.failed()
        self._send(page)

    def _send(self, page: Page) -> None:
        self.send_response(page.status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page.html)))
        if page.location:
            self.send_header("Location", page.location)
        for name, value in self._srv.flow.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(page.html)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # our own log lines say what happened, without the link tokens


class ConsentServer(Served):
    def __init__(self, config: Config, store: Store, provider: ProviderClient, *,
                 address: tuple[str, int] | None = None, max_connections: int = 32,
                 idle_timeout: float = 10.0, max_lifetime: float = 60.0) -> None:
        address = address or config.consent.address
        if address is None:
            raise ValueError("consent.listen is not set")
        self.flow = ConsentFlow(config, store, provider)
        # A worker per connection, as many as may be open: a slow provider exchange
        # never makes another browser wait. When full, a 503 page rather than dropping
        # an idle connection (a browser's pre-connect may be the next request).
        server = _Server(address, _Handler, name="tokend-consent-http",
                         workers=max_connections, max_connections=max_connections,
                         idle_timeout=idle_timeout, request_timeout=max_lifetime,
                         max_lifetime=max_lifetime, when_full=_answer_busy(self.flow.headers))
        server.flow = self.flow
        super().__init__(server, "tokend-consent", poll_interval=0.5)
