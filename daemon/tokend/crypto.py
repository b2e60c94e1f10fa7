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
    """Create ``path`` with one new key, mode 0600, never overwriting an existing file.

    Durable before it is used: a power cut after the first token was encrypted with a
    key that never reached the disk would leave every token unreadable. The key is
    written and fsynced under a temporary name, then linked into place (atomic, and
    fails if another process was first), then the directory is fsynced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, (generate_key() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _holds_data(db: Path) -> bool:
    """An SQLite file (or its write-ahead log) that may hold encrypted tokens."""
    try:
        return any(p.stat().st_size > 0
                   for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    except OSError:
        return True  # cannot tell: never risk a second key


def cipher_for(config: Config, *, create: bool) -> Cipher:
    """The cipher of this configuration.

    ``create``: a default SQLite set-up makes its own key file together with a NEW
    database, so nobody stores clear tokens by accident. Beside an existing database a
    missing key is an error: a new key could not read its tokens, and new grants under
    a second key would hide that the first one is lost. A PostgreSQL set-up must bring
    a key (several replicas must share it), and refuses to start without one.
    """
    enc = config.encryption
    if enc.keys:
        return Cipher(enc.keys)
    if enc.key_file is None:
        raise ConfigError("encryption.key_file: is required (tokens are always stored encrypted)")
    if enc.key_file.exists():  # created since the configuration was loaded
        return Cipher(read_keys(enc.key_file))
    db = config.database.sqlite_path
    if db is not None and _holds_data(db):
        raise ConfigError(
            f"encryption.key_file: {enc.key_file} does not exist, but the database {db} "
            "does: restore the key file its tokens were encrypted with (a new key is "
            "created only together with a new database)")
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
