"""One measurement for every system a benchmark compares: samples/s, per-step phases, CPU.

`ndp-bench train` (`ndp.bench.train`) and the os_paged subprocess (`ndp.bench.baselines`)
both time their engines with `measure_engine`, so every system is measured the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ndp.bench.cpu import CpuMeter, wait_for_quiet_machine
from ndp.config import Config
from ndp.pipeline import with_lookahead


def measure_engine(
    engine: Any,
    batches: list[Any],
    batch_size: int,
    warmup: int,
    steps: int,
    *,
    cfg: Config | None = None,
    at_timed_start: Callable[[], None] = lambda: None,
    cpu_pids: Mapping[str, int | str] | None = None,
) -> dict[str, Any]:
    """Train `warmup` untimed then `steps` timed steps on `batches[0 : warmup + steps]`;
    samples/s, per-step phase seconds and per-step CPU seconds (`ndp.bench.cpu`).

    Every system is measured by this one function, on a fresh engine and the same batches,
    starting once the machine is quiet (`ndp.bench.cpu.wait_for_quiet_machine`),
    and its clock stops only once the last step's update is applied: an engine that returns
    from `train_step` before its update is done (ndp sends the gradient push and goes on)
    is flushed inside the timed window, so no system's last update falls outside it.

    Args:
        batches: the scenario's batches, in training order.
        cfg: with a lookahead depth > 0, batches go through `with_lookahead` (ndp only).
        at_timed_start: called between the warm-up and the timed steps (counters reset).
        cpu_pids: {name: pid} of the processes doing the work; None: this process only.
    """
    settled = wait_for_quiet_machine()  # what ran before this system has finished
    meter = CpuMeter(cpu_pids) if cpu_pids is not None else CpuMeter()
    total = warmup + steps
    assert len(batches) >= total, f"{len(batches)} batches for {total} steps"
    stream: Any = ((i, batches[i]) for i in range(total))
    if cfg is not None:
        stream = with_lookahead(stream, engine, cfg.pipeline)
    flush = getattr(engine, "flush", lambda: None)
    start = time.perf_counter()
    for step, batch in stream:
        if step == warmup:
            flush()  # the warm-up's last update is not the timed window's work
            at_timed_start()
            engine.timings()
            meter.start()
            start = time.perf_counter()
        engine.train_step(step, batch)
    flush()
    elapsed = time.perf_counter() - start
    cpu = meter.stop(steps)
    medians = getattr(engine, "phase_medians", dict)()  # in-process engines time each block
    timings = engine.timings()
    per_step = {k: v / steps for k, v in timings.items() if k.endswith("_s")}
    beside = {"storage_update_s"}  # the nodes' clocks: beside the workers' phases
    per_step["unaccounted_s"] = elapsed / steps - sum(
        v for k, v in per_step.items() if k not in beside
    )
    samples = steps * batch_size
    busy = cpu.get("machine_busy_s")
    return {
        "samples_per_s": samples / elapsed,
        "step_s": elapsed / steps,
        "settled_before_start": settled,
        "per_step": per_step,
        "per_step_median": {k: v for k, v in medians.items() if k.endswith("_s")},
        "cpu_per_step": cpu,
        "machine_cpu_us_per_sample": None if busy is None else busy * steps / samples * 1e6,
        "link_bytes_per_sample": {
            k: v / samples for k, v in timings.items() if k.startswith("link_bytes")
        },
    }
