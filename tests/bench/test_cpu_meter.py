"""CPU time per step from /proc: what the `ndp-bench train` limit analysis stands on."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ndp.bench.cpu import (
    CpuMeter,
    machine_busy_cpu_s,
    process_cpu_s,
    usable_cores,
    wait_for_quiet_machine,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_busy_process_is_charged_its_cpu_time_and_the_machine_at_least_as_much():
    meter = CpuMeter({"me": "self"})
    meter.start()
    _spin(0.3)
    cpu = meter.stop(steps=3)
    assert 0.09 <= cpu["per_process_s"]["me"] <= 0.2  # 0.1 s per step, in clock ticks
    assert cpu["machine_busy_s"] >= 0.09
    assert cpu["cores"] == usable_cores()
    assert cpu["floor_step_s"] == pytest.approx(cpu["machine_busy_s"] / cpu["cores"])


def test_a_sleeping_child_process_costs_almost_no_cpu():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"  # started
        meter = CpuMeter({"child": child.pid, "me": "self"})
        meter.start()
        _spin(0.2)
        cpu = meter.stop(steps=1)
        assert cpu["per_process_s"]["child"] < 0.05
        assert cpu["per_process_s"]["me"] >= 0.15
    finally:
        child.kill()
        child.wait()


def test_a_process_that_is_gone_reports_none_instead_of_a_number():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_cpu_s(child.pid) is None
    assert machine_busy_cpu_s() is not None


def test_a_system_starts_measuring_only_once_the_machine_is_quiet():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = wait_for_quiet_machine(busy_cores_below=0.5, window_s=0.2, max_wait_s=1.0)
        assert busy["waited_s"] >= 1.0  # a core spinning: gives up after max_wait_s
        assert busy["busy_cores"] >= 0.5
    finally:
        spinner.kill()
        spinner.wait()
    quiet = wait_for_quiet_machine(busy_cores_below=0.9, window_s=0.2, max_wait_s=5.0)
    assert quiet["waited_s"] < 5.0 and quiet["busy_cores"] < 0.9
