"""CPU time of processes and of the whole machine over a measured window, from /proc.

Why: on a small machine a system of several processes (storage nodes, GPU workers, the
coordinator, Ray's daemons) can be limited by the cores rather than by any one phase. The
CPU-seconds the machine was busy per step, divided by the cores this run may use, is a
floor under the step time that no overlap can beat; a report that shows it next to the step
time says whether the cores are what limits a system.

    busy CPU-s per step / usable cores  <=  step seconds   (any schedule)

Linux only (`/proc`); elsewhere every figure is None and the report says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int | str = "self") -> float | None:
    """User + system CPU seconds of a process (all its threads) so far; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime


def machine_busy_cpu_s() -> float | None:
    """CPU seconds all cores of the machine spent not idle so far; None if unknown."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    del idle, iowait  # waiting is not work
    return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S


def usable_cores() -> int:
    """Cores this process (and the processes it starts) may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class CpuMeter:
    """CPU seconds of named processes and of the machine between `start()` and `stop()`.

    Args:
        pids: {name: pid or "self"} of the processes to attribute CPU time to.
    """

    pids: Mapping[str, int | str] = field(default_factory=lambda: {"bench_process": "self"})
    _start: dict[str, float | None] = field(default_factory=dict)
    _machine_start: float | None = None

    def start(self) -> None:
        self._start = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        self._machine_start = machine_busy_cpu_s()

    def stop(self, steps: int) -> dict:
        """Per-step CPU seconds: {"per_process": {name: s}, "machine_busy", "cores", "floor_step_s"}."""
        per_process: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            now, then = process_cpu_s(pid), self._start.get(name)
            per_process[name] = None if now is None or then is None else (now - then) / steps
        machine_now = machine_busy_cpu_s()
        machine = (
            None
            if machine_now is None or self._machine_start is None
            else (machine_now - self._machine_start) / steps
        )
        cores = usable_cores()
        return {
            "per_process_s": per_process,
            "machine_busy_s": machine,
            "cores": cores,
            "floor_step_s": None if machine is None else machine / cores,
        }


def wait_for_quiet_machine(
    *, busy_cores_below: float = 0.15, window_s: float = 0.5, max_wait_s: float = 20.0
) -> dict[str, float | None]:
    """Wait until the whole machine's busy CPU over `window_s` is below `busy_cores_below`
    cores (or `max_wait_s` passed); {"waited_s", "busy_cores"} of the last window.

    Why: each system of a benchmark starts right after the previous one stopped, and what it
    left behind (Ray actors exiting, a fresh local Ray's daemons starting, page cache
    writeback) kept the machine busy for seconds: on 2 cores the first system of a scenario
    measured 10-36% slower in one run than in the next. Every system now starts on a quiet
    machine. None figures where /proc is not readable (nothing is waited for).
    """
    started = time.monotonic()
    busy = None
    while True:
        before = machine_busy_cpu_s()
        if before is None:
            return {"waited_s": 0.0, "busy_cores": None}
        time.sleep(window_s)
        after = machine_busy_cpu_s()
        busy = None if after is None else (after - before) / window_s
        waited = time.monotonic() - started
        if busy is None or busy < busy_cores_below or waited >= max_wait_s:
            return {"waited_s": waited, "busy_cores": busy}
