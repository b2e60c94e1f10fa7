"""Each config key declared once (:data:`_KEYS`), the sections read by their own
functions, and :func:`render` for ``check-config``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from .config_read import (
    Read,
    _api_clients,
    _api_listen,
    _database_url,
    _duration,
    _integer,
    _is_socket,
    _key_file,
    _link_key,
    _listen,
    _log_format,
    _log_level,
    _max_grant_age,
    _number,
    _public_url,
    _Reader,
    _refresh_margin_min,
    _reminders,
    _state_dir,
    _state_from_env,
    _timedelta,
    _url,
    read_keys,
)
from .config_types import (
    MAX_TIMEOUT,
    MIN_TIMEOUT,
    ApiConfig,
    ApiKey,
    ClientConfig,
    Config,
    ConsentConfig,
    DatabaseConfig,
    EncryptionConfig,
    MetricsConfig,
    NotifyConfig,
    ProviderConfig,
    ScheduleConfig,
    Secret,
    StateConfig,
    _hide_user,
    mask_url,
    mask_webhook,
)
from .durations import format_timedelta
from .errors import ConfigError

# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Key:
    section: str
    key: str
    show: Callable[[Config], str]
    read: Read  # the key alone; checks across keys or sections follow the section
    aliases: tuple[str, ...] = ()


def _q(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mask(secret: object) -> str:
    return _q("********" if secret else "")


# Every key of a [section] once: its name, the other name it may be given by (the
# *_file form of a secret), its check-config value (masked) and, where it can be read
# alone, its reader (default from the dataclass, bounds). Cross-key checks run after
# the section is read (in _build or the section's function, e.g. _consent).
_KEYS: tuple[_Key, ...] = (
    _Key("database", "url", lambda c: _q(mask_url(c.database.url)),
         lambda r, s, k: _database_url(r.string(s, k, DatabaseConfig.url))),
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
    _Key("metrics", "listen", lambda c: _q(c.metrics.listen), _listen(MetricsConfig)),
    _Key("logging", "format", lambda c: _q(c.logging.format), _log_format),
    _Key("logging", "level", lambda c: _q(c.logging.level), _log_level),
    _Key("encryption", "key_file",
         lambda c: f"{_q(str(c.encryption.key_file or ''))}"
                   f"  # {len(c.encryption.keys)} key(s) loaded", _key_file),
    _Key("state", "dir",
         lambda c: f"{_q(str(c.state.dir or ''))}  # "
                   + (f"from {c.state.origin}" if c.state.dir
                      else "not set: `tokend run` needs it with PostgreSQL"),
         _state_dir),
    _Key("notify", "webhook_url", lambda c: _q(mask_webhook(c.notify.webhook_url)),
         lambda r, s, k: r.url(s, k, NotifyConfig.webhook_url, allow_empty=True)),
    _Key("notify", "webhook_secret", lambda c: _mask(c.notify.webhook_secret),
         lambda r, s, k: r.secret(s, k), aliases=("webhook_secret_file",)),
    _Key("consent", "listen", lambda c: _q(c.consent.listen), _listen(ConsentConfig)),
    _Key("consent", "public_url", lambda c: _q(_hide_user(c.consent.public_url)),
         _public_url),
    _Key("consent", "link_key", lambda c: _mask(c.consent.link_key), _link_key,
         aliases=("link_key_file",)),
    _Key("consent", "link_ttl", lambda c: _q(str(c.consent.link_ttl)),
         _duration(ConsentConfig, positive=True)),
    _Key("consent", "reminders",
         lambda c: "[" + ", ".join(_q(str(d)) for d in c.consent.reminders) + "]",
         _reminders),
    _Key("api", "listen",
         lambda c: _q(c.api.listen)
         + (f"  # socket {c.api.socket_path}" if c.api.socket_path else ""), _api_listen),
    _Key("api", "key_file",
         lambda c: f"{_mask(c.api.keys)}  # {len(c.api.keys)} key(s) loaded",
         lambda r, s, k: r.string(s, k, "")),
    _Key("api", "clients", lambda c: "[" + ", ".join(_q(n) for n in c.api.clients) + "]",
         _api_clients),
    _Key("api", "wait", lambda c: _q(str(int(c.api.wait.total_seconds())) + "s"),
         _timedelta(ApiConfig, positive=True, maximum=timedelta(minutes=5))),
)
_SECTIONS: dict[str, set[str]] = {}
for _k in _KEYS:
    _SECTIONS.setdefault(_k.section, set()).update((_k.key, *_k.aliases))


def _section(r: _Reader, section: str) -> dict[str, Any]:
    """The keys of a section that the table reads, by name (= the dataclass's fields)."""
    return {k.key: k.read(r, k.section, k.key) for k in _KEYS if k.section == section}


ClientRead = Callable[[_Reader, str, str, dict[str, Any]], Any]


@dataclass(frozen=True)
class _ClientKey:
    """A key of every [clients.NAME] table (read from that table, shown per client)."""

    key: str
    show: Callable[[ClientConfig], str]
    read: ClientRead
    aliases: tuple[str, ...] = ()


def _client_id(r: _Reader, section: str, key: str, table: dict[str, Any]) -> str:
    client_id: str = r.string(section, key, "", table=table)
    if not client_id:
        raise ConfigError(f"{section}.client_id: is required")
    return client_id


def _client_secret(r: _Reader, section: str, key: str, table: dict[str, Any]) -> Secret:
    secret = r.secret(section, key, table=table)
    if secret is None:
        raise ConfigError(f"{section}.client_secret: is required (or client_secret_file)")
    return secret


def _auth_method(r: _Reader, section: str, key: str, table: dict[str, Any]) -> str:
    method: str = r.string(section, key, "client_secret_post", table=table)
    if method not in ("client_secret_post", "client_secret_basic"):
        raise ConfigError(
            f"{section}.auth_method: must be client_secret_post or client_secret_basic, "
            f"not {method!r}"
        )
    return method


_CLIENT_TABLE: tuple[_ClientKey, ...] = (
    _ClientKey("client_id", lambda c: _q(c.client_id), _client_id),
    _ClientKey("client_secret", lambda c: '"********"', _client_secret,
               aliases=("client_secret_file",)),
    _ClientKey("auth_method", lambda c: _q(c.auth_method), _auth_method),
    _ClientKey("redirect_uri", lambda c: _q(_hide_user(c.redirect_uri or "")),
               lambda r, s, k, t: r.url(s, k, "", allow_empty=True, table=t) or None),
    _ClientKey("client_credentials", lambda c: _q(c.client_credentials),
               lambda r, s, k, t: r.boolean(s, k, False, table=t)),
)
_CLIENT_KEYS = {name for k in _CLIENT_TABLE for name in (k.key, *k.aliases)}


def _encryption(r: _Reader) -> EncryptionConfig:
    """The keys in the file the table located (none yet if it is absent)."""
    encryption = EncryptionConfig(**_section(r, "encryption"))
    path = encryption.key_file
    if path is None:
        return encryption
    keys = read_keys(path) if path.exists() else ()
    creds = r.env.get("CREDENTIALS_DIRECTORY")
    return replace(encryption, keys=keys,
                   from_credentials=bool(creds) and path.parent == Path(str(creds)))


def _consent(r: _Reader) -> ConsentConfig:
    consent = ConsentConfig(**_section(r, "consent"))
    if consent.listen and not consent.public_url:
        raise ConfigError("consent.public_url: is required when consent.listen is set "
                          "(the address users reach through the reverse proxy)")
    if consent.listen and consent.link_key is None:
        raise ConfigError("consent.link_key_file: is required when consent.listen is set "
                          "(a secret of at least 32 characters; never created by tokend)")
    return consent


def _api(r: _Reader, clients: Mapping[str, ClientConfig]) -> ApiConfig:
    api = _section(r, "api")
    for name in api["clients"]:
        if name not in clients:
            raise ConfigError(f"api.clients: unknown client {name!r}")
    keys = read_api_keys(r.locate(api["key_file"]), clients) if api["key_file"] else ()
    listen: str = api["listen"]
    socket_path: Path | None = None
    if _is_socket(listen):
        path = Path(listen).expanduser()
        if not path.is_absolute():
            runtime = (r.env.get("RUNTIME_DIRECTORY") or "").split(":")[0].strip()
            base = Path(runtime) if runtime else (
                r.source.parent if r.source is not None else Path.cwd())
            path = base / path
        socket_path = path.absolute()
    elif listen and not keys:
        raise ConfigError("api.key_file: is required when api.listen is HOST:PORT "
                          "(one bearer key per line; never created by tokend)")
    return ApiConfig(listen=listen, socket_path=socket_path, keys=keys,
                     clients=api["clients"], wait=api["wait"])


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
    state = StateConfig(**_section(r, "state"))
    if state.dir is not None:
        origin = "$STATE_DIRECTORY" if _state_from_env(env) else "[state] dir"
        return replace(state, origin=origin)
    db_path = database.sqlite_path
    if db_path is not None:
        return StateConfig(dir=db_path.absolute().parent, origin="the SQLite file's directory")
    return state


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
        out[name] = ClientConfig(
            name=name, **{k.key: k.read(r, where, k.key, table) for k in _CLIENT_TABLE})
    seen: dict[str, str] = {}
    for name, c in out.items():
        if c.client_id in seen:
            raise ConfigError(f"clients.{name}.client_id: {c.client_id!r} is already the "
                              f"client_id of clients.{seen[c.client_id]}")
        seen[c.client_id] = name
    return out


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
        lines += [f"[clients.{c.name}]",
                  *(f"{k.key} = {k.show(c)}" for k in _CLIENT_TABLE), ""]
    return lines
