#!/usr/bin/env python3
"""Set-up and checks with nothing but Python 3.11+: ``python3 dev.py demo|test|faults|bench``.

Creates ``.venv`` beside this file on first use (and again when pyproject.toml changes),
installs tokend with its test extras, then runs the command.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".tokend-installed"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"tokend needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest and (BIN / "tokend").exists():
        return
    if not (BIN / "python").exists():
        print("dev: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev: installing tokend and its test tools into .venv", flush=True)
    run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"])
    STAMP.write_text(digest)


def run(cmd: list[str]) -> None:
    code = subprocess.call(cmd, cwd=ROOT)
    if code != 0:
        sys.exit(code)


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "test"
    rest = argv[1:]
    ensure_venv()
    if what == "demo":
        os.execv(str(BIN / "tokend"), [str(BIN / "tokend"), "demo", *rest])
    elif what == "test":
        print("dev: ruff", flush=True)
        paths = [p for p in ("daemon", "tests", "bench", "dev.py") if (ROOT / p).exists()]
        run([str(BIN / "ruff"), "check", *paths])
        print("dev: mypy (strict on daemon/)", flush=True)
        run([str(BIN / "mypy")])
        print("dev: pytest", flush=True)
        run([str(BIN / "pytest"), *(rest or ["-q"])])
    elif what == "faults":
        run([str(BIN / "pytest"), "-q", "-m", "faults", *rest])
    elif what == "bench":
        for script in sorted((ROOT / "bench").glob("bench_*.py")):
            run([str(BIN / "python"), str(script), *rest])
    else:
        sys.exit(f"usage: python3 dev.py [demo|test|faults|bench] (not {what!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
