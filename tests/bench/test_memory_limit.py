"""Memory cgroups for the os_paged baseline (`ndp.bench.memory_limit`) and its flash bytes.

The file readers run on real files written here in both versions' formats; everything else
runs on this machine's real cgroup hierarchy (v2 or v1, whichever it offers), skipped with
the reason `make_memory_cgroup` gives where no group can be made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ndp.bench import memory_limit
from ndp.bench.baselines import flash_bytes
from ndp.bench.memory_limit import MemoryCgroup, make_memory_cgroup

MIB = 1 << 20

V2_STAT = """anon 7340032
file 20971520
kernel 1048576
shmem 0
file_mapped 4096
pgfault 1200
pgmajfault 17
"""
V1_STAT = """cache 12582912
rss 3145728
rss_huge 0
mapped_file 0
pgmajfault 5
hierarchical_memory_limit 9223372036854771712
total_cache 12582912
"""


# --------------------------------------------------------------------------- file formats


def test_v2_group_reads_page_cache_from_file_and_anon_from_anon(tmp_path):
    (tmp_path / "memory.stat").write_text(V2_STAT)
    (tmp_path / "memory.current").write_text("29360128\n")
    group = MemoryCgroup(tmp_path, 2)
    assert group.usage_bytes() == 29360128
    assert group.page_cache_bytes() == 20 * MIB
    assert group.anon_bytes() == 7 * MIB
    assert group.stat()["pgmajfault"] == 17


def test_v1_group_reads_page_cache_from_cache_and_anon_from_rss(tmp_path):
    (tmp_path / "memory.stat").write_text(V1_STAT)
    (tmp_path / "memory.usage_in_bytes").write_text("16777216\n")
    group = MemoryCgroup(tmp_path, 1)
    assert group.usage_bytes() == 16 * MIB
    assert group.page_cache_bytes() == 12 * MIB
    assert group.anon_bytes() == 3 * MIB


def test_v2_limit_hits_and_oom_kills_come_from_memory_events(tmp_path):
    events = "low 0\nhigh 3\nmax 41\noom 2\noom_kill 1\noom_group_kill 0\n"
    (tmp_path / "memory.events").write_text(events)
    group = MemoryCgroup(tmp_path, 2)
    assert group.limit_hits() == 41
    assert group.oom_kills() == 1


def test_v1_limit_hits_come_from_failcnt_and_oom_kills_from_oom_control(tmp_path):
    (tmp_path / "memory.failcnt").write_text("9\n")
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    group = MemoryCgroup(tmp_path, 1)
    assert group.limit_hits() == 9
    assert group.oom_kills() == 2


def test_v2_io_bytes_sum_rbytes_and_wbytes_over_every_device(tmp_path):
    (tmp_path / "io.stat").write_text(
        "253:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
        "259:1 rbytes=1048576 wbytes=0 rios=256 wios=0 dbytes=0 dios=0\n"
    )
    assert MemoryCgroup(tmp_path, 2).io_bytes() == (4096 + MIB, 8192)


def test_io_bytes_of_a_group_without_io_stat_or_on_v1_are_unknown_not_zero(tmp_path):
    assert MemoryCgroup(tmp_path, 2).io_bytes() is None
    (tmp_path / "io.stat").write_text("")
    assert MemoryCgroup(tmp_path, 2).io_bytes() == (0, 0)  # no I/O yet: a valid reading
    assert MemoryCgroup(tmp_path, 1).io_bytes() is None


def test_v2_limit_is_written_to_memory_max_and_none_means_max(tmp_path):
    group = MemoryCgroup(tmp_path, 2)
    group.set_limit(64 * MIB)
    assert (tmp_path / "memory.max").read_text() == str(64 * MIB)
    group.set_limit(None)
    assert (tmp_path / "memory.max").read_text() == "max"


def test_v2_peak_without_memory_peak_is_unknown(tmp_path):
    group = MemoryCgroup(tmp_path, 2)
    assert group.reset_peak() is False
    assert group.peak_bytes() is None


def test_without_a_mounted_memory_hierarchy_no_group_and_the_note_says_why(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw,relatime 0 0\nsysfs /sys sysfs rw 0 0\n")
    monkeypatch.setattr(memory_limit, "MOUNTS", mounts)
    group, note = make_memory_cgroup("ndp-test-none")
    assert group is None
    assert "v2: no cgroup2 hierarchy mounted" in note
    assert "v1: no memory hierarchy mounted" in note


# --------------------------------------------------------------------------- flash bytes


def test_flash_bytes_prefer_the_cgroups_device_io_and_count_the_window_only():
    before = {"proc_io": (100, 10), "cgroup_io": (1000, 0)}
    after = {"proc_io": (4196, 4106), "cgroup_io": (9192, 4096)}
    flash = flash_bytes(before, after, samples=8)
    assert flash["flash_bytes_source"] == "cgroup_io"
    assert flash["flash_bytes_read"] == 8192 and flash["flash_bytes_written"] == 4096
    assert flash["flash_bytes_read_per_sample"] == 1024
    assert flash["flash_bytes_written_per_sample"] == 512
    assert flash["flash_bytes_by_source"]["proc_io"] == {"read": 4096, "written": 4096}


def test_flash_bytes_fall_back_to_proc_io_without_the_cgroups_counters():
    flash = flash_bytes({"proc_io": (0, 0)}, {"proc_io": (512, 256)}, samples=2)
    assert flash["flash_bytes_source"] == "proc_io"
    assert (flash["flash_bytes_read_per_sample"], flash["flash_bytes_written_per_sample"]) == (
        256,
        128,
    )


def test_proc_io_counts_a_processes_mmap_reads_and_the_pages_it_dirties(tmp_path):
    """The kernel, not the file API, does the I/O of memory-mapped tables: faults read, and
    stores into the mapping dirty pages that /proc/PID/io counts as written."""
    path = _uncached_file(tmp_path / "rows.f32", 8 * MIB)
    script = (
        "import mmap, sys\n"
        "from ndp.bench.baselines import proc_io_bytes\n"
        "f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0)\n"
        "r0, w0 = proc_io_bytes()\n"
        "total = sum(m[i] for i in range(0, len(m), 4096))\n"
        "for i in range(0, len(m), 4096): m[i] = 1\n"
        "r1, w1 = proc_io_bytes(); print(r1 - r0, w1 - w0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True
    )
    read, written = map(int, out.stdout.split())
    assert read >= 8 * MIB
    assert written >= 8 * MIB


# --------------------------------------------------------------------------- a real group


@pytest.fixture()
def group():
    """A real child memory cgroup on this machine (v2 or v1), removed after the test."""
    made, note = make_memory_cgroup(f"ndp-test-{os.getpid()}-{os.urandom(4).hex()}")
    if made is None:
        pytest.skip(note)
    yield made
    made.remove()


def _uncached_file(path: Path, size: int) -> Path:
    """A file of `size` bytes on disk and not in the page cache (so reads go to the disk)."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def _limit_file(group: MemoryCgroup) -> Path:
    return group.path / ("memory.limit_in_bytes" if group.version == 1 else "memory.max")


