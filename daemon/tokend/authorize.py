"""``tokend authorize``: the authorization-code flow a person runs to (re-)consent.

Prints the authorize URL (with a PKCE S256 challenge) on a line of its own on stdout,
receives the redirect on a local listener, checks ``state``, exchanges the code at once
with the PKCE verifier (league codes live one minute), looks up the user and tenant,
and stores the grant, replacing that user's grant of the client. Progress and errors
go to stderr; nothing is stored on failure.

The exchange and the look-up are requests to the provider: each takes a slot of
``provider.rate_limit`` (:func:`tokend.sharedlimit.limiter_for`; on PostgreSQL the budget
all replicas share), as the consent endpoint's do.
"""

from __future__ import annotations

import secrets
import sys
import threading
import webbrowser
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from . import events, logs, pkce, policy
from .config import ClientConfig, Config, split_host_port
from .errors import ConfigError, ProviderError, TokendError, UsageError
from .listener import BoundedHTTPServer, Served
from .model import Grant, GrantType, NewGrant, Status
from .provider import Admission, ProviderClient
from .sharedlimit import limiter_for
from .store import Store, open_store

log = logs.get("tokend.authorize")
# Seconds a request to the provider waits for its slot of provider.rate_limit before the
# flow gives up: a slot is normally a few intervals away; longer means the database that
# shares the budget stopped answering after the consent (the code lives one minute).
SLOT_WAIT = 30.0

_PAGE = """<!doctype html><meta charset="utf-8"><title>tokend</title>
<body style="font-family:sans-serif;margin:3em"><h1>{title}</h1><p>{text}</p></body>"""


class AuthorizationFailed(TokendError):
    pass


class _SlotWithin:
    """A limiter whose slot not had within ``seconds`` ends the flow (nothing is sent),
    instead of a wait without end in which the person at the terminal sees nothing."""

    def __init__(self, limiter: Admission, seconds: float) -> None:
        self.limiter = limiter
        self.seconds = seconds

    def acquire(self, stop: threading.Event | None = None) -> bool:
        gave_up = threading.Event()
        timer = threading.Timer(self.seconds, gave_up.set)
        timer.daemon = True
        timer.start()
        try:
            if self.limiter.acquire(gave_up):
                return True
        finally:
            timer.cancel()
        raise AuthorizationFailed(
            f"no slot of provider.rate_limit within {self.seconds:g}s (on PostgreSQL the "
            "database that shares it does not answer); nothing sent, nothing stored")


class _Callback:
    def __init__(self, path: str) -> None:
        self.path = path
        self.params: dict[str, str] | None = None
        self.received = threading.Event()  # set once the answer page is written
        self._lock = threading.Lock()

    def take(self, params: dict[str, str]) -> bool:
        """Keep the first redirect only (requests are served concurrently)."""
        with self._lock:
            if self.params is not None:
                return False
            self.params = params
            return True


def _listener(address: tuple[str, int], callback: _Callback) -> BoundedHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            params = {k: v[0] for k, v in query.items()}
            if parts.path != callback.path or not callback.take(params):
                self._page(404, "Not found", "This is tokend's consent listener.")
                return
            ok = "code" in params and "error" not in params
            try:
                self._page(200 if ok else 400,
                           "Authorization received" if ok else "Authorization not granted",
                           "You can close this window and return to the terminal.")
            finally:  # a browser gone meanwhile: the code is still there to exchange
                callback.received.set()

        def _page(self, code: int, title: str, text: str) -> None:
            body = _PAGE.format(title=title, text=text).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    # An idle connection (a browser's pre-connect, a scanner) must not block the
    # redirect: each request is served on its own, in bounded time.
    return BoundedHTTPServer(address, Handler, name="tokend-authorize-http",
                             max_connections=16, workers=2)


