"""Classification of provider outcomes: the one place that decides what a response means.

Every HTTP answer and every transport failure of the provider ends up here and leaves
as either a validated :class:`TokenResponse` (or user ids) or a
:class:`~tokend.errors.ProviderError` with its :class:`~tokend.errors.ErrorKind`.
The guiding rule: only an OAuth error code that positively says "this grant is dead"
may become PERMANENT; anything unknown or ambiguous stays TRANSIENT, because flagging
a healthy grant for re-consent costs a human far more than one more retry.

Texts taken from the provider (``error_description``, ``message``, ``hint``) end up in
logs and exception messages, so they are cleaned, shortened and scrubbed of the
secrets that were sent in the request (a misbehaving server may echo them).

Its size is one concern: every reading of a provider answer (token, user, error body,
transport failure) sits here so that the PERMANENT/TRANSIENT rule above is applied in one place.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import re
import socket
import ssl
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeGuard

import requests
import urllib3.exceptions

from .errors import ErrorKind, ProviderError
from .model import PERMANENT_ERRORS, TokenResponse

GrantKind = Literal["refresh_token", "client_credentials", "authorization_code"]

# Longer than any sane access token lifetime; a larger value is a unit mix-up
# (milliseconds) or garbage, and trusting it would stop refreshes for years.
MAX_EXPIRES_IN: Final = 10 * 366 * 86400.0
MAX_RETRY_AFTER: Final = 86400.0
MAX_TEXT: Final = 200
BEARER: Final = "Bearer"

# Grants that act on a user's grant: a failure here can mean the grant is dead, and a
# request that may have reached the server may have rotated or consumed it.
_USER_GRANTS: Final = frozenset({"refresh_token", "authorization_code"})
_CLIENT_ON_USER_GRANT: Final = frozenset({"invalid_client", "unsupported_grant_type"})
# Client credentials involve no user grant, so every "you are wrong" answer is about the
# client's configuration.
_CLIENT_ON_CLIENT_CREDENTIALS: Final = frozenset(
    {
        "invalid_client", "unauthorized_client", "invalid_scope", "invalid_request",
        "invalid_grant", "unsupported_grant_type",
    }
)

_LABEL = re.compile(r"[a-z0-9_]{1,40}")
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_NUMERIC = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*", re.ASCII)
# RFC 6749 A.12/A.17: access-token and refresh-token = 1*VSCHAR (%x20-7E).
_VSCHAR = re.compile(r"[\x20-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_REDACTED = "********"


# --------------------------------------------------------------------------- helpers


def sanitize_error_code(code: object) -> str:
    """``code`` if it is safe as a metric label ([a-z0-9_], at most 40 chars), else ``other``."""
    if isinstance(code, str) and _LABEL.fullmatch(code):
        return code
    return "other"


def _status_label(status: int) -> str:
    return sanitize_error_code(f"http_{status}")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("expected a timezone-aware datetime")
    return moment.astimezone(UTC)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    # A plain dict is not case-insensitive like requests' headers are.
    wanted = name.lower()
    for key, val in headers.items():
        if key.lower() == wanted:
            return val
    return None


def _clean_text(value: object, redact: Iterable[str]) -> str | None:
    """Provider text made safe for a log line: one line, short, without our secrets."""
    if not isinstance(value, str):
        return None
    text = value
    # Redact before shortening so that a secret cannot survive half-cut.
    for secret in redact:
        if len(secret) >= 4:
            text = text.replace(secret, _REDACTED)
    # Lone surrogates (JSON "\ud800") cannot be encoded for a log line or a database.
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = " ".join(_CONTROL.sub(" ", text).split())
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "…"
    return text or None


class _NotJson:
    pass


_NOT_JSON: Final = _NotJson()


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    # RecursionError: deeply nested arrays fit easily in the size cap.
    except (ValueError, RecursionError):
        return _NOT_JSON


def _content_type(headers: Mapping[str, str]) -> str:
    value = _clean_text(_header(headers, "Content-Type"), ()) or "no content type"
    return value.split(";")[0].strip()[:60]


def is_token(value: object) -> TypeGuard[str]:
    """The one rule for a token or code: 1*VSCHAR (printable ASCII, RFC 6749)."""
    return isinstance(value, str) and _VSCHAR.fullmatch(value) is not None


def _expires_in(value: object) -> float | None:
    number: float
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not 0 < value <= MAX_EXPIRES_IN:
            return None
        number = float(value)
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str) and _NUMERIC.fullmatch(value):
        number = float(value)
    else:
        return None
    if not math.isfinite(number) or not 0 < number <= MAX_EXPIRES_IN:
        return None
    return number


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date).

    None when absent or unreadable; otherwise clamped to [0, 1 day] so that a broken
    header can neither busy-loop us nor park a grant for weeks.
    """
    now = _utc(now)  # a naive "now" is the caller's bug, not the header's
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)  # inf for absurdly long digit strings: clamped below
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - now).total_seconds()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _response_now(headers: Mapping[str, str], fallback: datetime) -> datetime:
    """The server's idea of "now" (its ``Date`` header) if readable.

    An HTTP-date ``Retry-After`` is in the server's clock; measuring it against the
    server's own ``Date`` makes the delay immune to clock skew between us and it.
    """
    value = _header(headers, "Date")
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return fallback
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return fallback


