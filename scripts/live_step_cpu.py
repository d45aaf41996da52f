"""CPU per training step of each ndp process, and per thread of one of them, in a live run.

    python scripts/live_step_cpu.py [--scenario fits_in_dram] [--lookahead] [--seconds 20]
                                    [--threads-of storage-node-0] [--push during_backward]

Trains one `ndp-bench train` scenario (the `--quick` sizes) on a fresh NdpEngine (local Ray,
real actors, gRPC on loopback) for `--seconds`, the batches cycling, and prints each
component's CPU milliseconds per step from /proc (utime + stime, clock ticks). With
`--threads-of`, also that process's CPU per thread over the middle of the window, named by
Python thread where `py-spy` (in the venv) can read them, since Python threads do not set
their OS names (gRPC's `_serve` loop, its RPC handler threads, Ray's main thread...).

Why a script beside `ndp-bench`: the bench says how much CPU a node spends per step; this
says where inside the node it goes, which is what decides the next change (BENCHMARKS.md
quotes its output with the command).
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def process_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def thread_ticks(pid: int) -> dict[str, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def thread_names(pid: int) -> dict[str, str]:
    """{tid: Python thread name} from a short py-spy recording ({} without py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    out = Path(f"/tmp/live-step-cpu-{pid}.txt")
    command = [spy, "record", "-p", str(pid), "-d", "2", "-r", "50", "--format", "raw"]
    command += ["--threads", "--idle", "--nonblocking", "-o", str(out)]
    subprocess.run(command, capture_output=True, check=False)
    names = {}
    if out.exists():
        for line in out.read_text().splitlines():
            match = re.match(r"thread \((\d+)\): ([^;]+)", line)
            if match:
                names[match.group(1)] = match.group(2)
        out.unlink()
    return names


def per_thread(pid: int, seconds: float, report: list[str]) -> None:
    names = thread_names(pid)
    first = thread_ticks(pid)
    time.sleep(seconds)
    last = thread_ticks(pid)
    totals: collections.Counter[str] = collections.Counter()
    for tid, ticks in last.items():
        totals[names.get(tid, f"tid {tid}")] += ticks - first.get(tid, 0)
    report.append(f"per thread over {seconds:.0f} s (CPU ms per second):")
    for name, ticks in totals.most_common():
        if ticks:
            report.append(f"  {ticks / TICKS / seconds * 1e3:7.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="fits_in_dram")
    parser.add_argument("--lookahead", action="store_true")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads-of", metavar="COMPONENT")
    parser.add_argument("--push", choices=["with_next_lookup", "during_backward"])
    args = parser.parse_args()

    import ray

    from ndp.bench.train import BenchOptions, scenario_config
    from ndp.config import config_from_dict
    from ndp.coordinator import NdpEngine
    from ndp.data.loader import build_datasets
    from ndp.pipeline import with_lookahead
    from ndp.ray_local import init_local_ray

    init_local_ray()
    options = BenchOptions.quick()
    cfg = config_from_dict(copy.deepcopy(scenario_config(options, args.scenario)))
    if args.push:
        cfg = replace(cfg, pipeline=replace(cfg.pipeline, push=args.push))
    batches = list(build_datasets(cfg)[0].batches(options.batch_size))
    stream = ((step, batches[step % len(batches)]) for step in itertools.count())
    report: list[str] = []
    with NdpEngine(cfg) as engine:
        pids = engine.component_pids()
        steps = with_lookahead(stream, engine, cfg.pipeline) if args.lookahead else stream
        watcher = None
        for step, batch in steps:
            engine.train_step(step, batch)
            if step == 10:  # warmed up
                first = {name: process_ticks(pid) for name, pid in pids.items()}
                started, first_step = time.perf_counter(), step
                if args.threads_of:
                    window = max(1.0, args.seconds - 6.0)
                    watcher = threading.Thread(
                        target=per_thread, args=(pids[args.threads_of], window, report)
                    )
                    watcher.start()
            elif step > 10 and time.perf_counter() - started > args.seconds:
                break
        engine.flush()
        elapsed, done = time.perf_counter() - started, step - first_step
        last = {name: process_ticks(pid) for name, pid in pids.items()}
        if watcher is not None:
            watcher.join()
    ray.shutdown()
    mode = "lookahead" if args.lookahead else "no lookahead"
    print(f"{args.scenario}, {mode}, push {cfg.pipeline.push}: {done / elapsed:.2f} steps/s")
    for name in pids:
        print(f"  {name}: {(last[name] - first[name]) / TICKS / done * 1e3:.2f} CPU ms/step")
    print("\n".join(report))


if __name__ == "__main__":
    main()
