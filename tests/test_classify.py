"""Classification of provider outcomes: league/oauth2-server 5.x-9.x, Justimmo, proxies."""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import requests
import urllib3.exceptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokend.classify import (
    MAX_RETRY_AFTER,
    GrantKind,
    classify_exception,
    parse_retry_after,
    parse_token_response,
    parse_user_response,
    sanitize_error_code,
)
from tokend.errors import ErrorKind, ProviderError
from tokend.model import TokenResponse

SENT = datetime(2024, 1, 31, 12, 0, tzinfo=UTC)
JSON = {"Content-Type": "application/json"}
HTML = {"Content-Type": "text/html; charset=UTF-8"}
GRANTS: tuple[GrantKind, ...] = ("refresh_token", "authorization_code", "client_credentials")
USER_GRANTS: tuple[GrantKind, ...] = ("refresh_token", "authorization_code")

GENERIC_INVALID_REQUEST = (
    "The request is missing a required parameter, includes an invalid parameter value, "
    "includes a parameter more than once, or is otherwise malformed."
)
HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


def parse(status: int, body: Any, *, grant: GrantKind = "refresh_token",
          headers: dict[str, str] | None = None, truncated: bool = False) -> TokenResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if headers is None:
        headers = JSON if not isinstance(body, bytes) else HTML
    return parse_token_response(status, headers, raw, grant=grant, sent_at=SENT,
                                truncated=truncated)


