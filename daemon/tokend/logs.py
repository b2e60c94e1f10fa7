"""structlog set-up: JSON lines for journald/files, readable console lines on a TTY.

The masking processor is the last line of defence: code never passes tokens to a
logger on purpose, but a text value of a field whose name says "token" or "secret" (not
a flag or a count such as ``holding_rotated_token=true``), or a value shaped like a
league refresh token or a Fernet value, is masked before it is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

from .config import LoggingConfig

_SECRET_KEY = re.compile(r"(token|secret|password|authorization|key)$", re.IGNORECASE)
_SAFE_KEYS = {"token_version", "refresh_token_expires_at", "access_token_expires_at"}
# league refresh tokens (def50200 + hex), Fernet values, bearer headers, long opaque blobs
_SECRET_VALUE = re.compile(
    r"(def50200[0-9a-f]{16,}|enc:v1:\S+|gAAAAA[\w-]{20,}|Bearer\s+\S+|[A-Za-z0-9_\-.=]{64,})"
)
MASK = "[masked]"


def mask_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    for key, value in list(event.items()):
        if key in _SAFE_KEYS or (key == "event" and not isinstance(value, str)):
            continue
        if _SECRET_KEY.search(key) and _maskable(value):
            event[key] = MASK
        elif isinstance(value, str) and key != "timestamp":
            event[key] = _SECRET_VALUE.sub(MASK, value)
    return event


def _maskable(value: Any) -> bool:
    """A value of a secret-named field that could be the secret: text, bytes, or a
    structure. Flags and counts (``holding_rotated_token=true``) are no secret and are
    what an operator greps for; even a short string is masked (a password may be short)."""
    return not (value is None or value == "" or isinstance(value, bool | int | float))


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (a CLI command run in-process,
    as tests do, must not leave logging bound to a stream that is closed later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(cfg: LoggingConfig, stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger once, at the edge."""
    stream = stream or cast(TextIO, _Stderr())
    level = getattr(logging, cfg.level.upper())
    fmt = cfg.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_secrets,
        structlog.processors.format_exc_info if fmt == "json" else _noop,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (urllib3, apscheduler, alembic) log through stdlib: keep them quiet
    # and in the same stream.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    for noisy in ("apscheduler", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _noop(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    return event


def get(name: str = "tokend") -> Any:
    return structlog.get_logger(name)
