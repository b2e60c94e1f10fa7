"""The configuration's frozen data types and the masking of the secrets they hold."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .durations import Duration
from .errors import ConfigError

ENV_PREFIX = "TOKEND_"
MIN_TIMEOUT = timedelta(seconds=1)
MAX_TIMEOUT = timedelta(minutes=5)
AuthMethod = Literal["client_secret_post", "client_secret_basic"]


@dataclass(frozen=True)
class Secret:
    """A secret string that never shows itself in a repr, a log or a traceback."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


MASK = "********"
# The user info as SQLAlchemy reads a database URL (a user without ':' or '/', a password
# up to the first '@'), so a password holding '/', '#' or '?' is still found; urlsplit
# ends the authority at those and would print the rest of the password as a path.
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@]*)"
                       r"(?::(?P<password>[^@]*))?@")


def mask_url(url: str, *, keep_user: bool = True) -> str:
    """``url`` with its password (user info or ``password=`` parameter) masked.

    ``keep_user=False`` masks the whole user info (an http URL may carry a token as
    the user name).
    """
    m = _USERINFO.match(url)
    if m:
        shown = m["user"] if keep_user else ""
        if not keep_user or m["password"] is not None:
            shown += (":" if keep_user else "") + MASK
        url = f"{m['scheme']}{shown}@{url[m.end():]}"
    head, sep, query = url.partition("?")
    if sep:
        query, hash_, fragment = query.partition("#")
        query = "&".join(
            f"{k}={MASK}" if k.lower() == "password" else f"{k}{eq}{v}"
            for k, eq, v in (item.partition("=") for item in query.split("&"))
        ) + hash_ + fragment
    return head + sep + query


def mask_webhook(url: str) -> str:
    """A webhook URL's path and query often are its secret: only where it goes is shown."""
    if not url:
        return url
    parts = urlsplit(mask_url(url, keep_user=False))
    if parts.path in ("", "/") and not parts.query and not parts.fragment:
        return parts.geturl()
    return f"{parts.scheme}://{parts.netloc}/{MASK}"


def _repr_masked(obj: Any, masks: Mapping[str, Callable[[str], str]]) -> str:
    """The dataclass repr, with the URL fields masked as ``check-config`` shows them."""
    shown = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in masks and isinstance(value, str):
            value = masks[f.name](value)
        if f.repr:
            shown.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(shown)})"


def _hide_user(url: str) -> str:
    return mask_url(url, keep_user=False)


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = field(default="sqlite:///tokend.db", repr=False)

    def __repr__(self) -> str:
        return f"DatabaseConfig(url={mask_url(self.url)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file (None: PostgreSQL, in memory, or a ``file:`` URI)."""
        if not self.is_sqlite or "///" not in self.url:
            return None
        path = self.url.split("///", 1)[1].split("?", 1)[0]
        if not path or path == ":memory:" or path.startswith("file:"):
            return None
        return Path(path)


@dataclass(frozen=True)
class ProviderConfig:
    authorize_url: str = "https://auth.justimmo.at/authorize"
    token_url: str = "https://auth.justimmo.at/access_token"
    user_url: str = "https://api.justimmo.at/oauth/user/current"
    refresh_token_ttl: Duration = Duration(months=1)
    # Requests/s to the token endpoint, for ALL replicas together on PostgreSQL (one
    # budget in the database, tokend.sharedlimit); per process on SQLite. 0 = unlimited.
    rate_limit: float = 5.0
    timeout: timedelta = timedelta(seconds=10)
    verify_tls: bool = True

    def __repr__(self) -> str:
        return _repr_masked(self, dict.fromkeys(("authorize_url", "token_url", "user_url"),
                                                _hide_user))


@dataclass(frozen=True)
class ClientConfig:
    name: str
    client_id: str
    client_secret: Secret
    auth_method: AuthMethod = "client_secret_post"
    redirect_uri: str | None = None
    client_credentials: bool = False

    def __repr__(self) -> str:
        return _repr_masked(self, {"redirect_uri": _hide_user})