def failure(status: int, body: Any, **kwargs: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        parse(status, body, **kwargs)
    return info.value


# --------------------------------------------------------------------------- error table


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    body: Any
    kind: dict[str, ErrorKind]  # per grant
    error: str
    description: str | None = None
    hint: str | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    retry_after: float | None = None


def all_grants(kind: ErrorKind) -> dict[str, ErrorKind]:
    return dict.fromkeys(GRANTS, kind)


def user_vs_cc(user: ErrorKind, cc: ErrorKind) -> dict[str, ErrorKind]:
    return {"refresh_token": user, "authorization_code": user, "client_credentials": cc}


P, C, T = ErrorKind.PERMANENT, ErrorKind.CLIENT, ErrorKind.TRANSIENT

CASES = [
    Case("league 5.x: 400 invalid_request, message + hint", 400,
         {"error": "invalid_request", "message": "The refresh token is invalid.",
          "hint": "Token has expired"},
         user_vs_cc(P, C), "invalid_request", "The refresh token is invalid.",
         "Token has expired"),
    Case("league 6.0.2-7.x: 401 invalid_request", 401,
         {"error": "invalid_request", "message": "The refresh token is invalid.",
          "hint": "Token has been revoked"},
         user_vs_cc(P, C), "invalid_request", "The refresh token is invalid.",
         "Token has been revoked"),
    Case("league 8.x: 401 invalid_request, error_description + message", 401,
         {"error": "invalid_request", "error_description": "The refresh token is invalid.",
          "message": "The refresh token is invalid.", "hint": "Cannot decrypt the refresh token"},
         user_vs_cc(P, C), "invalid_request", "The refresh token is invalid.",
         "Cannot decrypt the refresh token"),
    Case("league 8.x: description preferred over message", 401,
         {"error": "invalid_request", "error_description": "from error_description",
          "message": "from message"},
         user_vs_cc(P, C), "invalid_request", "from error_description"),
    Case("league 9.x: 400 invalid_grant, error_description only", 400,
         {"error": "invalid_grant", "error_description": "The refresh token is invalid.",
          "hint": "Token is not linked to client"},
         user_vs_cc(P, C), "invalid_grant", "The refresh token is invalid.",
         "Token is not linked to client"),
    Case("Justimmo: refresh token has expired", 400,
         {"error": "invalid_request", "message": GENERIC_INVALID_REQUEST,
          "hint": "Refresh token has expired"},
         user_vs_cc(P, C), "invalid_request", GENERIC_INVALID_REQUEST,
         "Refresh token has expired"),
    Case("invalid_client 401 with WWW-Authenticate", 401,
         {"error": "invalid_client", "message": "Client authentication failed"},
         all_grants(C), "invalid_client", "Client authentication failed",
         headers={**JSON, "WWW-Authenticate": 'Basic realm="OAuth"'}),
    Case("invalid_client 400 (other servers)", 400,
         {"error": "invalid_client"}, all_grants(C), "invalid_client"),
    Case("unsupported_grant_type", 400,
         {"error": "unsupported_grant_type",
          "message": "The authorization grant type is not supported by the authorization "
                     "server."},
         all_grants(C), "unsupported_grant_type",
         "The authorization grant type is not supported by the authorization server."),
    Case("unauthorized_client", 400, {"error": "unauthorized_client"},
         user_vs_cc(P, C), "unauthorized_client"),
    Case("invalid_scope", 400, {"error": "invalid_scope", "hint": "Check the `scope` parameter"},
         user_vs_cc(P, C), "invalid_scope", None, "Check the `scope` parameter"),
    Case("invalid_grant 401", 401, {"error": "invalid_grant"}, user_vs_cc(P, C), "invalid_grant"),
    Case("server_error 500", 500,
         {"error": "server_error",
          "message": "The authorization server encountered an unexpected condition which "
                     "prevented it from fulfilling the request."},
         all_grants(T), "server_error",
         "The authorization server encountered an unexpected condition which prevented it "
         "from fulfilling the request."),
    Case("invalid_grant in a 500 is still a server fault", 500, {"error": "invalid_grant"},
         all_grants(T), "invalid_grant"),
    Case("HTML 502 from the proxy", 502, HTML_502, all_grants(T), "http_502",
         "non-JSON text/html body", headers=dict(HTML)),
    Case("HTML 503 with Retry-After", 503, b"<h1>Maintenance</h1>", all_grants(T), "http_503",
         headers={**HTML, "Retry-After": "120"}, retry_after=120.0,
         description="non-JSON text/html body"),
    Case("JSON 503 with Retry-After", 503, {"error": "temporarily_unavailable"}, all_grants(T),
         "temporarily_unavailable", headers={**JSON, "retry-after": "30"}, retry_after=30.0),
    Case("429 with Retry-After seconds", 429, b"Too Many Requests", all_grants(T),
         "rate_limited", headers={"Content-Type": "text/plain", "Retry-After": "7"},
         retry_after=7.0, description="non-JSON text/plain body"),
    Case("429 with Retry-After HTTP-date against Date", 429, {"error": "slow_down"},
         all_grants(T), "rate_limited",
         headers={**JSON, "Date": "Wed, 31 Jan 2024 13:00:00 GMT",
                  "Retry-After": "Wed, 31 Jan 2024 13:01:30 GMT"},
         retry_after=90.0),
    Case("429 without Retry-After", 429, {}, all_grants(T), "rate_limited"),
    Case("403 HTML from a proxy / WAF", 403, b"<html>Forbidden</html>", all_grants(T),
         "http_403", "non-JSON text/html body", headers=dict(HTML)),
    Case("404", 404, b"Not Found", all_grants(T), "http_404",
         "non-JSON text/plain body", headers={"Content-Type": "text/plain"}),
    Case("unknown OAuth error code", 400, {"error": "slow_down"}, all_grants(T), "slow_down"),
    Case("unsanitary OAuth error code", 400, {"error": "Invalid Grant!"}, all_grants(T),
         "other"),
    Case("over-long OAuth error code", 400, {"error": "x" * 41}, all_grants(T), "other"),
    Case("malformed JSON 400", 400, b'{"error": "invalid_grant"', all_grants(T), "http_400",
         "non-JSON application/json body"),
    Case("JSON array 400", 400, [1, 2], all_grants(T), "http_400",
         "JSON body that is not an object"),
    Case("non-string error values are ignored", 400,
         {"error": 5, "message": ["x"], "error_description": None, "hint": {"a": 1}},
         all_grants(T), "http_400"),
    Case("non-string message, string error_description", 401,
         {"error": "invalid_request", "error_description": 3, "message": "fallback"},
         user_vs_cc(P, C), "invalid_request", "fallback"),
    Case("authorization code expired (pre 9.1)", 400,
         {"error": "invalid_request", "message": GENERIC_INVALID_REQUEST,
          "hint": "Authorization code has expired"},
         user_vs_cc(P, C), "invalid_request", GENERIC_INVALID_REQUEST,
         "Authorization code has expired"),
    Case("302 redirect is not followed", 302, b"", all_grants(T), "http_302",
         headers={"Location": "https://elsewhere.example/"},
         description="non-JSON no content type body"),
    Case("truncated error page", 502, b"<html>" + b"x" * 100, all_grants(T), "http_502",
         "text/html body over the size limit", headers=dict(HTML)),
    Case("truncated JSON error is not trusted", 400, {"error": "invalid_grant"},
         all_grants(T), "http_400", "application/json body over the size limit"),
]


@pytest.mark.parametrize("grant", GRANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_error_table(case: Case, grant: GrantKind) -> None:
    err = failure(case.status, case.body, grant=grant, headers=case.headers,
                  truncated=case.name.startswith("truncated"))
    assert err.kind is case.kind[grant], err.summary()
    assert err.error == case.error
    assert err.status == case.status
    if case.description is not None:
        assert err.description is not None
        assert err.description.startswith(case.description)
    else:
        assert err.description is None
    assert err.hint == case.hint
    assert err.retry_after == case.retry_after
    assert re.fullmatch(r"[a-z0-9_]{1,40}", err.error)
    # Only a 5xx on a user grant may have changed anything on the server.
    assert err.maybe_applied == (500 <= case.status <= 599 and grant in USER_GRANTS)


def test_retry_after_http_date_without_date_header_uses_sent_at() -> None:
    when = format_datetime(SENT + timedelta(seconds=45), usegmt=True)
    err = failure(429, b"", headers={"Retry-After": when})
    assert err.retry_after == 45.0


def test_plain_dict_headers_are_read_case_insensitively() -> None:
    err = failure(503, b"", headers={"RETRY-AFTER": "5", "content-type": "text/html"})
    assert err.retry_after == 5.0
    assert err.description == "non-JSON text/html body"


def test_provider_texts_are_cleaned_shortened_and_redacted() -> None:
    secret = "def50200s3cr3t-refresh-token"
    body = {"error": "invalid_request", "message": "bad\n\x00token " + "x" * 500,
            "hint": f"token {secret} is revoked"}
    with pytest.raises(ProviderError) as info:
        parse_token_response(400, JSON, json.dumps(body).encode(), grant="refresh_token",
                             sent_at=SENT, redact=[secret])
    err = info.value
    assert err.hint == "token ******** is revoked"
    assert err.description is not None
    assert err.description.startswith("bad token xxx")
    assert len(err.description) <= 200
    assert secret not in str(err)
    assert secret not in repr(err)


# --------------------------------------------------------------------------- 2xx


def ok_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"token_type": "Bearer", "expires_in": 86400,
                            "access_token": "eyJ.access.token", "refresh_token": "def50200abc"}
    for key, value in changes.items():
        if value is _ABSENT:
            body.pop(key)
        else:
            body[key] = value
    return body


_ABSENT = object()


def test_valid_token_response() -> None:
    resp = parse(200, ok_body())
    assert resp == TokenResponse("eyJ.access.token", "def50200abc", 86400.0, "Bearer", SENT)
    assert resp.access_expires_at == SENT + timedelta(days=1)
    assert "eyJ.access.token" not in repr(resp)
    assert "def50200abc" not in repr(resp)
    assert "def50200abc" not in str(resp)


@pytest.mark.parametrize(
    ("changes", "field_name", "expected"),
    [
        ({"refresh_token": _ABSENT}, "refresh_token", None),
        ({"refresh_token": None}, "refresh_token", None),
        ({"token_type": "bearer"}, "token_type", "Bearer"),
        ({"token_type": "BEARER"}, "token_type", "Bearer"),
        ({"token_type": _ABSENT}, "token_type", "Bearer"),
        ({"expires_in": "86400"}, "expires_in", 86400.0),
        ({"expires_in": " 3600 "}, "expires_in", 3600.0),
        ({"expires_in": 86399.5}, "expires_in", 86399.5),
        ({"expires_in": "2678400"}, "expires_in", 2678400.0),
        ({"expires_in": 10 * 365 * 86400}, "expires_in", 10 * 365 * 86400.0),
        ({"expires_in": 0.5}, "expires_in", 0.5),
        ({"scope": "x", "extra": [1]}, "token_type", "Bearer"),
    ],
)
def test_accepted_variants(changes: dict[str, Any], field_name: str, expected: Any) -> None:
    resp = parse(200, ok_body(**changes))
    assert getattr(resp, field_name) == expected


@pytest.mark.parametrize("status", [200, 201, 203])
def test_any_2xx_is_a_success(status: int) -> None:
    assert parse(status, ok_body()).access_token == "eyJ.access.token"


def test_client_credentials_without_refresh_token() -> None:
    body = {"token_type": "Bearer", "expires_in": 2678400, "access_token": "cc-token"}
    resp = parse(200, body, grant="client_credentials")
    assert resp.refresh_token is None
    assert resp.access_expires_at == SENT + timedelta(seconds=2678400)


BAD_2XX: list[tuple[str, Any]] = [
    ("not JSON", b"<html>OK</html>"),
    ("empty body", b""),
    ("JSON array", [ok_body()]),
    ("JSON string", "access_token"),
    ("JSON null", None),
    ("missing access_token", ok_body(access_token=_ABSENT)),
    ("empty access_token", ok_body(access_token="")),
    ("numeric access_token", ok_body(access_token=123)),
    ("null access_token", ok_body(access_token=None)),
    ("access_token with newline", ok_body(access_token="abc\ndef")),
    ("access_token non-ASCII", ok_body(access_token="tökén")),
    ("missing expires_in", ok_body(expires_in=_ABSENT)),
    ("null expires_in", ok_body(expires_in=None)),
    ("zero expires_in", ok_body(expires_in=0)),
    ("negative expires_in", ok_body(expires_in=-1)),
    ("negative string expires_in", ok_body(expires_in="-86400")),
    ("huge expires_in", ok_body(expires_in=86400 * 365 * 11)),
    ("huge int expires_in", ok_body(expires_in=10**400)),
    ("milliseconds expires_in", ok_body(expires_in=86_400_000_000)),
    ("boolean expires_in", ok_body(expires_in=True)),
    ("text expires_in", ok_body(expires_in="one day")),
    ("NaN string expires_in", ok_body(expires_in="NaN")),
    ("inf string expires_in", ok_body(expires_in="inf")),
    ("list expires_in", ok_body(expires_in=[86400])),
    ("mac token_type", ok_body(token_type="mac")),
    ("numeric token_type", ok_body(token_type=1)),
    ("null token_type", ok_body(token_type=None)),
    ("empty refresh_token", ok_body(refresh_token="")),
    ("numeric refresh_token", ok_body(refresh_token=123)),
    ("object refresh_token", ok_body(refresh_token={"value": "x"})),
    ("NaN literal", b'{"token_type":"Bearer","expires_in":NaN,"access_token":"a"}'),
    ("Infinity literal", b'{"token_type":"Bearer","expires_in":Infinity,"access_token":"a"}'),
    ("1e999", b'{"token_type":"Bearer","expires_in":1e999,"access_token":"a"}'),
    ("deep nesting", b"[" * 100_000),
    ("invalid UTF-8", b'{"access_token": "\xff\xfe"}'),
]


@pytest.mark.parametrize("grant", GRANTS)
@pytest.mark.parametrize(("name", "body"), BAD_2XX, ids=[n for n, _ in BAD_2XX])
def test_bad_2xx_is_transient_bad_response(name: str, body: Any, grant: GrantKind) -> None:
    err = failure(200, body, grant=grant, headers=JSON)
    assert err.kind is ErrorKind.TRANSIENT
    assert err.error == "bad_response"
    assert err.status == 200
    # The server said yes: on a refresh it has rotated already, on a code exchange the
    # code is spent.
    assert err.maybe_applied is (grant in USER_GRANTS)
    assert "eyJ.access.token" not in str(err)
    assert "def50200abc" not in str(err)


@pytest.mark.parametrize("grant", GRANTS)
def test_truncated_2xx_is_bad_response(grant: GrantKind) -> None:
    err = failure(200, ok_body(), grant=grant, truncated=True)
    assert err.error == "bad_response"
    assert err.maybe_applied is (grant in USER_GRANTS)
    assert err.description is not None
    assert "size limit" in err.description


def test_naive_sent_at_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_token_response(200, JSON, json.dumps(ok_body()).encode(), grant="refresh_token",
                             sent_at=datetime(2024, 1, 1))


def test_sent_at_is_normalised_to_utc() -> None:
    cet = datetime(2024, 1, 31, 13, 0, tzinfo=UTC).astimezone()
    resp = parse_token_response(200, JSON, json.dumps(ok_body()).encode(),
                                grant="refresh_token", sent_at=cet)
    assert resp.sent_at.tzinfo is UTC
    assert resp.sent_at == cet


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("code", "label"),
    [
        ("invalid_grant", "invalid_grant"),
        ("http_503", "http_503"),
        ("x" * 40, "x" * 40),
        ("x" * 41, "other"),
        ("Invalid_Grant", "other"),
        ("invalid-grant", "other"),
        ("", "other"),
        ("a b", "other"),
        ("\u0131nvalid", "other"),  # dotless i
        (None, "other"),
        (42, "other"),
    ],
)
def test_sanitize_error_code(code: object, label: str) -> None:
    assert sanitize_error_code(code) == label


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("86401", MAX_RETRY_AFTER),
        ("9" * 500, MAX_RETRY_AFTER),
        ("-5", None),
        ("soon", None),
        ("12s", None),
        ("0x10", None),
        ("Wed, 31 Jan 2024 12:00:30 GMT", 30.0),
        ("Wed, 31 Jan 2024 11:00:00 GMT", 0.0),  # in the past
        ("Thu, 01 Jan 2099 00:00:00 GMT", MAX_RETRY_AFTER),
        ("Wednesday, 31-Jan-24 12:01:00 GMT", 60.0),  # RFC 850
        ("Wed Jan 31 12:02:00 2024", 120.0),  # asctime
        ("Wed, 31 Feb 2024 12:00:30 GMT", None),
        ("Wed, 31 Jan 2024 25:00:30 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, SENT) == expected


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, SENT)
    assert result is None or 0.0 <= result <= MAX_RETRY_AFTER


