"""Typed access to the raw TOML tables, and the readers of single keys that
:data:`tokend.config_keys._KEYS` names: every failure names ``section.key``."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config_types import (
    DEFAULT_REMINDERS,
    LINK_KEY_MIN,
    LoggingConfig,
    ScheduleConfig,
    Secret,
    _hide_user,
    split_host_port,
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


# ------------------------------------------------------- the readers of single keys

Read = Callable[["_Reader", str, str], Any]
_LEVELS = {"debug", "info", "warning", "error", "critical"}


def _default(cls: type, key: str) -> Any:
    return getattr(cls, key)  # a dataclass keeps each field's default on the class


def _url(cls: type) -> Read:
    return lambda r, s, k: r.url(s, k, _default(cls, k))


def _timedelta(cls: type, **bounds: Any) -> Read:
    return lambda r, s, k: r.timedelta(s, k, _default(cls, k), **bounds)


def _duration(cls: type, **bounds: Any) -> Read:
    return lambda r, s, k: r.duration(s, k, _default(cls, k), **bounds)


def _number(cls: type, **bounds: Any) -> Read:
    return lambda r, s, k: r.number(s, k, _default(cls, k), **bounds)


def _integer(cls: type, **bounds: Any) -> Read:
    return lambda r, s, k: int(r.number(s, k, _default(cls, k), integer=True, **bounds))


def _max_grant_age(r: _Reader, section: str, key: str) -> Duration | None:
    text = r.string(section, key, "")
    if not text:
        return None
    max_age: Duration = r.parse(section, key, Duration.parse, text)
    if max_age.is_zero:
        raise ConfigError("schedule.max_grant_age: must be longer than zero "
                          "(leave it empty for no limit)")
    return max_age


def _refresh_margin_min(r: _Reader, section: str, key: str) -> timedelta:
    # Unset: 10 minutes, or refresh_before when that is shorter (never an error).
    before = r.timedelta(section, "refresh_before", ScheduleConfig.refresh_before,
                         positive=True)
    return r.timedelta(section, key, min(ScheduleConfig.refresh_margin_min, before),
                       positive=True)


def _listen(cls: type) -> Read:
    def read(r: _Reader, section: str, key: str) -> str:
        listen: str = r.string(section, key, _default(cls, key))
        if listen:
            r.parse(section, key, split_host_port, listen)
        return listen
    return read


def _log_format(r: _Reader, section: str, key: str) -> str:
    fmt = r.string(section, key, LoggingConfig.format)
    if fmt not in ("json", "console", "auto"):
        raise ConfigError(f"logging.format: must be json, console or auto, not {fmt!r}")
    return fmt


def _log_level(r: _Reader, section: str, key: str) -> str:
    level = r.string(section, key, LoggingConfig.level).lower()
    if level not in _LEVELS:
        raise ConfigError(f"logging.level: must be one of {', '.join(sorted(_LEVELS))}, "
                          f"not {level!r}")
    return level


def _public_url(r: _Reader, section: str, key: str) -> str:
    public_url: str = r.url(section, key, "", allow_empty=True).rstrip("/")
    parts = urlsplit(public_url)
    if parts.query or parts.fragment:
        raise ConfigError("consent.public_url: must not have a query or fragment")
    return public_url


def _link_key(r: _Reader, section: str, key: str) -> Secret | None:
    secret = r.secret(section, key)
    if secret is not None and len(secret.value) < LINK_KEY_MIN:
        raise ConfigError(f"consent.link_key: too short (at least {LINK_KEY_MIN} characters, "
                          "e.g. from `openssl rand -base64 32`)")
    return secret


def _reminders(r: _Reader, section: str, key: str) -> tuple[Duration, ...]:
    raw = r.raw.get(section, {}).get(key)
    if raw is None:
        return DEFAULT_REMINDERS
    items: list[Any]
    if isinstance(raw, _EnvValue):
        items = [x for x in (part.strip() for part in raw.split(",")) if x]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ConfigError('consent.reminders: must be a list of durations like ["3d", "1d"]')
    parsed: set[Duration] = set()
    for item in items:
        d: Duration = r.parse(section, key, Duration.parse, item)
        if d.is_zero:
            raise ConfigError("consent.reminders: each must be longer than zero")
        parsed.add(d)
    return tuple(sorted(parsed, key=lambda d: (d.months, d.delta), reverse=True))


def _state_from_env(env: Mapping[str, str]) -> str:
    # systemd passes a colon-separated list when StateDirectory= names several.
    return (env.get("STATE_DIRECTORY") or "").split(":")[0].strip()


def _state_dir(r: _Reader, section: str, key: str) -> Path | None:
    from_env = _state_from_env(r.env)
    if from_env:
        return Path(from_env).absolute()
    configured = r.string(section, key, "")
    if not configured:
        return None  # the SQLite file's directory, if any: see _state
    path = Path(configured).expanduser()
    if not path.is_absolute() and r.source is not None:
        path = r.source.parent / path
    return path.absolute()


def _key_file(r: _Reader, section: str, key: str) -> Path | None:
    name = r.string(section, key, "tokend-key")
    if not name:
        return None
    path = r.locate(name)
    try:
        path.exists()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encryption.key_file: {name!r} is not a usable path: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return path


_LOOPBACK = ("localhost",)


def _is_socket(listen: str) -> bool:
    return bool(listen) and ("/" in listen or ":" not in listen)


def _api_listen(r: _Reader, section: str, key: str) -> str:
    listen: str = r.string(section, key, "")
    if listen and not _is_socket(listen):
        host, _port = r.parse(section, key, split_host_port, listen)
        try:
            loopback = host in _LOOPBACK or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"api.listen: {host} is not a loopback address (tokens are "
                              "served to this host only; use 127.0.0.1:PORT or a socket path)")
    return listen


def _api_clients(r: _Reader, section: str, key: str) -> tuple[str, ...]:
    raw = r.raw.get(section, {}).get(key, [])
    if isinstance(raw, _EnvValue):
        raw = [x.strip() for x in raw.split(",") if x.strip()]
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ConfigError('api.clients: must be a list of client names like ["main"]')
    return tuple(raw)
