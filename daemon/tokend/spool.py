"""Held outcomes: rotated refresh tokens the database has not taken yet, and their spool.

The provider rotates a refresh token before tokend can save the new one. If that save
fails (the database is down, read-only after a failover, rejects the row...), the new
token exists nowhere else. Such an outcome is *held*: written at once to the spool, one
file per outcome in ``<state dir>/spool`` (tokens encrypted with the store's keys,
fsynced, renamed into place), then saved again and again until the database has it.
Only then is the file removed, so a SIGKILL, an OOM kill or a watchdog kill during a
database outage loses nothing: the next process replays the spool before it claims.

A replay goes through the save's guard with the token version alone: it matches while
nobody has written tokens since the claim (a re-consent, or this very outcome saved
before: each save moves the version on), so a stale copy can never overwrite newer
tokens. An entry whose guard no longer matches is logged and dropped.

Its size is one concern: the held token's life from the failed save to the database
(file format, the durable write, replay and its guard), kept together so that no step of
it can lose a rotated refresh token unnoticed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import logs
from .crypto import Cipher
from .errors import DecryptError, StoreError, TokendError
from .model import Grant, GrantType, Outcome, Status

log = logs.get("tokend.spool")

FORMAT = 1
SUFFIX = ".json"
# Never equal to a lease owner (owner ids are never empty): a replay is guarded by the
# token version alone (see the module docstring).
REPLAY_OWNER = ""


class SpoolError(StoreError):
    """A spool file that is not a spool entry (damaged or foreign)."""


@dataclass(frozen=True)
class Entry:
    """One held outcome with what its save needs (and nothing it does not)."""

    grant_id: int
    token_version: int
    owner: str
    client: str
    grant_type: GrantType
    user_id: str | None
    tenant_id: str | None
    outcome: Outcome
    event: dict[str, Any] | None
    held_at: datetime
    name: str = ""  # the file name in the spool

    @classmethod
    def of(cls, grant: Grant, outcome: Outcome, owner: str, event: dict[str, Any] | None,
           now: datetime) -> Entry:
        name = f"{grant.id}-{grant.token_version}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        return cls(grant_id=grant.id, token_version=grant.token_version, owner=owner,
                   client=grant.client, grant_type=grant.grant_type, user_id=grant.user_id,
                   tenant_id=grant.tenant_id, outcome=outcome, event=event, held_at=now,
                   name=name)

    def grant(self) -> Grant:
        """The grant as the save sees it: its id and token version are the guard."""
        return Grant(
            id=self.grant_id, client=self.client, grant_type=self.grant_type,
            user_id=self.user_id, tenant_id=self.tenant_id, status=self.outcome.status,
            reason=None, access_expires_at=None, refresh_expires_at=None, obtained_at=None,
            consented_at=None, failure_count=0, last_error=None, next_attempt_at=None,
            in_doubt=False, token_version=self.token_version, has_refresh_token=True,
            created_at=self.held_at, updated_at=self.held_at, lease_owner=self.owner)


# --------------------------------------------------------------------------- (de)serialising


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("naive timestamp")
    return parsed.astimezone(UTC)


def dumps(entry: Entry, cipher: Cipher) -> str:
    """The file's text: the entry in JSON, its tokens encrypted (the rest is no secret
    and stays readable for an operator looking into the spool)."""
    o = entry.outcome
    return json.dumps({
        "format": FORMAT, "grant_id": entry.grant_id, "token_version": entry.token_version,
        "owner": entry.owner, "client": entry.client, "grant_type": entry.grant_type,
        "user_id": entry.user_id, "tenant_id": entry.tenant_id,
        "held_at": _iso(entry.held_at), "event": entry.event,
        "outcome": {
            "status": o.status.value, "reason": o.reason,
            "next_attempt_at": _iso(o.next_attempt_at), "failure_count": o.failure_count,
            "last_error": o.last_error, "in_doubt": o.in_doubt,
            "access_token": cipher.encrypt(o.access_token) if o.access_token else None,
            "refresh_token": cipher.encrypt(o.refresh_token) if o.refresh_token else None,
            "access_expires_at": _iso(o.access_expires_at),
            "refresh_expires_at": _iso(o.refresh_expires_at),
            "obtained_at": _iso(o.obtained_at),
            "reminder_deadline": _iso(o.reminder_deadline),
            "reminder_point": _iso(o.reminder_point),
        },
    }, sort_keys=True)


def grant_id_of(text: str) -> int | None:
    """The grant id of a spool file's text, if it can be read at all."""
    try:
        value = json.loads(text).get("grant_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def loads(text: str, cipher: Cipher, name: str = "") -> Entry:
    """The entry of a file's text. SpoolError: not an entry; DecryptError: an entry whose
    tokens no configured key decrypts."""
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        o = data["outcome"]
        access_enc, refresh_enc = o["access_token"], o["refresh_token"]
        if not isinstance(access_enc, str) or not isinstance(refresh_enc, str | None):
            raise ValueError("tokens are not strings")
        event = data["event"]
        if event is not None and not isinstance(event, dict):
            raise ValueError("event is not an object")
        held_at = _time(data["held_at"])
        if held_at is None:
            raise ValueError("no held_at")
        grant_id = int(data["grant_id"])
        user_id, tenant_id = data["user_id"], data["tenant_id"]
        if not all(isinstance(v, str | None) for v in (user_id, tenant_id, o["reason"],
                                                         o["last_error"])):
            raise ValueError("a text field is not text")
        token_version = int(data["token_version"])
        owner, client = str(data["owner"]), str(data["client"])
        grant_type = GrantType(data["grant_type"])
        status = Status(o["status"])
        next_attempt_at = _time(o["next_attempt_at"])
        access_expires_at = _time(o["access_expires_at"])
        refresh_expires_at = _time(o["refresh_expires_at"])
        obtained_at = _time(o["obtained_at"])
        # Absent from entries written before reminders existed.
        reminder_deadline = _time(o.get("reminder_deadline"))
        reminder_point = _time(o.get("reminder_point"))
        failure_count = int(o["failure_count"])
        in_doubt = bool(o["in_doubt"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SpoolError(f"spool entry {name or '?'} is damaged: {type(exc).__name__}") from None
    outcome = Outcome(
        status=status, reason=o["reason"], next_attempt_at=next_attempt_at,
        failure_count=failure_count, last_error=o["last_error"], in_doubt=in_doubt,
        access_token=cipher.decrypt(access_enc, grant_id=grant_id),
        refresh_token=cipher.decrypt(refresh_enc, grant_id=grant_id) if refresh_enc else None,
        access_expires_at=access_expires_at, refresh_expires_at=refresh_expires_at,
        obtained_at=obtained_at, reminder_deadline=reminder_deadline,
        reminder_point=reminder_point)
    return Entry(grant_id=grant_id, token_version=token_version, owner=owner,
                 client=client, grant_type=grant_type, user_id=user_id,
                 tenant_id=tenant_id, outcome=outcome, event=event, held_at=held_at, name=name)


# --------------------------------------------------------------------------- the files


class Spool:
    """The spool directory: one file per held outcome, written atomically and durably."""

    def __init__(self, directory: Callable[[], Path]) -> None:
        self._directory = directory  # created on first use (it may need the state dir)
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self._directory()
        return self._path

    def write(self, name: str, text: str) -> None:
        """Durable before it returns: data fsynced, renamed into place, directory fsynced."""
        directory = self.path
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
        _fsync_dir(directory)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self.path / name)
        except FileNotFoundError:
            pass  # another process on this host replayed it first
        except OSError as exc:  # harmless: a replay of it no longer matches its guard
            log.warning("spool_remove_failed", file=name, error=str(exc))

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def read(self, name: str) -> str:
        return (self.path / name).read_text(encoding="utf-8")

    def set_aside(self, name: str) -> str:
        """Rename a damaged file out of the way (kept for the operator, never replayed)."""
        aside = name + ".bad"
        os.replace(self.path / name, self.path / aside)
        return aside


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the held set


@dataclass
class _Held:
    entry: Entry | None  # None: its file cannot be decrypted (the grant is still held)
    grant_id: int
    name: str
    spooled: bool
    in_worker: bool  # a refresh worker still retries it; the replay leaves it alone
    text: str | None = field(default=None, repr=False)  # to spool, while the write fails
    failures: int = 0


class Held:
    """Every outcome this process holds, in memory and in the spool, and their replay.

    ``save(entry)``: the store's guarded save; True saved, False guard failed, raises
    when the database fails. ``on_count(n)``: told the number held at each change (the
    gauge). A background thread replays what the workers handed over.
    """

    def __init__(self, spool: Spool, cipher: Cipher, save: Callable[[Entry], bool], *,
                 on_count: Callable[[int], None] = lambda _n: None, retry: float = 1.0,
                 retry_max: float = 30.0) -> None:
        self.spool = spool
        self.cipher = cipher
        self._save = save
        self._on_count = on_count
        self.retry = retry
        self.retry_max = retry_max
        self._lock = threading.Lock()
        self._replaying = threading.Lock()  # one replay at a time (thread, pass, stop)
        self._items: dict[str, _Held] = {}
        self._loaded = False
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ counting

    def count(self) -> int:
        with self._lock:
            return len(self._items)

    def unspooled(self) -> int:
        with self._lock:
            return sum(1 for h in self._items.values() if not h.spooled)

    def holds(self, grant_id: int) -> bool:
        """True while an outcome of this grant waits: its stored refresh token is spent,
        so the grant must not be refreshed with it."""
        with self._lock:
            return any(h.grant_id == grant_id for h in self._items.values())

    def _changed(self) -> None:
        self._on_count(len(self._items))

    # ------------------------------------------------------------------ from a worker

    def hold(self, entry: Entry) -> bool:
        """Keep ``entry`` (its save just failed): spool it now. True if it is on disk."""
        text = dumps(entry, self.cipher)
        spooled = self._write(entry.name, text, entry.grant_id)
        with self._lock:
            self._items[entry.name] = _Held(entry, entry.grant_id, entry.name, spooled,
                                            in_worker=True, text=None if spooled else text)
            self._changed()
        return spooled

    def done(self, entry: Entry) -> None:
        """The entry is in the database (or its guard failed): forget it."""
        with self._lock:
            self._items.pop(entry.name, None)
            self._changed()
        self.spool.remove(entry.name)

    def hand_over(self, entry: Entry) -> None:
        """The worker gives up retrying: the background replay takes over."""
        with self._lock:
            item = self._items.get(entry.name)
            if item is not None:
                item.in_worker = False
        self._start()
        self._wake.set()

    def _write(self, name: str, text: str, grant_id: int) -> bool:
        try:
            self.spool.write(name, text)
            return True
        except (OSError, TokendError) as exc:  # TokendError: e.g. no state dir (ConfigError)
            log.error("spool_write_failed", grant_id=grant_id, error=str(exc)[:300],
                      detail="the outcome is held in memory only until it is saved")
            return False

    # ------------------------------------------------------------------ start-up

    def load(self) -> int:
        """Read the spool once (a previous process's held outcomes); returns how many."""
        with self._lock:
            if self._loaded:
                return 0
        names = self.spool.names()  # raises while the state dir is unusable: no claims then
        with self._lock:
            if self._loaded:
                return 0
            self._loaded = True
        found = 0
        for name in names:
            with self._lock:
                if name in self._items:
                    continue
            try:
                text = self.spool.read(name)
            except FileNotFoundError:
                continue
            try:
                entry: Entry | None = loads(text, self.cipher, name)
            except DecryptError as exc:
                gid = grant_id_of(text)
                log.error("spool_entry_undecryptable", file=name, grant_id=gid, error=str(exc),
                          detail="kept; restore the key it was written with and restart")
                if gid is None:
                    continue
                entry = None
            except SpoolError as exc:
                aside = self.spool.set_aside(name)
                log.error("spool_entry_damaged", file=name, kept_as=aside, error=str(exc))
                continue
            gid = entry.grant_id if entry is not None else grant_id_of(text)
            assert gid is not None
            with self._lock:
                self._items[name] = _Held(entry, gid, name, spooled=True, in_worker=False)
                self._changed()
            found += 1
        if found:
            log.warning("spool_loaded", held_outcomes=found,
                        detail="rotated tokens of a previous process; saving them first")
        return found

    # ------------------------------------------------------------------ replay

    def replay(self) -> tuple[int, int, int]:
        """Try once to save every handed-over entry: (saved, dropped, still held)."""
        with self._replaying:
            return self._replay()

    def _replay(self) -> tuple[int, int, int]:
        with self._lock:
            # Oldest first, but one the database keeps refusing (bad data) goes last.
            items = sorted((h for h in self._items.values()
                            if not h.in_worker and h.entry is not None),
                           key=lambda h: (h.failures, _iso(h.entry.held_at if h.entry
                                                                else None) or "", h.name))
        saved = dropped = failed = 0
        for item in items:
            assert item.entry is not None
            if not item.spooled and item.text is not None \
                    and self._write(item.name, item.text, item.grant_id):
                with self._lock:
                    item.spooled, item.text = True, None
            try:
                ok = self._save(item.entry)
            except Exception as exc:
                item.failures += 1
                failed += 1
                log.warning("held_outcome_not_saved", grant_id=item.grant_id,
                            error=str(exc)[:300], held_outcomes=self.count())
                if failed >= 3:
                    break  # the database is down: the rest would fail too; later
                continue
            if ok:
                saved += 1
                log.info("held_outcome_saved", grant_id=item.grant_id,
                         held_for_s=round((datetime.now(UTC) - item.entry.held_at)
                                          .total_seconds(), 1))
            else:
                dropped += 1
                log.warning("held_outcome_dropped", grant_id=item.grant_id,
                            detail="its guard no longer matches: the outcome was saved "
                                   "already, or the grant was re-consented or deleted")
            self.done(item.entry)
        left = self.count()
        if saved or dropped:
            log.info("held_outcomes_replayed", saved=saved, dropped=dropped,
                     held_outcomes=left)
        return saved, dropped, left

    def recover(self) -> None:
        """Before a pass claims: load the spool (once) and replay what is waiting."""
        self.load()
        if self._replayable():
            self.replay()

    def _replayable(self) -> bool:
        with self._lock:
            return any(not h.in_worker and h.entry is not None for h in self._items.values())

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="tokend-held", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self.retry
        while not self._closed.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._closed.is_set():
                return
            if not self._replayable():
                delay = self.retry
                continue
            _saved, _dropped, _left = self.replay()
            delay = self.retry if not self._replayable() else min(delay * 2, self.retry_max)

    # ------------------------------------------------------------------ stopping

    def settle(self, timeout: float) -> int:
        """At stop: every held outcome on disk (or saved), within ``timeout`` seconds;
        returns how many are still only in memory (lost when the process ends)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = [h for h in self._items.values() if not h.spooled]
            if not pending:
                return 0
            for item in pending:
                if item.text is not None and self._write(item.name, item.text, item.grant_id):
                    with self._lock:
                        item.spooled, item.text = True, None
                elif item.entry is not None:
                    try:
                        self._save(item.entry)  # saved, or its guard failed: done either way
                        self.done(item.entry)
                    except Exception as exc:
                        log.warning("held_outcome_not_saved", grant_id=item.grant_id,
                                    error=str(exc)[:300])
            if time.monotonic() >= deadline:
                return self.unspooled()
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
