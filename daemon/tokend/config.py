"""The configuration: TOML file + ``TOKEND_SECTION__KEY`` environment, validated once.

``load_config`` is the only way in. It returns one frozen :class:`Config` that is passed
down; every problem is a :class:`~tokend.errors.ConfigError` whose message names the key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .durations import Duration, format_timedelta, parse_timedelta
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


# --------------------------------------------------------------------------- loading

Read = Callable[["_Reader", str, str], Any]


@dataclass(frozen=True)
class _Key:
    section: str
    key: str
    show: Callable[[Config], str]
    # None: read by its section's function (database, encryption, consent, api, state),
    # whose keys depend on each other or on files.
    read: Read | None = None
    aliases: tuple[str, ...] = ()


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


def _listen(r: _Reader, section: str, key: str) -> str:
    listen = r.string(section, key, MetricsConfig.listen)
    if listen:
        r.parse(section, key, split_host_port, listen)
    return listen


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


def _q(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mask(secret: object) -> str:
    return _q("********" if secret else "")


# Every key of a [section] once: its name, the other name it may be given by (the
# *_file form of a secret) and its check-config value (masked). The reading of each key
# (reader, default from the dataclass, bounds) is in _build and the section functions it
# calls, in this order; cross-key checks follow the keys they compare.
_KEYS: tuple[_Key, ...] = (
    _Key("database", "url", lambda c: _q(mask_url(c.database.url))),
    _Key("provider", "authorize_url", lambda c: _q(_hide_user(c.provider.authorize_url)),
         _url(ProviderConfig)),
    _Key("provider", "token_url", lambda c: _q(_hide_user(c.provider.token_url)),
         _url(ProviderConfig)),
    _Key("provider", "user_url", lambda c: _q(_hide_user(c.provider.user_url)),
         _url(ProviderConfig)),
    _Key("provider", "refresh_token_ttl", lambda c: _q(str(c.provider.refresh_token_ttl)),
         _duration(ProviderConfig, positive=True)),
    _Key("provider", "rate_limit", lambda c: _q(c.provider.rate_limit),
         _number(ProviderConfig, minimum=0)),
    # Below 1 s a slow but healthy provider times out after it has already rotated the
    # refresh token (the answer is lost); the lease is six timeouts long, and a stop
    # waits for calls in flight, so the timeout has an upper bound too.
    _Key("provider", "timeout", lambda c: _q(format_timedelta(c.provider.timeout)),
         _timedelta(ProviderConfig, positive=True, minimum=MIN_TIMEOUT, maximum=MAX_TIMEOUT)),
    _Key("provider", "verify_tls", lambda c: _q(c.provider.verify_tls),
         lambda r, s, k: r.boolean(s, k, ProviderConfig.verify_tls)),
    _Key("schedule", "interval", lambda c: _q(format_timedelta(c.schedule.interval)),
         _timedelta(ScheduleConfig, positive=True)),
    _Key("schedule", "refresh_before",
         lambda c: _q(format_timedelta(c.schedule.refresh_before)),
         _timedelta(ScheduleConfig, positive=True)),
    _Key("schedule", "refresh_margin_min",
         lambda c: _q(format_timedelta(c.schedule.refresh_margin_min)), _refresh_margin_min),
    _Key("schedule", "retry_max", lambda c: _q(format_timedelta(c.schedule.retry_max)),
         _timedelta(ScheduleConfig, positive=True)),
    _Key("schedule", "reconsent_before", lambda c: _q(str(c.schedule.reconsent_before)),
         _duration(ScheduleConfig)),
    _Key("schedule", "concurrency", lambda c: str(c.schedule.concurrency),
         _integer(ScheduleConfig, minimum=1, maximum=256)),
    _Key("schedule", "max_grant_age",
         lambda c: _q(str(c.schedule.max_grant_age) if c.schedule.max_grant_age else ""),
         _max_grant_age),
    _Key("schedule", "batch_size", lambda c: str(c.schedule.batch_size),
         _integer(ScheduleConfig, minimum=1, maximum=10000)),
    _Key("metrics", "listen", lambda c: _q(c.metrics.listen), _listen),
    _Key("logging", "format", lambda c: _q(c.logging.format), _log_format),
    _Key("logging", "level", lambda c: _q(c.logging.level), _log_level),
    _Key("encryption", "key_file",
         lambda c: f"{_q(str(c.encryption.key_file or ''))}"
                   f"  # {len(c.encryption.keys)} key(s) loaded"),
    _Key("state", "dir",
         lambda c: f"{_q(str(c.state.dir or ''))}  # "
                   + (f"from {c.state.origin}" if c.state.dir
                      else "not set: `tokend run` needs it with PostgreSQL")),
    _Key("notify", "webhook_url", lambda c: _q(mask_webhook(c.notify.webhook_url)),
         lambda r, s, k: r.url(s, k, NotifyConfig.webhook_url, allow_empty=True)),
    _Key("notify", "webhook_secret", lambda c: _mask(c.notify.webhook_secret),
         lambda r, s, k: r.secret(s, k), aliases=("webhook_secret_file",)),
    _Key("consent", "listen", lambda c: _q(c.consent.listen)),
    _Key("consent", "public_url", lambda c: _q(_hide_user(c.consent.public_url))),
    _Key("consent", "link_key", lambda c: _mask(c.consent.link_key),
         aliases=("link_key_file",)),
    _Key("consent", "link_ttl", lambda c: _q(str(c.consent.link_ttl))),
    _Key("consent", "reminders",
         lambda c: "[" + ", ".join(_q(str(d)) for d in c.consent.reminders) + "]"),
    _Key("api", "listen",
         lambda c: _q(c.api.listen)
         + (f"  # socket {c.api.socket_path}" if c.api.socket_path else "")),
    _Key("api", "key_file",
         lambda c: f"{_mask(c.api.keys)}  # {len(c.api.keys)} key(s) loaded"),
    _Key("api", "clients", lambda c: "[" + ", ".join(_q(n) for n in c.api.clients) + "]"),
    _Key("api", "wait", lambda c: _q(str(int(c.api.wait.total_seconds())) + "s")),
)
_SECTIONS: dict[str, set[str]] = {}
for _k in _KEYS:
    _SECTIONS.setdefault(_k.section, set()).update((_k.key, *_k.aliases))


def _section(r: _Reader, section: str) -> dict[str, Any]:
    """The keys of a section that the table reads, by name (= the dataclass's fields)."""
    return {k.key: k.read(r, k.section, k.key) for k in _KEYS
            if k.section == section and k.read is not None}
_CLIENT_KEYS = {
    "client_id", "client_secret", "client_secret_file", "auth_method", "redirect_uri",
    "client_credentials",
}
_LEVELS = {"debug", "info", "warning", "error", "critical"}


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the validated configuration from a TOML file (optional) and the environment."""
    env = os.environ if env is None else env
    if path is None and env.get("TOKEND_CONFIG"):
        path = env["TOKEND_CONFIG"]
    raw: dict[str, Any] = {}
    source: Path | None = None
    if path is not None:
        source = Path(path)
        try:
            raw = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {source} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {source} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    _apply_env(raw, env)
    return _build(raw, source, env)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == "TOKEND_CONFIG" or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if any(not p for p in parts):
            raise ConfigError(f"environment variable {name}: empty name part")
        if parts[0] != "clients":
            if parts[0] not in _SECTIONS:
                raise ConfigError(f"environment variable {name}: unknown section [{parts[0]}]")
            if len(parts) != 2 or parts[1] not in _SECTIONS[parts[0]]:
                raise ConfigError(f"environment variable {name}: "
                                  f"{'.'.join(parts)}: unknown key")
        node = raw
        for lowered in parts[:-1]:
            # A client table may be spelled in any case in the file ([clients.Main]).
            part = next((k for k in node if k.lower() == lowered), lowered)
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: {part} is not a table")
            node = child
        key = parts[-1]
        # The environment overrides the file: a secret given there replaces the file's
        # value in either spelling (client_secret vs client_secret_file).
        twin = key[:-len("_file")] if key.endswith("_file") else f"{key}_file"
        if twin in node and not isinstance(node[twin], _EnvValue):
            del node[twin]
        node[key] = _EnvValue(value)


class _EnvValue(str):
    """A string from the environment; coerced to the key's type when read."""


def _check_names(table: dict[str, Any], where: str = "") -> None:
    """Key names end up in one-line messages, metric labels and CLI arguments."""
    for key, value in table.items():
        if not key.isprintable():
            raise ConfigError(f"{where or 'config'}: invalid key name {key!r}")
        if isinstance(value, dict):
            _check_names(value, f"{where}.{key}" if where else key)


def _build(raw: dict[str, Any], source: Path | None, env: Mapping[str, str]) -> Config:
    _check_names(raw)
    for section in raw:
        if section not in _SECTIONS and section != "clients":
            raise ConfigError(f"unknown section [{section}]")
    r = _Reader(raw, source, env)

    db_url = r.string("database", "url", DatabaseConfig.url)
    database = DatabaseConfig(url=_database_url(db_url))

    provider = ProviderConfig(**_section(r, "provider"))
    schedule = ScheduleConfig(**_section(r, "schedule"))
    if schedule.refresh_margin_min > schedule.refresh_before:
        raise ConfigError(
            f"schedule.refresh_margin_min ({format_timedelta(schedule.refresh_margin_min)}) "
            f"must not be longer than schedule.refresh_before "
            f"({format_timedelta(schedule.refresh_before)})")
    if "refresh_margin_min" in (raw.get("schedule") or {}) \
            and schedule.refresh_margin_min < schedule.interval * 2:
        raise ConfigError(
            f"schedule.refresh_margin_min ({format_timedelta(schedule.refresh_margin_min)}) "
            f"must be at least twice schedule.interval ({format_timedelta(schedule.interval)}):"
            f" a grant is only seen once per pass")
    if schedule.retry_max < schedule.interval:
        raise ConfigError(
            f"schedule.retry_max ({format_timedelta(schedule.retry_max)}) must not be shorter "
            f"than schedule.interval ({format_timedelta(schedule.interval)})"
        )
    metrics = MetricsConfig(**_section(r, "metrics"))
    logging_cfg = LoggingConfig(**_section(r, "logging"))

    key_name = r.string("encryption", "key_file", "tokend-key")
    encryption = EncryptionConfig()
    if key_name:
        key_path = r.locate(key_name)
        keys: tuple[Secret, ...] = ()
        try:
            exists = key_path.exists()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"encryption.key_file: {key_name!r} is not a usable path: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if exists:
            keys = read_keys(key_path)
        creds = env.get("CREDENTIALS_DIRECTORY")
        encryption = EncryptionConfig(
            key_file=key_path, keys=keys,
            from_credentials=bool(creds) and key_path.parent == Path(str(creds)))

    notify = NotifyConfig(**_section(r, "notify"))

    consent = _consent(r)
    schedule = replace(schedule, reminders=consent.reminders)

    clients = _clients(r, raw.get("clients", {}))
    return Config(
        database=database, provider=provider, clients=clients, schedule=schedule,
        metrics=metrics, logging=logging_cfg, encryption=encryption, notify=notify,
        state=_state(r, database, env), source=source, consent=consent,
        api=_api(r, clients),
    )


def _consent(r: _Reader) -> ConsentConfig:
    listen = r.string("consent", "listen", "")
    if listen:
        r.parse("consent", "listen", split_host_port, listen)
    public_url = r.url("consent", "public_url", "", allow_empty=True).rstrip("/")
    parts = urlsplit(public_url)
    if parts.query or parts.fragment:
        raise ConfigError("consent.public_url: must not have a query or fragment")
    key = r.secret("consent", "link_key")
    if key is not None and len(key.value) < LINK_KEY_MIN:
        raise ConfigError(f"consent.link_key: too short (at least {LINK_KEY_MIN} characters, "
                          "e.g. from `openssl rand -base64 32`)")
    if listen and not public_url:
        raise ConfigError("consent.public_url: is required when consent.listen is set "
                          "(the address users reach through the reverse proxy)")
    if listen and key is None:
        raise ConfigError("consent.link_key_file: is required when consent.listen is set "
                          "(a secret of at least 32 characters; never created by tokend)")
    ttl = r.duration("consent", "link_ttl", ConsentConfig.link_ttl, positive=True)
    raw = r.raw.get("consent", {}).get("reminders")
    reminders: tuple[Duration, ...] = DEFAULT_REMINDERS
    if raw is not None:
        items: list[Any]
        if isinstance(raw, _EnvValue):
            items = [x for x in (part.strip() for part in raw.split(",")) if x]
        elif isinstance(raw, list):
            items = raw
        else:
            raise ConfigError('consent.reminders: must be a list of durations like ["3d", "1d"]')
        parsed: set[Duration] = set()
        for item in items:
            d: Duration = r.parse("consent", "reminders", Duration.parse, item)
            if d.is_zero:
                raise ConfigError("consent.reminders: each must be longer than zero")
            parsed.add(d)
        reminders = tuple(sorted(parsed, key=lambda d: (d.months, d.delta), reverse=True))
    return ConsentConfig(listen=listen, public_url=public_url, link_key=key, link_ttl=ttl,
                         reminders=reminders)


_LOOPBACK = ("localhost",)


def _api(r: _Reader, clients: Mapping[str, ClientConfig]) -> ApiConfig:
    listen = r.string("api", "listen", "")
    raw = r.raw.get("api", {}).get("clients", [])
    if isinstance(raw, _EnvValue):
        raw = [x.strip() for x in raw.split(",") if x.strip()]
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ConfigError('api.clients: must be a list of client names like ["main"]')
    for name in raw:
        if name not in clients:
            raise ConfigError(f"api.clients: unknown client {name!r}")
    wait = r.timedelta("api", "wait", ApiConfig.wait, positive=True,
                       maximum=timedelta(minutes=5))
    key_name = r.string("api", "key_file", "")
    keys = read_api_keys(r.locate(key_name), clients) if key_name else ()
    socket_path: Path | None = None
    if listen and ("/" in listen or ":" not in listen):
        path = Path(listen).expanduser()
        if not path.is_absolute():
            runtime = (r.env.get("RUNTIME_DIRECTORY") or "").split(":")[0].strip()
            base = Path(runtime) if runtime else (
                r.source.parent if r.source is not None else Path.cwd())
            path = base / path
        socket_path = path.absolute()
    elif listen:
        host, _port = r.parse("api", "listen", split_host_port, listen)
        try:
            loopback = host in _LOOPBACK or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"api.listen: {host} is not a loopback address (tokens are "
                              "served to this host only; use 127.0.0.1:PORT or a socket path)")
        if not keys:
            raise ConfigError("api.key_file: is required when api.listen is HOST:PORT "
                              "(one bearer key per line; never created by tokend)")
    return ApiConfig(listen=listen, socket_path=socket_path, keys=keys,
                     clients=tuple(raw), wait=wait)


