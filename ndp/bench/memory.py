"""Memory of processes on this machine, from /proc: what a benchmark reports next to time.

Why a module of its own: the benchmarks measure processes (storage nodes, GPU workers, the
bench itself, the os_paged baseline) from outside, as `ndp.bench.cpu` does for CPU time;
how much memory each one held at its peak is one such measurement, and both the ndp run and
the baselines report it.

Linux only (`/proc`); elsewhere a figure is 0 ("unknown").
"""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set (VmHWM) of a process on this machine, from /proc; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