# --------------------------------------------------------------------------- user endpoint


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"id": 1234, "tenant": {"id": 5678}}, ("1234", "5678")),
        ({"id": "u-1", "tenant": {"id": "t-1"}}, ("u-1", "t-1")),
        ({"id": 1234}, ("1234", None)),
        ({"id": 1234, "tenant": None}, ("1234", None)),
        ({"id": 1234, "tenant": {}}, ("1234", None)),
        ({"id": 1234.0, "tenant": {"id": 5678, "name": "x"}}, ("1234", "5678")),
    ],
)
def test_user_response(body: Any, expected: tuple[str, str | None]) -> None:
    assert parse_user_response(200, JSON, json.dumps(body).encode(), now=SENT) == expected


@pytest.mark.parametrize(
    "body",
    [b"<html>", b"[]", b'{"tenant": {"id": 1}}', b'{"id": true}', b'{"id": ""}',
     b'{"id": 1.5}', b'{"id": 1, "tenant": 5}', b'{"id": 1, "tenant": {"id": [1]}}'],
)
def test_bad_user_response(body: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        parse_user_response(200, JSON, body, now=SENT)
    assert info.value.kind is ErrorKind.TRANSIENT
    assert info.value.error == "bad_response"
    assert not info.value.maybe_applied


def test_user_401_is_permanent_invalid_token() -> None:
    body = b'{"error": "access_denied", "message": "The resource owner denied the request."}'
    with pytest.raises(ProviderError) as info:
        parse_user_response(401, JSON, body, now=SENT)
    assert info.value.kind is ErrorKind.PERMANENT
    assert info.value.error == "invalid_token"
    assert info.value.description == "The resource owner denied the request."


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [(500, b"<html>", "http_500"), (400, b'{"error": "invalid_request"}', "invalid_request"),
     (403, b'{"error": "insufficient_scope"}', "insufficient_scope"),
     (429, b"", "rate_limited")],
)
def test_user_other_errors_are_transient(status: int, body: bytes, error: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_user_response(status, JSON, body, now=SENT)
    assert info.value.kind is ErrorKind.TRANSIENT
    assert info.value.error == error
    assert not info.value.maybe_applied


# --------------------------------------------------------------------------- exceptions
# Built the way requests 2.x / urllib3 2.x build them; test_provider.py produces the
# real ones over real sockets.


def _conn() -> Any:
    return None


def max_retry(reason: Exception) -> urllib3.exceptions.MaxRetryError:
    return urllib3.exceptions.MaxRetryError(None, "/access_token", reason)  # type: ignore[arg-type]


def chained(outer: BaseException, context: BaseException) -> BaseException:
    outer.__context__ = context
    return outer


def _refused() -> BaseException:
    inner = urllib3.exceptions.NewConnectionError(
        _conn(), "Failed to establish a new connection: [Errno 111] Connection refused")
    inner.__context__ = ConnectionRefusedError(111, "Connection refused")
    return requests.exceptions.ConnectionError(max_retry(inner))


def _dns() -> BaseException:
    gai = socket.gaierror(-2, "Name or service not known")
    inner = urllib3.exceptions.NameResolutionError("auth.example", _conn(), gai)
    return requests.exceptions.ConnectionError(max_retry(inner))


def _connect_timeout() -> BaseException:
    inner = urllib3.exceptions.ConnectTimeoutError(_conn(), "Connection to host timed out.")
    return requests.exceptions.ConnectTimeout(max_retry(inner))


def _cert() -> BaseException:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed")
    inner = urllib3.exceptions.SSLError(verify)
    return requests.exceptions.SSLError(max_retry(inner))


def _proxy() -> BaseException:
    inner = urllib3.exceptions.ProxyError("Unable to connect to proxy", OSError("refused"))
    return requests.exceptions.ProxyError(max_retry(inner))


def _read_timeout() -> BaseException:
    inner = urllib3.exceptions.ReadTimeoutError(None, "/access_token", "Read timed out.")  # type: ignore[arg-type]
    inner.__context__ = TimeoutError("timed out")
    return requests.exceptions.ReadTimeout(inner)


def _read_timeout_in_body() -> BaseException:
    inner = urllib3.exceptions.ReadTimeoutError(None, "/access_token", "Read timed out.")  # type: ignore[arg-type]
    return requests.exceptions.ConnectionError(inner)


def _remote_disconnected() -> BaseException:
    rd = http.client.RemoteDisconnected("Remote end closed connection without response")
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", rd))


def _reset() -> BaseException:
    reset = ConnectionResetError(104, "Connection reset by peer")
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", reset))


def _chunked() -> BaseException:
    incomplete = urllib3.exceptions.IncompleteRead(10, 90)
    return requests.exceptions.ChunkedEncodingError(
        urllib3.exceptions.ProtocolError("Connection broken", incomplete))


def _decode() -> BaseException:
    return requests.exceptions.ContentDecodingError(
        urllib3.exceptions.DecodeError("Received response with content-encoding: gzip"))


def _invalid_header() -> BaseException:
    return requests.exceptions.InvalidHeader(
        "Invalid leading whitespace, reserved character(s), or return character(s) in "
        "header value: 'Bearer SECRET-ACCESS\\n'")


EXCEPTIONS: list[tuple[str, Any, str, bool]] = [
    # name, factory, error, sent
    ("connection refused", _refused, "connection", False),
    ("DNS failure", _dns, "connection", False),
    ("bare gaierror", lambda: socket.gaierror(-3, "Temporary failure"), "connection", False),
    ("connect timeout", _connect_timeout, "timeout", False),
    ("TLS certificate", _cert, "connection", False),
    ("proxy", _proxy, "connection", False),
    ("invalid header", _invalid_header, "request_error", False),
    ("invalid URL", lambda: requests.exceptions.InvalidURL("bad"), "request_error", False),
    ("read timeout", _read_timeout, "timeout", True),
    ("read timeout while streaming the body", _read_timeout_in_body, "timeout", True),
    ("bare socket timeout", lambda: TimeoutError("timed out"), "timeout", True),
    ("remote disconnected", _remote_disconnected, "connection", True),
    ("connection reset", _reset, "connection", True),
    ("bare reset", lambda: ConnectionResetError(104, "reset"), "connection", True),
    ("chunked encoding", _chunked, "connection", True),
    ("content decoding", _decode, "bad_response", True),
    ("other TLS error mid-stream",
     lambda: requests.exceptions.SSLError(urllib3.exceptions.SSLError(ssl.SSLEOFError())),
     "connection", True),
    ("unknown", lambda: RuntimeError("boom"), "request_error", True),
]


@pytest.mark.parametrize("grant", GRANTS)
@pytest.mark.parametrize(("name", "factory", "error", "sent"), EXCEPTIONS,
                         ids=[e[0] for e in EXCEPTIONS])
def test_classify_exception(name: str, factory: Any, error: str, sent: bool,
                            grant: GrantKind) -> None:
    err = classify_exception(factory(), grant=grant)
    assert err.kind is ErrorKind.TRANSIENT
    assert err.error == error
    assert err.status is None
    assert err.maybe_applied is (sent and grant in USER_GRANTS)
    assert "SECRET" not in str(err)


def test_classify_exception_without_grant_is_never_applied() -> None:
    assert not classify_exception(_read_timeout(), grant=None).maybe_applied


def test_classify_exception_describes_the_cause() -> None:
    err = classify_exception(_refused(), grant="refresh_token")
    assert err.description == "connection refused (ConnectionRefusedError: Connection refused)"
    err = classify_exception(_dns(), grant="refresh_token")
    assert err.description is not None
    assert err.description.startswith("name resolution failed (NameResolutionError")


def test_classify_exception_passes_provider_errors_through() -> None:
    original = ProviderError(ErrorKind.CLIENT, "invalid_client")
    assert classify_exception(original, grant="refresh_token") is original


def test_classify_exception_survives_cycles() -> None:
    a, b = OSError("a"), OSError("b")
    a.__context__, b.__context__ = b, a
    assert classify_exception(a, grant="refresh_token").error == "connection"


# --------------------------------------------------------------------------- properties

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=10,
)
_field_values = st.one_of(
    st.just(_ABSENT), st.none(), st.booleans(), st.integers(), st.floats(),
    st.text(max_size=30), st.sampled_from(["Bearer", "bearer", "86400", "-1", "", " 1 "]),
    _json_values,
)
_token_like_bodies = st.fixed_dictionaries(
    {
        "access_token": _field_values,
        "expires_in": _field_values,
        "token_type": _field_values,
        "refresh_token": _field_values,
        "error": _field_values,
        "message": _field_values,
        "error_description": _field_values,
        "hint": _field_values,
    }
).map(lambda d: json.dumps({k: v for k, v in d.items() if v is not _ABSENT}).encode())

