"""Memory cgroups for the os_paged baseline: one child group, v1 or v2, behind one interface.

Why: the os_paged baseline only compares with ndp if its page cache gets the storage nodes'
DRAM budget, and the kernel's way to hold a process to a budget is a memory cgroup. Machines
mount either the legacy hierarchy (v1: one hierarchy per controller, the memory controller
at e.g. /sys/fs/cgroup/memory) or the unified one (v2: every controller at /sys/fs/cgroup),
and a hybrid machine has both, the memory controller bound to whichever mounted it. The two
name the same quantities differently::

    quantity              v1 file (memory controller)      v2 file (unified hierarchy)
    limit                 memory.limit_in_bytes            memory.max
    usage                 memory.usage_in_bytes            memory.current
    page cache / anon     memory.stat  cache / rss         memory.stat  file / anon
    peak since reset      memory.max_usage_in_bytes        memory.peak (absent before 5.19;
                          (write 0: reset)                  resettable, per open file, >= 6.12)
    limit hits            memory.failcnt                   memory.events  max
    OOM kills             memory.oom_control  oom_kill     memory.events  oom_kill
    reclaim to a target   memory.limit_in_bytes (EBUSY     memory.reclaim (EAGAIN if short),
                          when it cannot)                  else memory.high, which never OOMs
    disk bytes            (not read)                       io.stat  rbytes= / wbytes=
    members               cgroup.procs                     cgroup.procs

`make_memory_cgroup` makes the child group where the mounted hierarchy allows it (v2 first,
then v1) or says why it could not; `MemoryCgroup` reads and sets the group the same way on
both. Everything here is a file read or write under /sys/fs/cgroup: no dependencies, so the
benchmark's subprocess can open the group its parent made (`MemoryCgroup(path, version)`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MOUNTS = Path("/proc/self/mounts")
PROC_CGROUP = Path("/proc/self/cgroup")


def read_keyed(path: Path) -> dict[str, int]:
    """A flat keyed file ("key value" per line: memory.stat, memory.events) -> {key: value}."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def read_io_stat(path: Path) -> tuple[int, int]:
    """A v2 io.stat file ("MAJ:MIN rbytes=N wbytes=N rios=N ..." per device) -> bytes (read,
    written) summed over the devices."""
    read_bytes = written_bytes = 0
    for line in path.read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        read_bytes += int(fields.get("rbytes", 0))
        written_bytes += int(fields.get("wbytes", 0))
    return read_bytes, written_bytes