# --------------------------------------------------------------------------- HTTP answers


def _kind_for_code(code: str, grant: GrantKind) -> ErrorKind | None:
    if grant in _USER_GRANTS:
        if code in PERMANENT_ERRORS:
            return ErrorKind.PERMANENT
        if code in _CLIENT_ON_USER_GRANT:
            return ErrorKind.CLIENT
        return None
    if code in _CLIENT_ON_CLIENT_CREDENTIALS:
        return ErrorKind.CLIENT
    return None


def _error_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    grant: GrantKind | None,
    now: datetime,
    truncated: bool,
    redact: Iterable[str],
) -> ProviderError:
    """Classify a non-2xx answer (``grant`` None: not a token endpoint request)."""
    redact = tuple(redact)
    data = _NOT_JSON if truncated else _load_json(body)
    code: str | None = None
    description: str | None = None
    hint: str | None = None
    if isinstance(data, dict):
        raw_code = data.get("error")
        if isinstance(raw_code, str) and raw_code:
            code = raw_code
        # 8.x sends both (same text), 9.x only error_description, 5.x-7.x only message.
        description = _clean_text(data.get("error_description"), redact) or _clean_text(
            data.get("message"), redact
        )
        hint = _clean_text(data.get("hint"), redact)
    elif truncated:
        description = f"{_content_type(headers)} body over the size limit"
    elif data is _NOT_JSON:
        description = f"non-JSON {_content_type(headers)} body"
    else:
        description = "JSON body that is not an object"

    retry_after = parse_retry_after(_header(headers, "Retry-After"), _response_now(headers, now))
    label = sanitize_error_code(code) if code is not None else _status_label(status)
    user_grant = grant in _USER_GRANTS

    if status == 429:
        return ProviderError(
            ErrorKind.TRANSIENT, "rate_limited", status=status, description=description,
            hint=hint, retry_after=retry_after,
        )
    if 500 <= status <= 599:
        # A 5xx on a refresh may come after league revoked the old refresh token but
        # before the new one was stored, or from a gateway that gave up on a backend
        # that went on to finish: the grant may have been rotated.
        return ProviderError(
            ErrorKind.TRANSIENT, label, status=status, description=description, hint=hint,
            retry_after=retry_after, maybe_applied=user_grant,
        )
    if 400 <= status <= 499 and code is not None and grant is not None:
        kind = _kind_for_code(code, grant)
        if kind is not None:
            return ProviderError(kind, label, status=status, description=description, hint=hint)
    # Proxies' 403 pages, 404s, redirects, unknown OAuth codes: never proof of a dead
    # grant, so retry with backoff and let the failure metric make it visible.
    return ProviderError(
        ErrorKind.TRANSIENT, label, status=status, description=description, hint=hint,
        retry_after=retry_after,
    )