_bodies = st.one_of(st.binary(max_size=300), _token_like_bodies,
                    _json_values.map(lambda v: json.dumps(v).encode()))
_headers = st.dictionaries(
    st.sampled_from(["Retry-After", "retry-after", "Date", "Content-Type", "X-Other"]),
    st.text(max_size=40), max_size=3,
)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.one_of(st.integers(min_value=-5, max_value=1200),
                     st.sampled_from([200, 201, 400, 401, 429, 500, 503])),
    headers=_headers,
    body=_bodies,
    grant=st.sampled_from(GRANTS),
    truncated=st.booleans(),
)
def test_parse_token_response_returns_or_raises_provider_error(
    status: int, headers: dict[str, str], body: bytes, grant: GrantKind, truncated: bool
) -> None:
    try:
        resp = parse_token_response(status, headers, body, grant=grant, sent_at=SENT,
                                    truncated=truncated)
    except ProviderError as err:
        assert re.fullmatch(r"[a-z0-9_]{1,40}", err.error)
        assert err.retry_after is None or 0 <= err.retry_after <= MAX_RETRY_AFTER
        if err.kind is not ErrorKind.TRANSIENT:
            # Only an OAuth code in a 4xx can say anything but "try again later".
            assert 400 <= status <= 499
            assert status != 429
        assert err.maybe_applied is False or grant in USER_GRANTS
        str(err)
        repr(err)
        return
    assert 200 <= status <= 299
    assert not truncated
    assert isinstance(resp.access_token, str)
    assert resp.access_token
    assert resp.refresh_token is None or (isinstance(resp.refresh_token, str)
                                          and resp.refresh_token)
    assert math.isfinite(resp.expires_in)
    assert 0 < resp.expires_in <= 10 * 366 * 86400
    assert resp.token_type == "Bearer"
    assert resp.access_expires_at >= SENT


@settings(max_examples=300)
@given(status=st.integers(min_value=100, max_value=599), body=_bodies)
def test_parse_user_response_returns_or_raises_provider_error(status: int, body: bytes) -> None:
    try:
        user_id, tenant_id = parse_user_response(status, {}, body, now=SENT)
    except ProviderError as err:
        assert not err.maybe_applied
        return
    assert 200 <= status <= 299
    assert user_id
    assert tenant_id is None or tenant_id


def test_parse_retry_after_refuses_a_naive_now() -> None:
    with pytest.raises(ValueError):
        parse_retry_after("5", datetime(2024, 1, 1))
