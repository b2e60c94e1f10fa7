"""Owner files: which lease owners of this host are gone, so their leases end at once.

Every process that claims grants writes its owner string (``host:pid:random``) into the
leases it takes, and for its whole lifetime holds an exclusive ``flock`` on
``<state dir>/owners/<owner>``. The kernel drops that lock when the process ends,
however it ends (``kill -9``, the OOM killer, the watchdog). So:

* a file here that can be locked belongs to a process of this host that is gone (or a
  host that was rebooted): its leases are taken over at once, in doubt (a refresh may
  have been on the wire when it died), instead of after the whole lease;
* a lease whose owner has no file here belongs to another host (or a process with
  another state directory): it keeps its full length.

Pids are no evidence: the shipped unit hides other processes (``ProtectProc=invisible``),
containers share a boot id and reuse pids, and a ``run --once`` started by root is alive
too. A lock is evidence. A clean exit removes its own file; the file of a dead owner is
removed once its leases were taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

from .errors import TokendError

# Owners are file names here: no "/", no leading "." (our own files in creation), and
# short enough for the lease_owner column (String(255)) and for a file name.
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,199}")
# A file younger than this and still empty may be one whose owner is only now locking
# and writing it; it is not taken for a dead owner's.
_CREATION_GRACE = 60.0


def new_owner() -> str:
    """A fresh owner string: this host, this pid, and a random part (pids are reused)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:60].lstrip(".") or "host"
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def check_owner(owner: str) -> str:
    if not _SAFE.fullmatch(owner):
        raise ValueError(f"owner {owner!r} is not usable as a file name")
    return owner


class OwnerLock:
    """This process's owner file, created and locked; released by :meth:`release` on a
    clean exit. If the object is dropped unreleased the lock goes with it (as on a crash)
    and the file stays, so the leases are taken over like a dead process's."""

    def __init__(self, directory: Path, owner: str) -> None:
        self.owner = check_owner(owner)
        self.path = directory / owner
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            raise TokendError(f"lease owner {owner!r} is already in use "
                              f"({self.path} exists)") from None
        except OSError as exc:
            raise TokendError(f"state.dir: cannot create {self.path}: {exc.strerror}") from None
        try:
            # Blocks only while another process's scan looks at the new, empty file.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, (owner + "\n").encode())
        except OSError as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise TokendError(f"state.dir: cannot lock {self.path}: {exc.strerror}") from None
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """A clean exit: the file goes first, then the lock (a scan that opened the file
        just before may still lock it then; it finds no lease of ours left)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._fd = None
        self._finalizer()


@contextlib.contextmanager
def dead(directory: Path, own: str) -> Iterator[list[str]]:
    """The owners in ``directory`` whose process is gone, their files locked by us for
    the block (so no other process takes them over too); the files are removed when the
    block ends without an error, and kept (to be tried again) when it raises."""
    held: list[tuple[int, str]] = []
    try:
        for owner in _candidates(directory, own):
            fd = _lock_if_dead(directory / owner)
            if fd is not None:
                held.append((fd, owner))
        yield [owner for _fd, owner in held]
        for _fd, owner in held:
            with contextlib.suppress(FileNotFoundError):
                (directory / owner).unlink()
    finally:
        for fd, _owner in held:
            os.close(fd)


def _candidates(directory: Path, own: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [n for n in names if n != own and _SAFE.fullmatch(n)]


def _lock_if_dead(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile (a clean exit), or not ours to read
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # locked: its owner lives
        os.close(fd)
        return None
    try:
        st = os.fstat(fd)
        current = os.stat(path, follow_symlinks=False)
        same = (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino)
        being_created = st.st_size == 0 and time.time() - st.st_mtime < _CREATION_GRACE
    except OSError:
        same = False
        being_created = False
    if not same or being_created:
        os.close(fd)
        return None
    return fd