def read_api_keys(path: Path, clients: Mapping[str, ClientConfig]) -> tuple[ApiKey, ...]:
    """``KEY`` or ``KEY client[,client...]`` per line; ``#`` comments."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "not ASCII text"
        raise ConfigError(f"api.key_file: {path} cannot be read: {reason}") from None
    keys: list[ApiKey] = []
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts[0]) < 16 or len(parts) > 2:
            raise ConfigError(f"api.key_file: {path} line {number}: expected a key of at "
                              "least 16 characters, then optionally client names "
                              "separated by commas")
        names = tuple(n for n in parts[1].split(",") if n) if len(parts) == 2 else ()
        for name in names:
            if name not in clients:
                raise ConfigError(f"api.key_file: {path} line {number}: unknown client "
                                  f"{name!r}")
        keys.append(ApiKey(Secret(parts[0]), names))
    if not keys:
        raise ConfigError(f"api.key_file: {path} holds no key")
    return tuple(keys)


def _state(r: _Reader, database: DatabaseConfig, env: Mapping[str, str]) -> StateConfig:
    # systemd passes a colon-separated list when StateDirectory= names several.
    from_env = (env.get("STATE_DIRECTORY") or "").split(":")[0].strip()
    if from_env:
        return StateConfig(dir=Path(from_env).absolute(), origin="$STATE_DIRECTORY")
    configured = r.string("state", "dir", "")
    if configured:
        path = Path(configured).expanduser()
        if not path.is_absolute() and r.source is not None:
            path = r.source.parent / path
        return StateConfig(dir=path.absolute(), origin="[state] dir")
    db_path = database.sqlite_path
    if db_path is not None:
        return StateConfig(dir=db_path.absolute().parent, origin="the SQLite file's directory")
    return StateConfig()


def _clients(r: _Reader, raw: Any) -> dict[str, ClientConfig]:
    if not isinstance(raw, dict):
        raise ConfigError("clients: must be a table of [clients.NAME] tables")
    out: dict[str, ClientConfig] = {}
    for name, table in raw.items():
        where = f"clients.{name}"
        if not name.strip() or len(name) > 100:
            raise ConfigError(f"{where}: a client name has 1 to 100 characters")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in table:
            if key not in _CLIENT_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key")
        section = f"clients.{name}"
        client_id = r.string(section, "client_id", "", table=table)
        if not client_id:
            raise ConfigError(f"{where}.client_id: is required")
        secret = r.secret(section, "client_secret", table=table)
        if secret is None:
            raise ConfigError(f"{where}.client_secret: is required (or client_secret_file)")
        method = r.string(section, "auth_method", "client_secret_post", table=table)
        if method not in ("client_secret_post", "client_secret_basic"):
            raise ConfigError(
                f"{where}.auth_method: must be client_secret_post or client_secret_basic, "
                f"not {method!r}"
            )
        redirect = r.url(section, "redirect_uri", "", allow_empty=True, table=table)
        out[name] = ClientConfig(
            name=name,
            client_id=client_id,
            client_secret=secret,
            auth_method=method,  # type: ignore[arg-type]
            redirect_uri=redirect or None,
            client_credentials=r.boolean(section, "client_credentials", False, table=table),
        )
    seen: dict[str, str] = {}
    for name, c in out.items():
        if c.client_id in seen:
            raise ConfigError(f"clients.{name}.client_id: {c.client_id!r} is already the "
                              f"client_id of clients.{seen[c.client_id]}")
        seen[c.client_id] = name
    return out


class _Reader:
    """Typed access to the raw tables; every failure names ``section.key``."""

    def __init__(self, raw: dict[str, Any], source: Path | None, env: Mapping[str, str]):
        self.raw = raw
        self.source = source
        self.env = env
        for section, keys in _SECTIONS.items():
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


def render(config: Config) -> str:
    """The effective settings as TOML-like text, secrets masked (one line per key of
    :data:`_KEYS`, the clients after the provider)."""
    lines = [f"# effective configuration (source: {config.source or 'built-in defaults'})"]
    section = ""
    for spec in _KEYS:
        if spec.section != section:
            if section:
                lines.append("")
            if section == "provider":
                lines += _render_clients(config)
            section = spec.section
            lines.append(f"[{section}]")
        lines.append(f"{spec.key} = {spec.show(config)}")
    return "\n".join(lines) + "\n"


def _render_clients(config: Config) -> list[str]:
    lines: list[str] = []
    for c in config.clients.values():
        lines += [
            f"[clients.{c.name}]",
            f"client_id = {_q(c.client_id)}",
            'client_secret = "********"',
            f"auth_method = {_q(c.auth_method)}",
            f"redirect_uri = {_q(_hide_user(c.redirect_uri or ''))}",
            f"client_credentials = {_q(c.client_credentials)}", "",
        ]
    return lines