def authorize(config: Config, *, client: str, listen: str | None = None,
              redirect_uri: str | None = None, open_browser: bool = True,
              timeout: float = 300.0, out: TextIO | None = None, err: TextIO | None = None,
              store: Store | None = None, provider: ProviderClient | None = None,
              on_url: Callable[[str], None] | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    c = config.client(client)
    redirect = redirect_uri or c.redirect_uri
    if not redirect and listen:
        # RFC 8252 loopback redirect: the listener's own address (register it, or a
        # provider that accepts any loopback port, as RFC 8252 7.3 asks).
        try:
            host, port = split_host_port(listen)
        except ValueError as exc:
            raise UsageError(f"--listen: {exc}") from None
        redirect = f"http://{f'[{host}]' if ':' in host else host}:{port}/callback"
    if not redirect:
        raise ConfigError(f"clients.{client}.redirect_uri: is required for authorize "
                          "(or pass --redirect-uri)")
    parts = urlsplit(redirect)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--redirect-uri: must be an http(s) URL, not {redirect!r}")
    if listen:
        try:
            address = split_host_port(listen)
        except ValueError as exc:
            raise UsageError(f"--listen: {exc}") from None
    else:
        address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    # Opened before the person consents: a database that cannot take the grant fails
    # now, not after the code is spent; and on PostgreSQL it holds the shared rate limit.
    own_store = store is None
    store = store or open_store(config)
    try:
        return _flow(config, c, redirect, address, parts.path or "/", store=store,
                     provider=provider, open_browser=open_browser, timeout=timeout,
                     out=out, err=err, on_url=on_url)
    finally:
        if own_store:
            store.close()


def _flow(config: Config, c: ClientConfig, redirect: str, address: tuple[str, int],
          path: str, *, store: Store, provider: ProviderClient | None, open_browser: bool,
          timeout: float, out: TextIO, err: TextIO,
          on_url: Callable[[str], None] | None) -> int:
    callback = _Callback(path)
    try:
        server = _listener(address, callback)
    except OSError as exc:
        raise AuthorizationFailed(
            f"cannot listen on {address[0]}:{address[1]}: {exc.strerror} (use --listen)"
        ) from None
    own_provider = provider is None
    provider = provider or ProviderClient(config.provider)
    if provider.limiter is None:
        # The exchange and the user look-up are requests to the provider like any
        # refresh: on PostgreSQL they take slots of the budget all replicas share.
        provider.limiter = _SlotWithin(limiter_for(store, config.provider.rate_limit),
                                       SLOT_WAIT)
    served = Served(server, "tokend-authorize", poll_interval=0.1).start()
    try:
        state = secrets.token_urlsafe(24)
        proof = pkce.new_pair()  # in memory only: this process completes its one flow
        url = provider.authorize_url(c, redirect, state, proof.challenge)
        print(f"Open this URL in a browser and grant access (waiting {timeout:g}s):", file=err)
        print(url, file=out, flush=True)
        if on_url is not None:
            on_url(url)
        elif open_browser:
            try:
                webbrowser.open(url)
            except webbrowser.Error:
                pass
        if not callback.received.wait(timeout):
            raise AuthorizationFailed(f"no redirect received within {timeout:g}s; nothing stored")
        params = callback.params or {}
        if params.get("state") != state:
            raise AuthorizationFailed("the redirect's state does not match (a stale or forged "
                                      "request); nothing stored")
        if "error" in params:
            detail = "; ".join(v for v in (params.get("message") or
                                           params.get("error_description"),
                                           params.get("hint")) if v)
            raise AuthorizationFailed(f"authorization denied: {params['error']}"
                                      + (f" ({detail})" if detail else "") + "; nothing stored")
        code = params.get("code")
        if not code:
            raise AuthorizationFailed("the redirect carries no code; nothing stored")
        try:
            resp = provider.exchange_code(c, code, redirect, proof.verifier)
            user_id, tenant_id = provider.current_user(resp.access_token)
        except ProviderError as exc:
            raise AuthorizationFailed(f"code exchange failed: {exc}; nothing stored") from None
        new = NewGrant(
            client=c.name, grant_type=GrantType.AUTHORIZATION_CODE.value,
            access_token=resp.access_token, access_expires_at=resp.access_expires_at,
            obtained_at=resp.sent_at, refresh_token=resp.refresh_token,
            refresh_expires_at=config.provider.refresh_token_ttl.after(resp.sent_at)
            if resp.refresh_token else None,
            user_id=user_id, tenant_id=tenant_id, consented_at=resp.sent_at,
        )
        now = store.clock()

        def event(grant: Grant, previous: Status | None) -> dict[str, Any] | None:
            return events.on_consent(grant, previous, now)

        gid, previous = store.consent(
            new, lambda g: policy.initial(g, now, config.schedule), event)
        what = "replaced" if previous else "stored"
        print(f"{what} grant {gid} for user {user_id} (tenant {tenant_id or '-'}) of client "
              f"{c.name}" + (f"; it was {previous.value}" if previous else ""), file=err)
        log.info("consent_stored", grant_id=gid, client=c.name, user_id=user_id,
                 previous=previous.value if previous else None)
        return 0
    except AuthorizationFailed as exc:
        print(f"tokend: {exc}", file=err)
        return 1
    finally:
        served.stop()
        if own_provider:
            provider.close()
