"""The HTTP client for the provider's token and user endpoints.

One pooled :class:`requests.Session` shared by all worker threads. Every outcome goes
through :mod:`tokend.classify`; this module only moves bytes and never decides what
an answer means.

Things that would be harmless elsewhere and are not here:

* urllib3 must never re-send a request: a refresh token is single use, so a silent
  retry after a dropped connection can burn the new one. Retries are off entirely
  (``Retry(total=0, read=False)``) and redirects are not followed (a redirected POST
  would carry the client secret to wherever the ``Location`` points).
* Cookies are not kept (a PHP session cookie has no business in a token daemon and a
  shared jar is shared state between threads), and ``~/.netrc`` credentials are not
  added to requests (requests does that when no auth is given).
* Transport exceptions are replaced, not chained: requests' messages can quote header
  values, so the :class:`~tokend.errors.ProviderError` carries a safe description and
  no ``__context__``.
"""

from __future__ import annotations

import base64
import http.client
import http.cookiejar
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Final, Protocol
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

import requests
import requests.adapters
import requests.auth
import urllib3.exceptions
from urllib3.util.retry import Retry

from . import __version__, pkce, sendgate
from .classify import (
    GrantKind,
    classify_exception,
    is_token,
    parse_token_response,
    parse_user_response,
)
from .config import ClientConfig, ProviderConfig
from .errors import NotSent, ProviderError
from .model import TokenResponse

USER_AGENT: Final = f"tokend/{__version__}"
_TRANSPORT_ERRORS: Final = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)
_CHUNK = 16 * 1024
_FORM: Final = "application/x-www-form-urlencoded"


class _NoAuth(requests.auth.AuthBase):
    """Session-level auth that adds nothing; its presence stops requests' netrc lookup."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


def _utc_now() -> datetime:
    return datetime.now(UTC)


def basic_auth_header(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: both parts form-urlencoded before the Basic encoding.

    Note: league/oauth2-server does not url-decode them, so a secret with characters
    outside ``[A-Za-z0-9._~-]`` only works there with ``client_secret_post``.
    """
    raw = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode("ascii")).decode("ascii")


def _require_token(value: str, what: str) -> None:
    # An empty refresh token would be answered invalid_request, which is PERMANENT:
    # a caller's bug must not flag a grant for re-consent. RFC 6749 allows only VSCHAR
    # (printable ASCII) in tokens and codes; anything else would fail while building
    # the header. Never quote the value itself.
    if not is_token(value):
        raise ValueError(f"{what} is empty or not printable ASCII text")


class Admission(Protocol):
    def acquire(self, stop: threading.Event | None = None) -> bool: ...


