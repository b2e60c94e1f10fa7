"""`tokend demo` as a newcomer runs it: refreshes within a minute, no secret in its output."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tokend.config import load_config
from tokend.store import open_store


def test_demo_shows_refreshes_and_a_reconsent_flag_and_hides_secrets(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "tokend", "demo", "--duration", "25", "--dir", str(tmp_path),
         "--listen", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "4 users consented" in output
    assert output.count("refreshed") >= 4
    assert "reconsent_required" in output
    assert "refresh-token reuse: 0" in output
    # it ended by itself (no signal) with its summary last
    assert "summary after 25s:" in output or "summary after 26s:" in output
    assert "stopping (the --duration is over)" in output
    # every token the demo ever stored, and the client secret, stay out of its output
    config = load_config(tmp_path / "tokend.toml", env={})
    store = open_store(config)
    try:
        secrets = ["demo-secret"]
        for g in store.iter_grants():
            secrets += [t for t in store.tokens(store.get(g.id, with_tokens=True)) if t]
    finally:
        store.close()
    assert len(secrets) >= 6
    for secret in secrets:
        assert secret not in output


def test_demo_ends_by_itself_by_default() -> None:
    from tokend.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.duration == 60.0
    assert build_parser().parse_args(["demo", "--duration", "0"]).duration == 0.0
