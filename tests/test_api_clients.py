"""docs/api.md's curl, PHP and Node.js examples, run against a live daemon and the fake
provider, each through the 401 -> on-demand refresh path; then the Unix socket handed over
by socket activation, and `tokend status` of the running replica."""

from __future__ import annotations

import json
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from faultlib import (
    TOKEND,
    Daemon,
    FakeProcess,
    Proc,
    clean_env,
    tokend,
    wait_until,
)
from tokend.crypto import generate_key
from tokend.testing import free_port, write_config

pytestmark = pytest.mark.faults
DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
KEY = "a" * 40


def example(lang: str) -> str:
    blocks = re.findall(r"^```" + lang + r"\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert blocks, f"no ```{lang} block in {DOC}"
    return str(blocks[0])


def runner(lang: str, path: Path) -> list[str]:
    tool = {"sh": "sh", "php": "php", "js": "node"}[lang]
    if shutil.which(tool) is None or (lang == "sh" and not shutil.which("jq")):
        pytest.fail(f"{tool} is missing (.ci/run installs it): apt-get install "
                    + {"sh": "curl jq", "php": "php-cli php-curl", "js": "nodejs"}[lang])
    return [tool, str(path)]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeProcess]:
    f = FakeProcess(tmp_path)
    try:
        yield f
    finally:
        f.reap()


def _setup(tmp_path: Path, db_url: str, fake: FakeProcess, api: str) -> tuple[Path, list[dict]]:
    key_file = tmp_path / "tokend-key"
    key_file.write_text(generate_key() + "\n")
    config = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url,
                          key_file=key_file)
    (tmp_path / "api-keys").write_text(f"{KEY} main\n")
    with config.open("a") as fh:
        fh.write(f'\n[api]\n{api}\nkey_file = "{tmp_path / "api-keys"}"\nwait = "15s"\n')
    assert tokend(config, "db", "upgrade").returncode == 0
    issued = fake.issue(4)
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    # the stored access tokens are ones the provider refuses (as after a refresh by
    # someone else): each example meets a 401 first
    records = [{"client": "main", "access_token": f"stale-access-token-{t['user_id']:04d}",
                "refresh_token": t["refresh_token"], "expires_in": 86400,
                "obtained_at": hour_ago, "user_id": t["user_id"]} for t in issued]
    (tmp_path / "grants.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    done = tokend(config, "grants", "import", str(tmp_path / "grants.jsonl"))
    assert done.returncode == 0, done.stderr
    return config, issued


def _listening(daemon: Daemon) -> str:
    def up() -> str | None:
        assert daemon.running, daemon.output()
        return next((e["address"] for e in daemon.log_events()
                     if e.get("event") == "api_listening"), None)
    return str(wait_until(up, 30, what="the token API to listen"))


def _refreshes(fake: FakeProcess) -> int:
    return int(fake.stats()["by_grant"]["refresh_token"])


def test_curl_php_and_node_examples_through_the_401_path(tmp_path: Path, db_url: str,
                                                         fake: FakeProcess) -> None:
    port = free_port()
    config, issued = _setup(tmp_path, db_url, fake, f'listen = "127.0.0.1:{port}"')
    daemon = Daemon(config, "run", log=tmp_path / "daemon.log")
    try:
        address = _listening(daemon)
        base = fake.base_url
        for n, lang in enumerate(("sh", "php", "js")):
            user = issued[n]["user_id"]
            script = tmp_path / f"example.{lang}"
            script.write_text(example(lang))
            before = _refreshes(fake)
            env = clean_env(TOKEND_API=f"http://{address}", TOKEND_KEY=KEY, CLIENT="main",
                            USER_ID=str(user), RESOURCE_URL=f"{base}/oauth/user/current")
            env.pop("http_proxy", None)
            env.pop("HTTP_PROXY", None)
            done = subprocess.run(runner(lang, script), capture_output=True, text=True,
                                  timeout=90, env=env, cwd=tmp_path, check=False)
            assert done.returncode == 0, f"{lang}: {done.stdout}\n{done.stderr}"
            assert json.loads(done.stdout)["id"] == user, lang
            assert _refreshes(fake) == before + 1, lang  # the 401 -> one refresh
        # a wrong key: 401, and no token in the answer
        wrong = subprocess.run(["curl", "-sS", "-H", "Authorization: Bearer " + "b" * 40,
                                f"http://{address}/v1/token?client=main&user_id=1"],
                               capture_output=True, text=True, timeout=30, check=False)
        assert '"unauthorized"' in wrong.stdout
        # the replica's heartbeat, read by `tokend status`
        status = wait_until(lambda: (s := json.loads(tokend(config, "status", "--json").stdout))
                            ["replicas"] and s, 30, what="a heartbeat")
        assert status["replicas"][0]["state"] == "running"
        assert status["grants"] == {"main": {"ok": 4}}
    finally:
        daemon.signal(signal.SIGTERM)
        code = daemon.reap(60)
    log = daemon.log.read_text()
    assert code == 0, daemon.output()
    assert fake.stats()["reuse_count"] == 0
    for t in issued:
        assert t["refresh_token"] not in log
    assert "stale-access-token" not in log
    assert '"ondemand_refresh"' in log


def test_socket_activation_serves_the_socket_systemd_made(tmp_path: Path, db_url: str,
                                                          fake: FakeProcess) -> None:
    if shutil.which("systemd-socket-activate") is None:
        pytest.fail("systemd-socket-activate is missing (Debian: systemd)")
    sock_path = tmp_path / "activated.sock"
    config, issued = _setup(tmp_path, db_url, fake, 'listen = "api.sock"')
    runtime = tmp_path / "run"
    runtime.mkdir()
    # As tokend-api.socket does: the socket exists before tokend runs, and tokend gets it
    # as fd 3 (LISTEN_FDS/LISTEN_PID), whatever [api] listen says. (Its mode is systemd's
    # SocketMode=; tokend leaves it alone.)
    proc = Proc(["systemd-socket-activate", "-l", str(sock_path), TOKEND, "--config",
                 str(config), "run"], tmp_path / "daemon.log",
                env=clean_env(RUNTIME_DIRECTORY=str(runtime)))
    try:
        wait_until(sock_path.exists, 20, what="the activation socket")
        mode = stat.S_IMODE(sock_path.stat().st_mode)
        user = issued[0]["user_id"]
        done = subprocess.run(["curl", "-sS", "--max-time", "60", "--unix-socket",
                               str(sock_path), f"http://localhost/v1/token?client=main&user_id={user}"],
                              capture_output=True, text=True, timeout=90, check=False)
        body = json.loads(done.stdout)
        # no key needed on the socket (its file mode is the check)
        assert body["grant_id"] and body["status"] == "ok", done.stdout
        assert not (runtime / "api.sock").exists()  # it served the socket it was given
        assert stat.S_IMODE(sock_path.stat().st_mode) == mode
        refreshed = subprocess.run(["curl", "-sS", "--max-time", "60", "-X", "POST",
                                    "--unix-socket", str(sock_path),
                                    f"http://localhost/v1/grants/{body['grant_id']}/refresh"],
                                   capture_output=True, text=True, timeout=90, check=False)
        assert json.loads(refreshed.stdout)["access_token"], refreshed.stdout
    finally:
        proc.signal(signal.SIGTERM)
        code = proc.reap(60)
    assert code == 0, proc.output()
    assert fake.stats()["reuse_count"] == 0