@dataclass(frozen=True)
class ScheduleConfig:
    interval: timedelta = timedelta(seconds=60)
    refresh_before: timedelta = timedelta(hours=6)
    # The margin refresh_before shrinks to when the rate limit cannot afford it
    # (tokend.planner); well above the pass interval.
    refresh_margin_min: timedelta = timedelta(minutes=10)
    retry_max: timedelta = timedelta(minutes=15)
    reconsent_before: Duration = Duration(delta=timedelta(days=7))
    concurrency: int = 8
    max_grant_age: Duration | None = None
    batch_size: int = 200
    # From [consent] reminders: moments before the refresh token ends that send a
    # reconsent_reminder (kept here because the schedule's decisions need them).
    reminders: tuple[Duration, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"  # empty string disables the endpoint

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        return split_host_port(self.listen)


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["json", "console", "auto"] = "auto"
    level: str = "info"


@dataclass(frozen=True)
class EncryptionConfig:
    key_file: Path | None = None  # resolved path; None = no key configured
    keys: tuple[Secret, ...] = ()  # loaded keys, newest first (empty if the file is absent)
    # A systemd credential is read-only and provided by the operator: never created.
    from_credentials: bool = False


@dataclass(frozen=True)
class NotifyConfig:
    webhook_url: str = ""
    webhook_secret: Secret | None = None

    def __repr__(self) -> str:
        return _repr_masked(self, {"webhook_url": mask_webhook})


DEFAULT_REMINDERS = (Duration(delta=timedelta(days=7)), Duration(delta=timedelta(days=3)),
                     Duration(delta=timedelta(days=1)))
LINK_KEY_MIN = 32  # characters of the consent link key


@dataclass(frozen=True)
class ConsentConfig:
    """The re-consent web endpoint and its signed links (see ``tokend.consent``).

    Links can be made wherever ``public_url`` and ``link_key`` are set (``enabled``);
    ``listen`` additionally serves the pages from this process.
    """

    listen: str = ""  # HOST:PORT; empty: no endpoint in this process
    public_url: str = ""  # what users see, behind the operator's TLS reverse proxy
    link_key: Secret | None = None
    link_ttl: Duration = Duration(delta=timedelta(days=7))
    reminders: tuple[Duration, ...] = DEFAULT_REMINDERS

    @property
    def enabled(self) -> bool:
        return bool(self.public_url and self.link_key)

    @property
    def address(self) -> tuple[str, int] | None:
        return split_host_port(self.listen) if self.listen else None

    @property
    def redirect_uri(self) -> str:
        return self.public_url + "/callback"


@dataclass(frozen=True)
class ApiKey:
    """One bearer key of the token API; ``clients`` empty: every client (``[api] clients``
    still applies)."""

    key: Secret
    clients: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"ApiKey(key=********, clients={self.clients!r})"


@dataclass(frozen=True)
class ApiConfig:
    """The local token API (``tokend.api_server``); off while ``listen`` is empty.

    ``listen``: ``HOST:PORT`` on loopback (a bearer key from ``key_file`` is then
    required), or a Unix socket path (resolved at load time: a relative path under
    ``$RUNTIME_DIRECTORY``, else next to the config file). A socket handed over by
    systemd (``LISTEN_FDS``) is used instead, whatever ``listen`` says.
    ``clients``: the only clients whose tokens this API serves (empty: all).
    """

    listen: str = ""
    socket_path: Path | None = None  # set when ``listen`` is a path
    keys: tuple[ApiKey, ...] = ()
    clients: tuple[str, ...] = ()
    wait: timedelta = timedelta(seconds=20)  # an on-demand caller's longest wait

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    @property
    def address(self) -> tuple[str, int] | None:
        return None if not self.listen or self.socket_path else split_host_port(self.listen)


@dataclass(frozen=True)
class StateConfig:
    """Where tokend keeps what must outlive the process (owner locks, the spool).

    ``dir`` is resolved at load time: ``$STATE_DIRECTORY`` (systemd's
    ``StateDirectory=``), else ``[state] dir``, else the SQLite file's directory;
    None with PostgreSQL and neither set (``tokend run`` then refuses to start).
    ``origin`` says which of those it came from, for ``check-config``.
    """

    dir: Path | None = None
    origin: str = "unset"


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = DatabaseConfig()
    provider: ProviderConfig = ProviderConfig()
    clients: Mapping[str, ClientConfig] = field(default_factory=dict)
    schedule: ScheduleConfig = ScheduleConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    notify: NotifyConfig = NotifyConfig()
    state: StateConfig = StateConfig()
    source: Path | None = None
    consent: ConsentConfig = ConsentConfig()
    api: ApiConfig = ApiConfig()

    def state_dir(self) -> Path:
        """The state directory, or a ConfigError saying how to set one."""
        if self.state.dir is None:
            raise ConfigError(
                "state.dir: required with PostgreSQL outside systemd (set [state] dir, "
                "or $STATE_DIRECTORY as systemd's StateDirectory= does)")
        return self.state.dir

    def client(self, name: str) -> ClientConfig:
        try:
            return self.clients[name]
        except KeyError:
            known = ", ".join(sorted(self.clients)) or "none configured"
            raise ConfigError(f"unknown client {name!r} (clients: {known})") from None

    def client_by_id(self, client_id: str) -> ClientConfig | None:
        return next((c for c in self.clients.values() if c.client_id == client_id), None)


def split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port must be a number, not {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not host.replace("-", "").replace(".", "").isalnum():
                raise ValueError(f"invalid host {host!r}") from None
    return host, number
