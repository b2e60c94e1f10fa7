"""Signed re-consent links: pure functions of a key, a grant and ``now`` (no I/O).

A link token is ``<grant id>.<expiry, unix seconds>.<consent mark>.<signature>``, the
signature an HMAC-SHA256 of the rest under ``consent.link_key`` (a key of its own, so a
leaked webhook secret or token key cannot mint links). The consent mark is a digest of
the grant's ``consented_at`` when the link was made: any successful consent changes
it, so every older link of that grant stops working (single use).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from . import events
from .config import Config
from .errors import ConfigError, TokendError
from .model import Grant, GrantType, Status

_SEP = "."
TOKEN_MAX = 200  # longer path segments are not ours: refused before any work


class Refusal(StrEnum):
    MALFORMED = "malformed"
    SIGNATURE = "signature"
    EXPIRED = "expired"
    USED = "used"  # the grant was consented since the link was made
    UNKNOWN = "unknown_grant"
    UNAVAILABLE = "unavailable"  # disabled, or not a grant a person can consent to


class LinkRefused(TokendError):
    def __init__(self, reason: Refusal) -> None:
        super().__init__(f"consent link refused: {reason.value}")
        self.reason = reason


@dataclass(frozen=True)
class Link:
    grant_id: int
    expires_at: datetime
    mark: str


def consent_mark(consented_at: datetime | None) -> str:
    """A short digest of the consent a link belongs to (reveals no date)."""
    text = consented_at.astimezone(UTC).isoformat(timespec="microseconds") \
        if consented_at else "-"
    return _b64(hashlib.sha256(text.encode()).digest()[:9])


def mint(key: str, grant_id: int, consented_at: datetime | None, expires_at: datetime) -> str:
    body = _SEP.join((str(grant_id), str(int(expires_at.timestamp())),
                      consent_mark(consented_at)))
    return body + _SEP + _sign(key, body)


def verify(key: str, token: str, now: datetime) -> Link:
    """The link a token names, if its signature holds and it has not expired."""
    parts = token.split(_SEP)
    if len(token) > TOKEN_MAX or len(parts) != 4 or not all(parts):
        raise LinkRefused(Refusal.MALFORMED)
    gid, exp, mark, sig = parts
    if not hmac.compare_digest(_sign(key, _SEP.join((gid, exp, mark))), sig):
        raise LinkRefused(Refusal.SIGNATURE)
    try:  # signed by us, so well-formed unless the key was misused elsewhere
        link = Link(int(gid), datetime.fromtimestamp(int(exp), UTC), mark)
    except (ValueError, OverflowError, OSError):
        raise LinkRefused(Refusal.MALFORMED) from None
    if now >= link.expires_at:
        raise LinkRefused(Refusal.EXPIRED)
    return link


def check_grant(link: Link, grant: Grant) -> None:
    """The grant may be consented to through this link now."""
    if grant.grant_type != GrantType.AUTHORIZATION_CODE or grant.status == Status.DISABLED:
        raise LinkRefused(Refusal.UNAVAILABLE)
    if not hmac.compare_digest(consent_mark(grant.consented_at), link.mark):
        raise LinkRefused(Refusal.USED)


def _sign(key: str, body: str) -> str:
    return _b64(hmac.new(key.encode(), b"tokend-consent-v1|" + body.encode(),
                         hashlib.sha256).digest())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# --------------------------------------------------------------------------- with a config


def link_for(config: Config, grant: Grant, now: datetime) -> str:
    """The consent URL of a grant, valid for ``consent.link_ttl`` (or a ConfigError)."""
    c = config.consent
    if not c.enabled:
        raise ConfigError("consent.public_url and consent.link_key_file: both are needed to "
                          "make consent links")
    assert c.link_key is not None
    if grant.grant_type != GrantType.AUTHORIZATION_CODE:
        raise TokendError(f"grant {grant.id} is a {grant.grant_type} grant: there is no user "
                          "to consent")
    return url(config, mint(c.link_key.value, grant.id, grant.consented_at,
                            c.link_ttl.after(now)))


def url(config: Config, token: str) -> str:
    return f"{config.consent.public_url}/consent/{token}"


def event_fields(config: Config, grant: Grant, event: str, now: datetime) -> dict[str, Any]:
    """``consent_url`` for the events that ask a person to act, when links can be made."""
    if event not in ("reconsent_due", "reconsent_required", events.REMINDER) \
            or not config.consent.enabled or grant.grant_type != GrantType.AUTHORIZATION_CODE:
        return {}
    return {"consent_url": link_for(config, grant, now)}
