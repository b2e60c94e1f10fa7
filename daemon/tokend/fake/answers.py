"""league's answers: the error bodies, statuses and challenges of each major version, and
the success body; pure functions of the league version."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tokend.fake.league import (
    MSG_ACCESS_DENIED,
    MSG_INVALID_CLIENT,
    MSG_INVALID_GRANT,
    MSG_INVALID_REFRESH,
    MSG_INVALID_REQUEST,
    IssuedTokens,
    League,
    Response,
    json_response,
)


def error(
    league: League,
    error: str,
    message: str,
    status: int,
    hint: str | None = None,
    *,
    authorization: str | None = None,
) -> Response:
    extra: tuple[tuple[str, str], ...] = ()
    # 5.x-7.x always challenge on invalid_client; 8.x+ only if the client sent credentials
    # in a header (league 7.1.1 changed it; "7" here stands for the older 7.x releases).
    if error == "invalid_client" and (league in ("5", "7") or authorization):
        scheme = "Bearer" if (authorization or "").startswith("Bearer") else "Basic"
        extra = (("WWW-Authenticate", f'{scheme} realm="OAuth"'),)
    payload = error_payload(league, error, message, hint)
    return replace(json_response(status, payload, extra), error=error)


def error_payload(league: League, error: str, message: str, hint: str | None) -> dict[str, str]:
    payload = {"error": error}
    if league in ("8", "9"):
        payload["error_description"] = message
    if league != "9":
        payload["message"] = message
    if hint is not None:
        payload["hint"] = hint
    return payload


def invalid_request(league: League, parameter: str, hint: str | None = None) -> Response:
    return error(league,
        "invalid_request",
        MSG_INVALID_REQUEST,
        400,
        hint or f"Check the `{parameter}` parameter",
    )


def invalid_client(league: League, authorization: str | None) -> Response:
    return error(league, "invalid_client", MSG_INVALID_CLIENT, 401, authorization=authorization)


def bad_refresh_token(league: League, hint: str) -> Response:
    if league == "9":
        return error(league, "invalid_grant", MSG_INVALID_REFRESH, 400, hint)
    status = 400 if league == "5" else 401
    return error(league, "invalid_request", MSG_INVALID_REFRESH, status, hint)


def bad_code(league: League, hint: str) -> Response:
    # 9.1.0 turned expired/revoked codes into invalid_grant; other code errors stayed.
    if league == "9" and hint.startswith(
        ("Authorization code has expired", "Authorization code has been revoked")
    ):
        return error(league, "invalid_grant", MSG_INVALID_GRANT, 400, hint)
    return invalid_request(league, "code", hint)


def success(tokens: IssuedTokens) -> Response:
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "expires_in": tokens.expires_in,
        "access_token": tokens.access_token,
    }
    if tokens.refresh_token is not None:
        body["refresh_token"] = tokens.refresh_token
    return json_response(200, body)


def access_denied(league: League, status: int, hint: str) -> Response:
    return error(league, "access_denied", MSG_ACCESS_DENIED, status, hint)
