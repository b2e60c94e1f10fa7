"""PKCE (RFC 7636): the code verifier and its S256 challenge, for both consent flows.

The authorize request carries ``code_challenge`` (with ``code_challenge_method=S256``),
the code exchange carries the verifier: a code intercepted on its way back (a browser
extension, a proxy log, another app on the loopback port) is useless without it.
django-oauth-toolkit 2.x refuses an authorization-code flow without it by default.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Final

METHOD: Final = "S256"
# RFC 7636 4.1: 43 to 128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
_VERIFIER: Final = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_DEFAULT_BYTES: Final = 32  # 256 bits of entropy, as RFC 7636 7.1 recommends: 43 characters


@dataclass(frozen=True)
class Pkce:
    verifier: str = field(repr=False)  # a secret until the code is exchanged
    challenge: str
    method: str = METHOD


def is_verifier(value: str) -> bool:
    return _VERIFIER.fullmatch(value) is not None


def challenge_for(verifier: str) -> str:
    """BASE64URL(SHA256(ASCII(verifier))) without padding (RFC 7636 4.2, S256)."""
    if not is_verifier(verifier):
        raise ValueError("a code verifier is 43 to 128 unreserved characters (RFC 7636 4.1)")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pair(nbytes: int = _DEFAULT_BYTES) -> Pkce:
    """A fresh verifier from ``secrets`` and its challenge. ``token_urlsafe`` yields only
    ``[A-Za-z0-9_-]`` (unreserved); 32 to 96 bytes make 43 to 128 characters."""
    if not 32 <= nbytes <= 96:
        raise ValueError("nbytes must be 32 to 96 (43 to 128 characters)")
    verifier = secrets.token_urlsafe(nbytes)
    return Pkce(verifier, challenge_for(verifier))