class MemoryCgroup:
    """One memory cgroup directory, read and set the same way on v1 and v2.

    Attributes:
        path: the group's directory, e.g. /sys/fs/cgroup/memory/ndp-bench-1-2 (v1) or
            /sys/fs/cgroup/ndp-bench-1-2 (v2).
        version: 1 or 2, which file names `path` holds.
    """

    def __init__(self, path: str | Path, version: int) -> None:
        assert version in (1, 2), version
        self.path = Path(path)
        self.version = version
        self._peak_fd: int | None = None
        """v2: memory.peak opened by `reset_peak` (a reset holds only for that open file)."""
        self._peak_known = True
        """False once a v2 reset failed: memory.peak then is not the peak since the reset."""

    # ----------------------------------------------------------------- reads

    def stat(self) -> dict[str, int]:
        """memory.stat as {key: bytes or count}."""
        return read_keyed(self.path / "memory.stat")

    def usage_bytes(self) -> int:
        """Memory charged to the group: page cache, anonymous and kernel memory."""
        return self._read_int("memory.usage_in_bytes" if self.version == 1 else "memory.current")

    def page_cache_bytes(self) -> int:
        """Page cache charged to the group (file-backed pages, tmpfs included)."""
        return self.stat()["cache" if self.version == 1 else "file"]

    def anon_bytes(self) -> int:
        """Anonymous memory of the group's processes (heap, stacks, torch tensors)."""
        return self.stat()["rss" if self.version == 1 else "anon"]

    def limit_hits(self) -> int:
        """How often usage reached the limit so far (v1 failcnt, v2 memory.events max)."""
        if self.version == 1:
            return self._read_int("memory.failcnt")
        return read_keyed(self.path / "memory.events").get("max", 0)

    def oom_kills(self) -> int:
        """Processes of the group the OOM killer has killed so far."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return read_keyed(self.path / name).get("oom_kill", 0)

    def io_bytes(self) -> tuple[int, int] | None:
        """Bytes (read, written) the group's I/O moved to and from block devices, writeback
        by the kernel's flusher threads included (v2 io.stat); None where not readable (v1,
        or the io controller not enabled for the group)."""
        if self.version == 1:
            return None
        try:
            return read_io_stat(self.path / "io.stat")
        except (OSError, ValueError):
            return None

    # ----------------------------------------------------------------- peak

    def reset_peak(self) -> bool:
        """Start a new peak measurement; False where the kernel cannot (v2 before 6.12)."""
        if self.version == 1:
            self._write("memory.max_usage_in_bytes", 0)
            return True
        try:
            if self._peak_fd is None:
                self._peak_fd = os.open(self.path / "memory.peak", os.O_RDWR)
            os.write(self._peak_fd, b"reset\n")
            return True
        except OSError:
            self._close_peak()
            self._peak_known = False
            return False

    def peak_bytes(self) -> int | None:
        """Largest usage since the last `reset_peak` (or since the group was made, if never
        reset); None where unknown (no memory.peak, or a reset the kernel refused)."""
        if self.version == 1:
            return self._read_int("memory.max_usage_in_bytes")
        if self._peak_fd is not None:
            os.lseek(self._peak_fd, 0, os.SEEK_SET)
            return int(os.read(self._peak_fd, 64))
        if not self._peak_known:
            return None
        try:
            return self._read_int("memory.peak")
        except OSError:
            return None

    # ----------------------------------------------------------------- writes

    def set_limit(self, limit_bytes: int | None) -> None:
        """Cap the group's memory at `limit_bytes` (None: no cap).

        Keep it at or above `usage_bytes()`: below, v1 refuses (OSError EBUSY) when it cannot
        reclaim enough, but v2 invokes the OOM killer. `reclaim_to` first is the safe way
        down.
        """
        if self.version == 1:
            self._write("memory.limit_in_bytes", -1 if limit_bytes is None else limit_bytes)
        else:
            self._write("memory.max", "max" if limit_bytes is None else limit_bytes)

    def reclaim_to(self, target_bytes: int) -> bool:
        """Reclaim (page cache first) until usage <= `target_bytes`; never kills. False when
        the kernel could not get that low (dirty or locked pages, anonymous memory).

        v1 does it by lowering memory.limit_in_bytes to the target, so the limit stays
        there on success: follow with `set_limit`.
        """
        excess = self.usage_bytes() - target_bytes
        if excess <= 0:
            return True
        if self.version == 1:
            try:
                self._write("memory.limit_in_bytes", target_bytes)
                return True
            except OSError:  # EBUSY: the kernel could not reclaim that much
                return False
        if (self.path / "memory.reclaim").exists():
            try:
                self._write("memory.reclaim", excess)
            except OSError:  # EAGAIN: reclaimed less than asked
                pass
        else:  # before 5.19: lowering memory.high reclaims synchronously (and never OOMs)
            self._write("memory.high", target_bytes)
            self._write("memory.high", "max")
        return self.usage_bytes() <= target_bytes

    def add_process(self, pid: int | None = None) -> None:
        """Move process `pid` (None: the calling process) and its threads into the group."""
        self._write("cgroup.procs", os.getpid() if pid is None else pid)

    def pids(self) -> list[int]:
        """Processes in the group."""
        return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]

    def remove(self, timeout_s: float = 5.0) -> bool:
        """Remove the group (its processes gone); False if it still held one after
        `timeout_s` (an exited child leaves the group asynchronously)."""
        self._close_peak()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)

    def _close_peak(self) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None

    def _read_int(self, name: str) -> int:
        return int((self.path / name).read_text())

    def _write(self, name: str, value: int | str) -> None:
        (self.path / name).write_text(str(value))

    def __repr__(self) -> str:
        return f"MemoryCgroup({str(self.path)!r}, version={self.version})"


# --------------------------------------------------------------------------- making one


def make_memory_cgroup(name: str) -> tuple[MemoryCgroup | None, str]:
    """A fresh child memory cgroup `name`, or None; with a note saying where, or why not.

    Tries the hierarchies this machine mounts, as they say: v2 where the unified hierarchy
    offers the memory controller (a child of its root, else of this process's group, with
    `+memory` enabled in the parent's cgroup.subtree_control if needed, `+io` too where
    allowed, for `io_bytes`), then v1 (a child of the memory hierarchy's root).
    """
    v1_root, v2_root = _cgroup_mounts()
    notes = []
    if v2_root is None:
        notes.append("v2: no cgroup2 hierarchy mounted")
    else:
        group, why = _make_v2(v2_root, name)
        if group is not None:
            return group, f"cgroup v2 {group.path}"
        notes.append(f"v2: {why}")
    if v1_root is None:
        notes.append("v1: no memory hierarchy mounted")
    else:
        try:
            (v1_root / name).mkdir()
            return MemoryCgroup(v1_root / name, 1), f"cgroup v1 {v1_root / name} ({notes[0]})"
        except OSError as exc:
            notes.append(f"v1: cannot make a group in {v1_root}: {exc.strerror}")
    return None, "no memory cgroup could be made (" + "; ".join(notes) + ")"


def _cgroup_mounts() -> tuple[Path | None, Path | None]:
    """Mount points of the v1 memory hierarchy and of the v2 (unified) hierarchy."""
    v1 = v2 = None
    for line in MOUNTS.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount_point, fs_type, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fs_type == "cgroup" and "memory" in options and v1 is None:
            v1 = mount_point
        elif fs_type == "cgroup2" and v2 is None:
            v2 = mount_point
    return v1, v2


def _own_v2_group(root: Path) -> Path | None:
    """This process's v2 group ("0::/path" in /proc/self/cgroup) under `root`."""
    for line in PROC_CGROUP.read_text().splitlines():
        if line.startswith("0::"):
            group = (root / line[3:].lstrip("/")).resolve()
            return group if group.is_relative_to(root.resolve()) else None
    return None


def _make_v2(root: Path, name: str) -> tuple[MemoryCgroup | None, str]:
    """A child `name` with the memory controller under `root` or this process's group."""
    if "memory" not in _controllers(root / "cgroup.controllers"):
        return None, (
            f"memory controller not in {root}/cgroup.controllers "
            "(bound to a v1 hierarchy, or not delegated here)"
        )
    parents = [root]
    own = _own_v2_group(root)
    if own is not None and own != root.resolve():
        parents.append(own)
    reasons = []
    for parent in parents:
        subtree = parent / "cgroup.subtree_control"
        try:
            if "memory" not in _controllers(subtree):
                # fails with EBUSY where `parent` holds processes and is not the root
                subtree.write_text("+memory")
        except OSError as exc:
            reasons.append(f"cannot enable memory in {subtree}: {exc.strerror}")
            continue
        try:
            if "io" not in _controllers(subtree):
                subtree.write_text("+io")
        except OSError:
            pass  # io.stat is a bonus: without it, flash bytes come from /proc/PID/io
        try:
            (parent / name).mkdir()
        except OSError as exc:
            reasons.append(f"cannot make a group in {parent}: {exc.strerror}")
            continue
        return MemoryCgroup(parent / name, 2), ""
    return None, "; ".join(reasons)


def _controllers(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()
