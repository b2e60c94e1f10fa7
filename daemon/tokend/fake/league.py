"""league/oauth2-server as the fake plays it: messages, token records, response shapes.

Plain data and small pure helpers; the state that holds them lives in ``provider``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from tokend.durations import Duration

League = Literal["5", "7", "8", "9"]
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

JSON = "application/json; charset=UTF-8"
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
# league's refresh tokens are ~750 chars of hex from defuse/php-encryption ("def50200"...);
# ours are random hex of the same size, so clients' column sizes and logs see the real thing.
REFRESH_HEX_BYTES = 372



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



@dataclass(slots=True)
class Access:
    client_id: str
    user_id: int | None
    tenant_id: int | None
    expires_at: datetime
    revoked: bool = False


@dataclass(slots=True)
class Refresh:
    client_id: str
    user_id: int | None
    tenant_id: int | None
    access_token: str
    chain: int
    expires_at: datetime
    revoked: bool = False
    rotated: bool = False  # revoked by a rotation: presenting it again is a reuse


@dataclass(slots=True)
class Code:
    client_id: str
    redirect_uri: str
    user_id: int
    tenant_id: int
    expires_at: datetime
    code_challenge: str | None = None  # PKCE, as league keeps it in the code's payload
    code_challenge_method: str = "plain"
    used: bool = False




@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    error: str | None = None  # tallied in stats()["errors_by_code"] for the token endpoint


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the handler does with a token request: answer, or hang and/or hang up."""

    response: Response | None  # None: close the connection without answering
    hang: float = 0.0


@dataclass(slots=True)
class Counters:
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


def json_response(
    status: int, payload: object, extra: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = json.dumps(payload).encode()
    return Response(status, body, (("Content-Type", JSON), *NO_STORE, *extra))


def random_hex(n: int) -> Iterator[str]:
    """``n`` random hex strings of 40 + 2 * REFRESH_HEX_BYTES chars (access + refresh part).

    One urandom call per block of tokens: a call per token dominated ``issue_many``.
    """
    width = 20 + REFRESH_HEX_BYTES
    for start in range(0, n, 1024):
        k = min(1024, n - start)
        blob = os.urandom(k * width).hex()
        for i in range(k):
            yield blob[2 * width * i : 2 * width * (i + 1)]


