"""Progress of `grants import` and `keys rotate`: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

from faultlib import TOKEND, clean_env
from tokend.crypto import generate_key
from tokend.testing import write_config


def _records(n: int) -> str:
    return "\n".join(json.dumps({"client": "main", "access_token": f"AT-{i}-secret",
                                 "refresh_token": f"RT-{i}-secret", "expires_in": 86400,
                                 "user_id": i}) for i in range(1, n + 1))


def _run(config: Path, *args: str, tty: bool) -> tuple[int, str, str]:
    if not tty:
        r = subprocess.run([TOKEND, "--config", str(config), *args], capture_output=True,
                           text=True, timeout=120, env=clean_env())
        return r.returncode, r.stdout, r.stderr
    main, child = pty.openpty()
    # a terminal of 80 columns (a fresh pty has none, and tqdm then draws nothing)
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        p = subprocess.Popen([TOKEND, "--config", str(config), *args], stdout=subprocess.PIPE,
                             stderr=child, env=clean_env(), text=True)
        os.close(child)
        chunks = []
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        out = p.stdout.read() if p.stdout else ""
        code = p.wait(60)
    finally:
        os.close(main)
    return code, out, b"".join(chunks).decode(errors="replace")


def test_plain_lines_off_a_terminal_and_a_bar_on_one(tmp_path: Path, key_file: Path) -> None:
    config = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 'tokend.db'}", key_file=key_file)
    assert _run(config, "db", "upgrade", tty=False)[0] == 0
    src = tmp_path / "a.jsonl"
    src.write_text(_records(1200))
    code, out, err = _run(config, "grants", "import", "--progress", str(src), tty=False)
    assert code == 0, err
    assert "importing: 1200/1200" in err and "\r" not in err
    assert "imported 1200 grant(s)" in out

    key_file.write_text(generate_key() + "\n" + key_file.read_text())
    code, out, err = _run(config, "keys", "rotate", tty=True)
    assert code == 0, err
    assert "re-encrypting" in err and "\r" in err and "grant" in err  # tqdm's bar
    assert "re-encrypted the tokens of 1200 grant(s)" in out
    # off a terminal and not asked for: nothing on stderr (scripts read it for errors)
    key_file.write_text(generate_key() + "\n" + key_file.read_text())
    assert _run(config, "keys", "rotate", tty=False)[1:] == (
        "re-encrypted the tokens of 1200 grant(s) with the newest key\n", "")
    for secret in ("AT-1-secret", "RT-1-secret"):
        assert secret not in out + err