# Reads the file given as argv[1] once per line read from stdin, and says "done" each time;
# holds 32 MiB of anonymous memory meanwhile.
READER = (
    "import sys\n"
    "held = bytearray(32 << 20)\n"
    "for line in sys.stdin:\n"
    "    with open(sys.argv[1], 'rb') as f:\n"
    "        while f.read(1 << 20): pass\n"
    "    print('done', flush=True)\n"
)


def _start_reader(group: MemoryCgroup, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=group.add_process,
    )


def _read_once(reader: subprocess.Popen) -> None:
    reader.stdin.write("go\n")
    reader.stdin.flush()
    assert reader.stdout.readline() == "done\n"


def test_real_group_holds_a_subprocess_its_memory_and_a_limit_then_is_removed(group, tmp_path):
    path = _uncached_file(tmp_path / "table.bin", 16 * MIB)
    reader = _start_reader(group, path)
    try:
        _read_once(reader)
        assert group.pids() == [reader.pid]
        # what the process faulted in is charged to the group: its heap and the file's pages
        assert group.anon_bytes() >= 32 * MIB
        assert group.page_cache_bytes() >= 15 * MIB
        assert group.usage_bytes() >= group.anon_bytes() + group.page_cache_bytes() - MIB
        limit = group.usage_bytes() + 64 * MIB
        group.set_limit(limit)
        assert int(_limit_file(group).read_text()) == limit // 4096 * 4096
        assert group.limit_hits() == 0 and group.oom_kills() == 0
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    assert group.remove() is True
    assert not group.path.exists()


