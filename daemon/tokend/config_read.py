"""Typed access to the raw TOML tables: every failure names ``section.key``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config_types import (
    Secret,
    _hide_user,
)
from .durations import Duration, format_timedelta, parse_timedelta
from .errors import ConfigError


class _EnvValue(str):
    """A string from the environment; coerced to the key's type when read."""


def _check_names(table: dict[str, Any], where: str = "") -> None:
    """Key names end up in one-line messages, metric labels and CLI arguments."""
    for key, value in table.items():
        if not key.isprintable():
            raise ConfigError(f"{where or 'config'}: invalid key name {key!r}")
        if isinstance(value, dict):
            _check_names(value, f"{where}.{key}" if where else key)


class _Reader:
    """Typed access to the raw tables; every failure names ``section.key``."""

    def __init__(self, raw: dict[str, Any], source: Path | None, env: Mapping[str, str],
                 sections: Mapping[str, set[str]]):
        self.raw = raw
        self.source = source
        self.env = env
        for section, keys in sections.items():
            table = raw.get(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}]: must be a table")
            for key in table:
                if key not in keys:
                    raise ConfigError(f"{section}.{key}: unknown key")

    def _get(self, section: str, key: str, table: dict[str, Any] | None) -> Any:
        t = self.raw.get(section, {}) if table is None else table
        return t.get(key)

    def parse(self, section: str, key: str, fn: Callable[[str], Any], value: str) -> Any:
        try:
            return fn(value)
        except ValueError as exc:
            raise ConfigError(f"{section}.{key}: {exc}") from None

    def string(self, section: str, key: str, default: str,
               table: dict[str, Any] | None = None, *, secret: bool = False) -> str:
        value = self._get(section, key, table)
        if value is None:
            return default
        if isinstance(value, bool | int | float) and not isinstance(value, str):
            shown = "a number or boolean" if secret else repr(value)
            raise ConfigError(f"{section}.{key}: must be a string, not {shown}")
        if not isinstance(value, str):
            raise ConfigError(f"{section}.{key}: must be a string")
        return value.strip()

    def url(self, section: str, key: str, default: str, *, allow_empty: bool = False,
            table: dict[str, Any] | None = None) -> str:
        value = self.string(section, key, default, table)
        if not value and allow_empty:
            return ""
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # ValueError if not a number in 0-65535
        except ValueError:
            ok = False
        if not ok or any(ch.isspace() for ch in value):
            raise ConfigError(f"{section}.{key}: must be an http(s) URL, "
                              f"not {_hide_user(value)!r}")
        return value

    def boolean(self, section: str, key: str, default: bool,
                table: dict[str, Any] | None = None) -> bool:
        value = self._get(section, key, table)
        if value is None:
            return default
        if isinstance(value, _EnvValue):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{section}.{key}: must be true or false, not {value!r}")

    def number(self, section: str, key: str, default: float, *, minimum: float | None = None,
               maximum: float | None = None, integer: bool = False) -> float:
        value = self._get(section, key, None)
        if value is None:
            return default
        if isinstance(value, _EnvValue):
            try:
                value = int(value) if integer else float(value)
            except (ValueError, OverflowError):
                kind = "a whole number" if integer else "a number"
                raise ConfigError(f"{section}.{key}: must be {kind}, not {str(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{section}.{key}: must be a number, not {value!r}")
        if integer and (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{section}.{key}: must be a whole number, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{key}: must be a finite number")
        shown = str(value) if len(str(value)) <= 20 else str(value)[:17] + "..."
        if minimum is not None and value < minimum:
            raise ConfigError(f"{section}.{key}: must be at least {minimum:g}, not {shown}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{section}.{key}: must be at most {maximum:g}, not {shown}")
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            raise ConfigError(f"{section}.{key}: {shown} is too large") from None

    def duration(self, section: str, key: str, default: Duration, *,
                 positive: bool = False) -> Duration:
        value = self._get(section, key, None)
        if value is None:
            return default
        d: Duration = self.parse(section, key, Duration.parse, value)
        if positive and d.is_zero:
            raise ConfigError(f"{section}.{key}: must be longer than zero")
        return d

    def timedelta(self, section: str, key: str, default: timedelta, *,
                  positive: bool = False, minimum: timedelta | None = None,
                  maximum: timedelta | None = None) -> timedelta:
        value = self._get(section, key, None)
        if value is None:
            return default
        d: timedelta = self.parse(section, key, parse_timedelta, value)
        if positive and d <= timedelta(0):
            raise ConfigError(f"{section}.{key}: must be longer than zero")
        if minimum is not None and d < minimum:
            raise ConfigError(f"{section}.{key}: must be at least {format_timedelta(minimum)}, "
                              f"not {format_timedelta(d)}")
        if maximum is not None and d > maximum:
            raise ConfigError(f"{section}.{key}: must be at most {format_timedelta(maximum)}, "
                              f"not {format_timedelta(d)}")
        return d

    def locate(self, name: str) -> Path:
        """A bare file name is a systemd credential, else relative to the config file."""
        path = Path(name).expanduser()
        if path.is_absolute():
            return path
        creds = self.env.get("CREDENTIALS_DIRECTORY")
        if len(path.parts) == 1 and creds:
            return Path(creds) / path
        if self.source is not None:
            return self.source.parent / path
        return path

    def secret(self, section: str, key: str, *,
               table: dict[str, Any] | None = None) -> Secret | None:
        inline = self.string(section, key, "", table, secret=True)
        file_name = self.string(section, f"{key}_file", "", table)
        if inline and file_name:
            raise ConfigError(f"{section}.{key}: set either {key} or {key}_file, not both")
        if file_name:
            path = self.locate(file_name)
            try:
                text = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                raise ConfigError(f"{section}.{key}_file: {path} does not exist") from None
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or (
                    "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc))
                raise ConfigError(
                    f"{section}.{key}_file: {path} cannot be read: {reason}") from None
            if not text:
                raise ConfigError(f"{section}.{key}_file: {path} is empty")
            return Secret(text)
        return Secret(inline) if inline else None


def read_keys(path: Path) -> tuple[Secret, ...]:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "not ASCII text"
        raise ConfigError(f"encryption.key_file: {path} cannot be read: {reason}") from None
    keys = tuple(Secret(line.strip()) for line in lines
                 if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ConfigError(f"encryption.key_file: {path} holds no key")
    return keys


def _database_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("sqlite://", "postgresql+psycopg://")):
        return url
    raise ConfigError(
        "database.url: must start with sqlite:/// or postgresql+psycopg://, "
        f"not {url.split(':', maxsplit=1)[0]!r}"
    )
