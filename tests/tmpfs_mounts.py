"""Small tmpfs mounts for tests of full and read-only directories.

Why mounts: the tests run as root, and root ignores permissions, so a read-only directory
must be a read-only file system; a full one is a tmpfs of a few KiB. Needs root (or
CAP_SYS_ADMIN): without it the test is skipped, naming why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(args: list[str], target: Path) -> None:
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); needs root")


@contextmanager
def tmpfs_mounts(parent: Path) -> Iterator:
    """Yields `mount(size, read_only=False) -> Path`: a fresh tmpfs of `size` bytes under
    `parent`; every one is unmounted on exit."""
    mounts: list[Path] = []

    def mount(size: int, *, read_only: bool = False) -> Path:
        target = parent / f"tmpfs{len(mounts)}"
        target.mkdir()
        _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs"], target)
        mounts.append(target)
        if read_only:
            _mount(["-o", "remount,ro"], target)
        return target

    try:
        yield mount
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
