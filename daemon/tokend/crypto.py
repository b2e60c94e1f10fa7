"""Tokens at rest: Fernet (AES-128-CBC + HMAC-SHA256) with several keys.

The newest key encrypts; every configured key decrypts, so a rotation is: add a key on
top of the key file, restart, run ``tokend keys rotate``, then drop the old key.
Encrypted values carry a prefix so rows written in clear (before encryption, or by an
older version) are recognised and re-encrypted by ``keys rotate``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .config import Config, Secret, read_keys
from .errors import ConfigError, DecryptError

PREFIX = "enc:v1:"


class Cipher:
    def __init__(self, keys: tuple[Secret, ...]) -> None:
        if not keys:
            raise ConfigError("encryption: no key configured")
        fernets = []
        for number, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key.value.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                raise ConfigError(
                    f"encryption.key_file: key {number} is not a Fernet key "
                    "(32 url-safe base64-encoded bytes; make one with `tokend keys generate`)"
                ) from None
        self.keys = keys
        self._newest = fernets[0]
        self._all = MultiFernet(fernets)

    def encrypt(self, value: str) -> str:
        return PREFIX + self._newest.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, value: str, *, grant_id: int | None = None) -> str:
        if not value.startswith(PREFIX):
            return value  # stored in clear before encryption was on; `keys rotate` fixes it
        try:
            return self._all.decrypt(value[len(PREFIX):].encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            where = f"grant {grant_id}" if grant_id is not None else "a stored value"
            raise DecryptError(
                f"cannot decrypt the tokens of {where} with any configured key "
                "(wrong or missing key in encryption.key_file?)"
            ) from None

    def needs_rotation(self, value: str) -> bool:
        """True if ``value`` is in clear or not encrypted with the newest key."""
        if not value.startswith(PREFIX):
            return True
        try:
            self._newest.decrypt(value[len(PREFIX):].encode("ascii"))
        except InvalidToken:
            return True
        return False

    def rotate(self, value: str, *, grant_id: int | None = None) -> str:
        return self.encrypt(self.decrypt(value, grant_id=grant_id))


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def create_key_file(path: Path) -> None:
    """Create ``path`` with one new key, mode 0600, never overwriting an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(generate_key() + "\n")


def cipher_for(config: Config, *, create: bool) -> Cipher:
    """The cipher of this configuration.

    ``create``: a default SQLite set-up makes its own key file on first use, so nobody
    stores clear tokens by accident. A PostgreSQL set-up must bring a key (several
    replicas must share it), and refuses to start without one.
    """
    enc = config.encryption
    if enc.keys:
        return Cipher(enc.keys)
    if enc.key_file is None:
        raise ConfigError("encryption.key_file: is required (tokens are always stored encrypted)")
    if create and config.database.is_sqlite and not enc.from_credentials:
        try:
            create_key_file(enc.key_file)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"encryption.key_file: cannot create {enc.key_file}: {exc.strerror}"
            ) from None
        return Cipher(read_keys(enc.key_file))
    raise ConfigError(
        f"encryption.key_file: {enc.key_file} does not exist; create it with "
        f"`tokend keys generate > {enc.key_file}` (mode 0600)"
    )
