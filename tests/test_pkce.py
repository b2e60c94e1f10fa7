"""PKCE (RFC 7636): the verifier/challenge pair of both authorization-code flows."""

from __future__ import annotations

import base64
import hashlib
import string

import pytest

from tokend import pkce

UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


def test_rfc_7636_appendix_b() -> None:
    assert pkce.challenge_for("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") \
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert pkce.METHOD == "S256"


@pytest.mark.parametrize("nbytes, length", [(32, 43), (33, 44), (64, 86), (96, 128)])
def test_pairs_are_fresh_well_formed_and_match(nbytes: int, length: int) -> None:
    pairs = [pkce.new_pair(nbytes) for _ in range(200)]
    assert len({p.verifier for p in pairs}) == len(pairs)
    for p in pairs:
        assert len(p.verifier) == length and set(p.verifier) <= UNRESERVED
        digest = hashlib.sha256(p.verifier.encode("ascii")).digest()
        assert p.challenge == base64.urlsafe_b64encode(digest).decode().rstrip("=")
        assert len(p.challenge) == 43 and "=" not in p.challenge
        assert p.method == "S256" and pkce.is_verifier(p.verifier)
        assert p.verifier not in repr(p)


@pytest.mark.parametrize("nbytes", [0, 31, 97])
def test_pair_lengths_outside_rfc_7636_are_refused(nbytes: int) -> None:
    with pytest.raises(ValueError):
        pkce.new_pair(nbytes)


@pytest.mark.parametrize("verifier, ok", [
    ("a" * 43, True), ("A1-._~" * 20 + "abcdefgh", True), ("a" * 42, False),
    ("a" * 129, False), ("a" * 42 + "+", False), ("a" * 42 + "=", False),
    ("a" * 42 + "\n", False), ("é" * 43, False), ("", False),
])
def test_verifier_format(verifier: str, ok: bool) -> None:
    assert pkce.is_verifier(verifier) is ok
    if ok:
        assert len(pkce.challenge_for(verifier)) == 43
    else:
        with pytest.raises(ValueError) as info:
            pkce.challenge_for(verifier)
        assert verifier not in str(info.value) or not verifier
