"""One run per directory: a lock file in each directory a run writes, naming the run.

Why: two `ndp-train` runs given the same `--output-dir`, `checkpoint.dir` or
`storage.flash_dir` both succeeded while interleaving their metrics.jsonl lines, overwriting
each other's checkpoints and sharing shard files. A run therefore claims its directories
before it writes into them, and a second run is refused with the directory and the run
holding it. Layout::

    <dir>/.ndp-run.lock     {"pid": 4242, "host": "node-3", "started": "2025-05-01T12:00:00+00:00",
                             "command": "ndp-train --config configs/dlrm.yaml ..."}

Why `fcntl.flock` and not only an exclusive create: the kernel drops a flock when its process
ends, however it ends (exception, Ctrl-C, SIGKILL, out of memory), so a directory is held
exactly as long as its run lives and a crashed run never blocks the next one. The file's
content only names the holder for messages. A run that dies without releasing leaves the
file behind: the next claimer finds it unlocked, names the run that left it in a warning
and takes it over. Release unlinks the file while still holding the lock; a claimer that
locked a file unlinked in the meantime sees that the path now names another inode and tries
again, so two runs never both believe they hold a directory.

Scope: the lock is taken by the driver on its own file system. A `storage.flash_dir` on other
machines (storage nodes on remote Ray hosts) is covered only where it is the same shared
file system.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from ndp.errors import NDPError

LOCK_FILE = ".ndp-run.lock"
_HOLDER_READ_TRIES = 20
"""Reads of a held lock file before giving up on the holder's identity (it writes it just
after it locks, so a claimer racing it may see an empty file for a moment)."""
_HOLDER_READ_PAUSE_S = 0.05

log = logging.getLogger(__name__)


class DirInUseError(NDPError):
    """A directory this run must write is held by another live run."""


class DirNotWritableError(NDPError):
    """A directory this run must write cannot be created or written (read-only file system,
    permissions, a file in the way): the user's path problem, said in one line."""


def _not_writable(role: str, directory: Path, exc: OSError) -> DirNotWritableError:
    code = errno.errorcode.get(exc.errno or 0, "?")
    return DirNotWritableError(
        f"{role}: cannot write to {directory}: {exc.strerror} ({code}); choose a writable directory"
    )


@dataclass(frozen=True)
class RunIdentity:
    """Who holds a directory: enough for a person to find the run and decide what to do."""

    pid: int
    host: str
    started: str
    """ISO 8601 time (UTC) at which the run claimed the directory."""
    command: str
    """The run's command line, shell-quoted."""

    @classmethod
    def of_this_process(cls) -> RunIdentity:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        )

    @classmethod
    def from_json(cls, text: str) -> RunIdentity | None:
        """The identity in a lock file, or None if it is empty or not one (a torn write)."""
        try:
            fields = json.loads(text)
            return cls(
                pid=int(fields["pid"]),
                host=str(fields["host"]),
                started=str(fields["started"]),
                command=str(fields["command"]),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}: {self.command}"

    def is_gone(self) -> bool:
        """True only when this is a process of this host that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class DirLock:
    """A directory claimed by this process; `release()` or leaving `with` gives it back."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self.lock_path = directory / LOCK_FILE
        self._fd = fd

    def release(self) -> None:
        """Unlink the lock file, then drop the lock (idempotent)."""
        if self._fd < 0:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim_dir(directory: str | Path, *, role: str, identity: RunIdentity | None = None) -> DirLock:
    """Claim `directory` (created if missing) for this run.

    Args:
        directory: the directory to own.
        role: how the user named it (`--output-dir`, `storage.flash_dir`), for messages.
        identity: written into the lock file; default: this process.

    Raises:
        DirInUseError: a live run holds it; the message names the directory and that run.
    """
    directory = Path(directory)
    lock_path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(role, directory, exc) from None
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _not_writable(role, directory, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DirInUseError(_in_use_message(role, directory, lock_path)) from None
            raise DirInUseError(
                f"{role}: cannot lock {lock_path} ({exc.strerror}); put the directory on a "
                "file system that supports file locks"
            ) from None
        if _names_inode_of(lock_path, fd):
            break
        os.close(fd)  # its holder released it (unlinked) between our open and our lock
    lock = DirLock(directory, fd)
    try:
        left_behind = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        if left_behind:
            _warn_taking_over(role, directory, RunIdentity.from_json(left_behind))
        payload = (identity or RunIdentity.of_this_process()).to_json().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
    except BaseException:
        lock.release()
        raise
    return lock


class DirLocks:
    """Several directories claimed together: all of them or none."""

    def __init__(self, locks: list[DirLock]) -> None:
        self.locks = locks

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def __enter__(self) -> DirLocks:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim_dirs(
    roles_and_dirs: Iterable[tuple[str, str | Path]], *, identity: RunIdentity | None = None
) -> DirLocks:
    """Claim each directory once (a directory named twice, e.g. the same path under two
    settings, is claimed under its first role); on a refusal, release those already taken."""
    taken: list[DirLock] = []
    seen: set[Path] = set()
    try:
        for role, directory in roles_and_dirs:
            resolved = Path(directory).resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            taken.append(claim_dir(directory, role=role, identity=identity))
    except BaseException:
        DirLocks(taken).release()
        raise
    return DirLocks(taken)


def read_holder(directory: str | Path) -> RunIdentity | None:
    """The identity written in `directory`'s lock file (held or left behind), if any."""
    try:
        return RunIdentity.from_json((Path(directory) / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None


def _names_inode_of(path: Path, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _in_use_message(role: str, directory: Path, lock_path: Path) -> str:
    holder = None
    for _ in range(_HOLDER_READ_TRIES):
        if (holder := read_holder(directory)) is not None:
            break
        time.sleep(_HOLDER_READ_PAUSE_S)
    who = holder.describe() if holder else f"a run that has not yet written {lock_path}"
    return (
        f"{role}: {directory} is in use by another run ({who}); wait for it to end or "
        "choose another directory"
    )


def _warn_taking_over(role: str, directory: Path, previous: RunIdentity | None) -> None:
    if previous is None:
        log.warning("%s: taking over %s: its lock file is unreadable and unlocked", role, directory)
        return
    why = "that process is gone" if previous.is_gone() else "no process holds its lock"
    log.warning(
        "%s: taking over %s from a run that did not release it (%s; %s)",
        role,
        directory,
        previous.describe(),
        why,
    )