def parse_token_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    grant: GrantKind,
    sent_at: datetime,
    truncated: bool = False,
    redact: Iterable[str] = (),
) -> TokenResponse:
    """Validate a token endpoint answer or raise the classified :class:`ProviderError`.

    ``truncated`` says ``body`` was cut at the size cap. ``redact`` lists secrets sent
    in the request that must not survive into error texts.
    """
    sent_at = _utc(sent_at)
    if not 200 <= status <= 299:
        raise _error_response(
            status, headers, body, grant=grant, now=sent_at, truncated=truncated, redact=redact
        )

    def bad(reason: str) -> ProviderError:
        # The server said yes but we cannot use the answer: on a refresh it has most
        # likely rotated the token already, so this is no proof of anything but the
        # old refresh token may be gone.
        return ProviderError(
            ErrorKind.TRANSIENT, "bad_response", status=status, description=reason,
            maybe_applied=grant in _USER_GRANTS,
        )

    if truncated:
        raise bad("token response body is over the size limit")
    data = _load_json(body)
    if data is _NOT_JSON:
        raise bad(f"token response is not JSON ({_content_type(headers)})")
    if not isinstance(data, dict):
        raise bad("token response is not a JSON object")

    access_token = data.get("access_token")
    if not is_token(access_token):
        raise bad("access_token is missing, empty or not printable ASCII text")

    expires_in = _expires_in(data.get("expires_in"))
    if expires_in is None:
        raise bad("expires_in is missing or not a positive number up to 10 years")

    raw_type = data.get("token_type", BEARER)
    if not isinstance(raw_type, str) or raw_type.lower() != "bearer":
        shown = raw_type[:20] if isinstance(raw_type, str) else type(raw_type).__name__
        raise bad(f"token_type {_clean_text(shown, ()) or ''!r} is not Bearer")

    # Absent or null: the server kept the old refresh token (authorization_code on
    # Justimmo returns none), so the caller keeps what it has.
    raw_refresh = data.get("refresh_token")
    refresh_token: str | None = None
    if raw_refresh is not None:
        if not is_token(raw_refresh):
            raise bad("refresh_token is empty or not printable ASCII text")
        refresh_token = raw_refresh

    return TokenResponse(
        access_token=access_token,
        refresh_token=refresh_token,
        expires_in=expires_in,
        token_type=BEARER,
        sent_at=sent_at,
    )


def _user_id(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def parse_user_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: datetime,
    truncated: bool = False,
    redact: Iterable[str] = (),
) -> tuple[str, str | None]:
    """``(user id, tenant id or None)`` from the provider's "current user" endpoint."""
    if status == 401:
        # The resource server rejects the access token we just obtained or hold.
        error = _error_response(
            status, headers, body, grant=None, now=_utc(now), truncated=truncated, redact=redact
        )
        raise ProviderError(
            ErrorKind.PERMANENT, "invalid_token", status=status,
            description=error.description, hint=error.hint,
        )
    if not 200 <= status <= 299:
        raise _error_response(
            status, headers, body, grant=None, now=_utc(now), truncated=truncated, redact=redact
        )

    def bad(reason: str) -> ProviderError:
        return ProviderError(ErrorKind.TRANSIENT, "bad_response", status=status,
                             description=reason)

    data = _NOT_JSON if truncated else _load_json(body)
    if not isinstance(data, dict):
        raise bad("user response is not a JSON object")
    user_id = _user_id(data.get("id"))
    if user_id is None:
        raise bad("user response has no usable id")
    tenant = data.get("tenant")
    if tenant is None:
        return user_id, None
    if not isinstance(tenant, dict):
        raise bad("user response tenant is not an object")
    raw_tenant_id = tenant.get("id")
    if raw_tenant_id is None:
        return user_id, None
    tenant_id = _user_id(raw_tenant_id)
    if tenant_id is None:
        raise bad("user response tenant id is not usable")
    return user_id, tenant_id