def test_real_reclaim_drops_the_page_cache_and_the_limit_caps_it(group, tmp_path):
    path = _uncached_file(tmp_path / "table.bin", 48 * MIB)
    reader = _start_reader(group, path)
    try:
        _read_once(reader)
        cached = group.page_cache_bytes()
        assert cached >= 40 * MIB
        # reclaim down to 8 MiB of page cache: the clean pages of the file go
        non_cache = group.usage_bytes() - cached
        assert group.reclaim_to(non_cache + 8 * MIB) is True
        assert group.page_cache_bytes() <= 8 * MIB + MIB
        # a limit 16 MiB above the rest: reading the whole file again stays under it,
        # and the kernel reports that the group hit its limit
        limit = group.usage_bytes() + 16 * MIB
        group.set_limit(limit)
        hits = group.limit_hits()
        group.reset_peak()  # False on v2 before kernel 6.12: then the peak is unknown
        _read_once(reader)
        assert group.usage_bytes() <= limit
        assert group.page_cache_bytes() <= limit - group.anon_bytes()
        assert group.limit_hits() > hits
        peak = group.peak_bytes()
        assert peak is None or group.usage_bytes() - MIB <= peak <= limit
        assert group.oom_kills() == 0
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)


def test_a_v1_group_says_why_v2_was_not_used(group):
    if group.version != 1:
        pytest.skip(f"this machine gave a v{group.version} group")
    _, note = make_memory_cgroup(group.path.name + "-second")
    try:
        assert note.startswith("cgroup v1 ") and "(v2: " in note
    finally:
        MemoryCgroup(group.path.parent / (group.path.name + "-second"), 1).remove()


# --------------------------------------------------------------------------- the os_paged run


@pytest.mark.slow
def test_os_paged_reports_the_limit_its_cgroup_version_and_timed_flash_bytes(group):
    from ndp.bench.train import BenchOptions, _run_os_paged, scenario_config

    options = BenchOptions.quick().scaled(0.05)
    raw = scenario_config(options, "large_zipf")
    budget = raw["storage"]["cache_bytes"] * raw["cluster"]["num_storage_nodes"]
    result = _run_os_paged(raw, options, budget)

    limit = result["memory_limit"]
    assert limit["applied"] is True
    assert limit["cgroup_version"] == group.version
    assert limit["page_cache_budget_bytes"] == budget
    assert limit["oom_kills"] == 0
    # the tables are 8x the budget: the timed steps fault rows in from the disk
    assert result["flash_bytes_source"] in ("proc_io", "cgroup_io")
    assert result["flash_bytes_read"] > 0
    samples = options.steps * options.batch_size
    assert result["flash_bytes_read_per_sample"] == result["flash_bytes_read"] / samples
    assert result["flash_bytes_written_per_sample"] == result["flash_bytes_written"] / samples
    if result["flash_bytes_source"] == "proc_io":  # counted as the updates dirty the rows
        assert result["flash_bytes_written"] > 0
    # the run's own group is gone (the fixture's is another one)
    assert [p.name for p in group.path.parent.glob(f"ndp-bench-{os.getpid()}-*")] == []


@pytest.mark.slow
def test_os_paged_without_a_memory_cgroup_is_marked_not_applied_with_the_reason(
    tmp_path, monkeypatch
):
    from ndp.bench.train import BenchOptions, _run_os_paged, scenario_config

    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw,relatime 0 0\n")
    monkeypatch.setattr(memory_limit, "MOUNTS", mounts)
    options = BenchOptions.quick().scaled(0.02)
    result = _run_os_paged(scenario_config(options, "fits_in_dram"), options, 1 << 20)

    assert result["memory_limit"]["applied"] is False
    assert "no memory hierarchy mounted" in result["memory_limit"]["note"]
    assert result["flash_bytes_source"] == "proc_io"
    assert result["flash_bytes_read"] >= 0 and result["flash_bytes_written"] >= 0
