"""The configuration: TOML file + ``TOKEND_SECTION__KEY`` environment, validated once.

``load_config`` is the only way in. It returns one frozen :class:`Config` that is passed
down; every problem is a :class:`~tokend.errors.ConfigError` whose message names the key.

Its parts: :mod:`tokend.config_types` (the frozen data), :mod:`tokend.config_read` (typed
access to the raw tables, the readers of single keys), :mod:`tokend.config_keys` (each key
declared once, the checks across keys, ``render``). Every public name is importable here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config_keys import (
    _CLIENT_KEYS,
    _KEYS,
    _SECTIONS,
    _api,
    _clients,
    _consent,
    _encryption,
    _section,
    _state,
    read_api_keys,
    render,
)
from .config_read import (
    _check_names,
    _EnvValue,
    _Reader,
    read_keys,
)
from .config_types import (
    DEFAULT_REMINDERS,
    ENV_PREFIX,
    LINK_KEY_MIN,
    MASK,
    MAX_TIMEOUT,
    MIN_TIMEOUT,
    ApiConfig,
    ApiKey,
    AuthMethod,
    ClientConfig,
    Config,
    ConsentConfig,
    DatabaseConfig,
    EncryptionConfig,
    LoggingConfig,
    MetricsConfig,
    NotifyConfig,
    ProviderConfig,
    ScheduleConfig,
    Secret,
    StateConfig,
    mask_url,
    mask_webhook,
    split_host_port,
)
from .durations import format_timedelta
from .errors import ConfigError

# Every public name stays importable from here; the tables are read by the contract test.
__all__ = [
    "DEFAULT_REMINDERS",
    "ENV_PREFIX",
    "LINK_KEY_MIN",
    "MASK",
    "MAX_TIMEOUT",
    "MIN_TIMEOUT",
    "_CLIENT_KEYS",
    "_KEYS",
    "_SECTIONS",
    "ApiConfig",
    "ApiKey",
    "AuthMethod",
    "ClientConfig",
    "Config",
    "ConsentConfig",
    "DatabaseConfig",
    "EncryptionConfig",
    "LoggingConfig",
    "MetricsConfig",
    "NotifyConfig",
    "ProviderConfig",
    "ScheduleConfig",
    "Secret",
    "StateConfig",
    "load_config",
    "mask_url",
    "mask_webhook",
    "read_api_keys",
    "read_keys",
    "render",
    "split_host_port",
]


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


def _build(raw: dict[str, Any], source: Path | None, env: Mapping[str, str]) -> Config:
    _check_names(raw)
    for section in raw:
        if section not in _SECTIONS and section != "clients":
            raise ConfigError(f"unknown section [{section}]")
    r = _Reader(raw, source, env, _SECTIONS)

    database = DatabaseConfig(**_section(r, "database"))

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

    encryption = _encryption(r)

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