class ProviderClient:
    """Talks to one provider; safe to share between threads."""

    def __init__(
        self,
        provider: ProviderConfig,
        *,
        pool_size: int = 10,
        clock: Callable[[], datetime] | None = None,
        max_body: int = 64 * 1024,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if max_body < 1:
            raise ValueError("max_body must be at least 1")
        self.provider = provider
        # Every request to the provider counts against provider.rate_limit (the provider
        # limits requests per egress IP): code exchanges and user look-ups take their
        # slot here, from the limiter the daemon and ``tokend authorize`` set (refreshes
        # take theirs in tokend.maintenance, before the lease check).
        self.limiter: Admission | None = None
        self._clock = clock or _utc_now
        self._max_body = max_body
        seconds = provider.timeout.total_seconds()
        self._timeout = (seconds, seconds)
        # requests reads the environment (proxy variables, REQUESTS_CA_BUNDLE /
        # CURL_CA_BUNDLE, .netrc) on EVERY request while trust_env is on, a measurable
        # part of the CPU a refresh costs (docs/benchmarks.md). A daemon's environment
        # does not change: it is read once here, with requests' own rules, and the
        # session then trusts nothing else. (.netrc never applied: session.auth is set.)
        self._verify: bool | str = provider.verify_tls and (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True)
        self._proxies: dict[str, dict[str, str]] = {}

        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4,
            pool_maxsize=pool_size,
            max_retries=Retry(total=0, read=False, redirect=False),
        )
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self._adapter = adapter
        session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        session.auth = _NoAuth()
        session.trust_env = False
        self._session = session
        self._templates: dict[tuple[str, str, bool], requests.PreparedRequest] = {}

    # ----------------------------------------------------------------- token endpoint

    def refresh(self, client: ClientConfig, refresh_token: str) -> TokenResponse:
        """Exchange a refresh token. No ``redirect_uri``: league answers invalid_client."""
        _require_token(refresh_token, "refresh token")
        return self._token_request(
            client, "refresh_token", {"refresh_token": refresh_token}, redact=(refresh_token,)
        )

    def client_credentials(self, client: ClientConfig) -> TokenResponse:
        return self._token_request(client, "client_credentials", {}, redact=())

    def exchange_code(self, client: ClientConfig, code: str, redirect_uri: str,
                      code_verifier: str) -> TokenResponse:
        """The PKCE ``code_verifier`` is the one whose challenge the authorize URL sent."""
        _require_token(code, "authorization code")
        if not pkce.is_verifier(code_verifier):
            raise ValueError("code verifier is not 43 to 128 unreserved characters")
        self._admit()
        return self._token_request(
            client, "authorization_code",
            {"code": code, "redirect_uri": redirect_uri, "code_verifier": code_verifier},
            redact=(code, code_verifier),
        )

    def _token_request(
        self,
        client: ClientConfig,
        grant: GrantKind,
        params: Mapping[str, str],
        *,
        redact: Iterable[str],
    ) -> TokenResponse:
        secret = client.client_secret.value
        form = {"grant_type": grant, **params}
        headers: dict[str, str] = {}
        if client.auth_method == "client_secret_basic":
            headers["Authorization"] = basic_auth_header(client.client_id, secret)
        else:
            form["client_id"] = client.client_id
            form["client_secret"] = secret
        secrets = (secret, *redact)
        status, response_headers, body, truncated, sent_at = self._send(
            "POST", self.provider.token_url, grant=grant,
            body=urlencode(form).encode("ascii"), headers=headers,
        )
        return parse_token_response(
            status, response_headers, body, grant=grant, sent_at=sent_at,
            truncated=truncated, redact=secrets,
        )

    # ----------------------------------------------------------------- user endpoint

    def current_user(self, access_token: str) -> tuple[str, str | None]:
        """``(user id, tenant id or None)`` of the user the access token belongs to."""
        _require_token(access_token, "access token")
        self._admit()
        status, headers, body, truncated, sent_at = self._send(
            "GET", self.provider.user_url, grant=None,
            headers={"Authorization": f"Bearer {access_token}"},
        )
        return parse_user_response(
            status, headers, body, now=sent_at, truncated=truncated, redact=(access_token,)
        )

    # ----------------------------------------------------------------- authorize

    def authorize_url(self, client: ClientConfig, redirect_uri: str, state: str,
                      code_challenge: str) -> str:
        """The consent URL, always with a PKCE S256 challenge (see :mod:`tokend.pkce`);
        parameters already in the configured URL are kept, except ours."""
        parts = urlsplit(self.provider.authorize_url)
        ours = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": pkce.METHOD,
        }
        query = [
            (key, value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if key not in ours
        ]
        query.extend(ours.items())
        return urlunsplit(parts._replace(query=urlencode(query)))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ProviderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- transport

    def _admit(self) -> None:
        """Wait for this request's slot of the rate limit (none set: no wait)."""
        if self.limiter is not None:
            self.limiter.acquire()

    def _send(
        self,
        method: str,
        url: str,
        *,
        grant: GrantKind | None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes, bool, datetime]:
        """Send once; ``(status, headers, body, truncated, sent_at)`` or ProviderError
        (NotSent: stopping, and nothing was sent)."""
        failure: ProviderError
        sent_at = self._clock()
        try:
            request = self._prepare(method, url, body, headers)
            # The last moment before the request is written: a request too late after
            # its slot of the shared rate limit takes a new one (tokend.sendgate).
            if not sendgate.ready():
                raise NotSent("stopping: the request's slot passed, none taken since")
            # Straight to the adapter: Session.send reads a 3xx answer's whole body
            # (to follow or release it) before we could cap it at max_body; nothing else
            # it adds (cookies, hooks, redirects) is wanted here.
            with self._adapter.send(
                request, stream=True, timeout=self._timeout, verify=self._verify,
                proxies=self._proxies_for(url),
            ) as response:
                body, truncated = self._read(response)
                return response.status_code, response.headers, body, truncated, sent_at
        except _TRANSPORT_ERRORS as exc:
            failure = classify_exception(exc, grant=grant)
        # Raised outside the except block so that the transport exception is not
        # attached as __context__ (see the module docstring).
        raise failure

    def _prepare(self, method: str, url: str, body: bytes | None,
                 headers: Mapping[str, str] | None) -> requests.PreparedRequest:
        """The request to send: a copy of one prepared by the session for this method
        and URL, with this request's headers and (already form-encoded) body.

        ``Session.request`` re-parses the URL and merges the session's headers, cookies,
        hooks and settings on every call: about a third of requests' CPU per refresh
        (docs/benchmarks.md). None of them changes during a daemon's life, so that work
        is done once per endpoint, by requests itself.
        """
        key = (method, url, body is not None)
        template = self._templates.get(key)
        if template is None:  # a race only prepares the same template twice
            template = self._session.prepare_request(requests.Request(
                method, url, headers={"Content-Type": _FORM} if body is not None else {}))
            self._templates[key] = template
        request = template.copy()
        if headers:
            request.headers.update(headers)
        if body is not None:
            request.prepare_body(body, None)
        return request

    def _proxies_for(self, url: str) -> dict[str, str]:
        """The environment's proxies for ``url`` (honouring no_proxy), looked up once."""
        found = self._proxies.get(url)
        if found is None:
            found = self._proxies[url] = dict(requests.utils.get_environ_proxies(url))
        return found

    def _read(self, response: requests.Response) -> tuple[bytes, bool]:
        """At most ``max_body`` bytes and whether there was more (then the connection
        is closed rather than drained: the rest is not worth waiting for)."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=_CHUNK):
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body:
                return b"".join(chunks)[: self._max_body], True
        return b"".join(chunks), False