# --------------------------------------------------------------------------- exceptions


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: requests puts urllib3's exception in ``args``,
    urllib3 its cause in ``reason``, and Python links ``__cause__``/``__context__``."""
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue and len(seen) < 64:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked: list[object] = [
            getattr(current, "reason", None),
            getattr(current, "original_error", None),
            current.__cause__,
            current.__context__,
            *current.args,
        ]
        queue.extend(item for item in linked if isinstance(item, BaseException))


def _first(chain: list[BaseException], *types: type[BaseException]) -> BaseException | None:
    return next((e for e in chain if isinstance(e, types)), None)


def _describe(phrase: str, exc: BaseException) -> str:
    # Only the type and the OS's own reason text: requests' messages can carry header
    # values (InvalidHeader quotes the Authorization header) and URLs.
    detail = type(exc).__name__
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and strerror:
        detail += f": {_clean_text(strerror, ()) or ''}"
    return f"{phrase} ({detail})"


def classify_exception(exc: BaseException, *, grant: GrantKind | None) -> ProviderError:
    """Classify a transport failure (requests/urllib3/socket exceptions).

    Decides whether the request may have reached the server (``maybe_applied``, only
    reported for grants that can rotate or consume something). When it is not clear,
    assume it did: a false "maybe" only turns a later permanent error's reason into
    ``rotation_lost``, a false "no" would hide a lost rotation. ``grant`` None means a
    request that is not a grant (the user lookup).
    """
    if isinstance(exc, ProviderError):
        return exc
    chain = list(_exception_chain(exc))
    user_grant = grant in _USER_GRANTS

    def fail(error: str, phrase: str, cause: BaseException, *, sent: bool) -> ProviderError:
        return ProviderError(
            ErrorKind.TRANSIENT, error, description=_describe(phrase, cause),
            maybe_applied=sent and user_grant,
        )

    # Nothing reached the server: the connection was never established.
    found = _first(chain, requests.exceptions.ConnectTimeout)
    if found is None:
        candidate = _first(chain, urllib3.exceptions.ConnectTimeoutError)
        if candidate is not None and not isinstance(
            candidate, urllib3.exceptions.NewConnectionError
        ):
            found = candidate
    if found is not None:
        return fail("timeout", "connect timed out", found, sent=False)
    found = _first(chain, urllib3.exceptions.NameResolutionError, socket.gaierror)
    if found is not None:
        return fail("connection", "name resolution failed", found, sent=False)
    found = _first(chain, ConnectionRefusedError)
    if found is not None:
        return fail("connection", "connection refused", found, sent=False)
    found = _first(chain, urllib3.exceptions.NewConnectionError)
    if found is not None:
        return fail("connection", "could not connect", found, sent=False)
    found = _first(chain, ssl.SSLCertVerificationError)
    if found is not None:
        return fail("connection", "TLS certificate verification failed", found, sent=False)
    found = _first(chain, requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)
    if found is not None:
        return fail("connection", "proxy connection failed", found, sent=False)
    found = _first(
        chain,
        requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader,
        requests.exceptions.URLRequired, urllib3.exceptions.LocationValueError,
    )
    if found is not None:
        return fail("request_error", "request could not be built", found, sent=False)

    # The request was (or may have been) sent.
    found = _first(
        chain, requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError,
        TimeoutError,
    )
    if found is not None:
        return fail("timeout", "no response within the read timeout", found, sent=True)
    found = _first(chain, requests.exceptions.ContentDecodingError,
                   urllib3.exceptions.DecodeError)
    if found is not None:
        return fail("bad_response", "response body could not be decoded", found, sent=True)
    found = _first(
        chain,
        http.client.HTTPException,  # RemoteDisconnected, IncompleteRead, BadStatusLine
        ConnectionError,  # the builtin: reset, aborted, broken pipe
        urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError,
        ssl.SSLError, urllib3.exceptions.SSLError, requests.exceptions.SSLError,
        requests.exceptions.ConnectionError, OSError,
    )
    if found is not None:
        # Prefer the innermost cause for the description: it names what happened.
        inner = _first(chain, http.client.HTTPException, ConnectionError, ssl.SSLError)
        return fail("connection", "connection dropped", inner or found, sent=True)
    return fail("request_error", "request failed", exc, sent=True)
