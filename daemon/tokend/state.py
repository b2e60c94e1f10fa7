"""The state directory: what must outlive the process, on this host.

``$STATE_DIRECTORY`` under systemd (``StateDirectory=``, writable under
``ProtectSystem=strict``), else ``[state] dir``, else the SQLite file's directory
(resolved in :mod:`tokend.config`). Owner locks and the spool of held outcomes live
below it; each concern keeps its own sub-directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config
from .errors import ConfigError


def prepare(config: Config, sub: str | None = None) -> Path:
    """The state directory (or its ``sub``-directory), created 0700 and writable."""
    path = config.state_dir()
    if sub is not None:
        path = path / sub
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state.dir: cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"state.dir: {path} is not writable by this user")
    return path
