"""Interleaved measurement rounds: every system of a scenario measured more than once, the
rounds alternating in direction, each figure reported as its median across rounds.

Why: on a shared 2-core VM the whole machine's speed drifts by 15-25% over minutes (two
`ndp-bench train --quick` runs five minutes apart measured all_gpu at 24.9k and 30.4k
samples/s on a quiet machine, and within one run the same all_gpu model at 24.9k and 31.8k
in two scenarios). A single window per system puts that drift into every ratio. Running the
systems forward in one round and backward in the next puts every system at the same mean
position in time, so a drift that is linear over the scenario cancels out of the ratio of
medians, and with three or more rounds one disturbed window no longer decides a figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

MAX_OF_ROUNDS = ("peak_rss_bytes",)
"""Keys whose figure is the largest of the rounds, not the median (a peak is a peak)."""


def interleaved_order(names: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, name) in the order to measure them: forward in even rounds, backward in odd.

    >>> interleaved_order(["a", "b", "c"], 2)
    [(0, 'a'), (0, 'b'), (0, 'c'), (1, 'c'), (1, 'b'), (1, 'a')]
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    order = []
    for index in range(rounds):
        ordered = names if index % 2 == 0 else list(reversed(names))
        order.extend((index, name) for name in ordered)
    return order


def run_interleaved(
    jobs: dict[str, Callable[[], dict[str, Any]]],
    rounds: int,
    *,
    headline: Callable[[dict[str, Any]], dict[str, Any]],
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, dict[str, Any]]:
    """Run every job `rounds` times in interleaved order; per job, the median of its runs
    (`median_of_rounds`) with `rounds` (each round's `headline` figures) added."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    for index, name in interleaved_order(list(jobs), rounds):
        log(f"{name}" + (f" (round {index + 1}/{rounds})" if rounds > 1 else ""))
        runs[name].append(jobs[name]())
    combined = {}
    for name, results in runs.items():
        combined[name] = median_of_rounds(results)
        combined[name]["rounds"] = [headline(result) for result in results]
    return combined


def median_of_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the rounds of one system: every number the median of that number
    across the rounds (lists element-wise, dicts key-wise), `MAX_OF_ROUNDS` keys the largest;
    whatever is not a number (notes, names, flags) as the first round has it."""
    if not runs:
        raise ValueError("no rounds to combine")
    combined = _combine(runs, take_max=False)
    assert isinstance(combined, dict)
    return combined


def _combine(values: list[Any], *, take_max: bool) -> Any:
    first = values[0]
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        return {
            k: _combine([v[k] for v in values], take_max=take_max or k in MAX_OF_ROUNDS)
            if _everywhere(values, k)
            else v0
            for k, v0 in first.items()
        }
    if (
        isinstance(first, list)
        and all(isinstance(v, list) and len(v) == len(first) for v in values)
        and first
    ):
        return [_combine([v[i] for v in values], take_max=take_max) for i in range(len(first))]
    if all(_is_number(v) for v in values):
        figure = max(values) if take_max else statistics.median(values)
        if all(isinstance(v, int) for v in values):
            return int(round(figure))
        return float(figure)
    return first


def _everywhere(values: list[dict[str, Any]], key: str) -> bool:
    return all(key in v for v in values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def spread(run: dict[str, Any], figure: str = "samples_per_s") -> float | None:
    """(largest - smallest) / median of one figure across a run's rounds; None with one."""
    values = [r[figure] for r in run.get("rounds", []) if r.get(figure) is not None]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def rounds_line(systems: dict[str, dict[str, Any]], rounds: int) -> str:
    """How many rounds every figure is the median of, and how far rounds of one system
    apart: the largest spread of samples/s says how much a single window could be off."""
    spreads = {
        (system, scenario): value
        for system, runs in systems.items()
        for scenario, run in runs.items()
        if (value := spread(run)) is not None
    }
    text = f"rounds: every figure is the median of {rounds} interleaved round(s) per system"
    if not spreads:
        return text
    (system, scenario), worst = max(spreads.items(), key=lambda kv: kv[1])
    typical = statistics.median(spreads.values())
    return (
        f"{text}; samples/s between rounds of one system: median spread {typical:.1%}, "
        f"largest {worst:.1%} ({system}/{scenario})"
    )


def rounds_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every round's samples/s and machine CPU per sample, beside the median reported."""
    rows = []
    for system, runs in systems.items():
        for scenario, run in runs.items():
            each = run.get("rounds") or []
            if not each:
                continue
            rates = " / ".join(f"{r['samples_per_s']:.0f}" for r in each)
            cpu = " / ".join(
                "-"
                if r.get("machine_cpu_us_per_sample") is None
                else f"{r['machine_cpu_us_per_sample']:.0f}"
                for r in each
            )
            value = spread(run)
            rows.append([system, scenario, rates, cpu, "-" if value is None else f"{value:.1%}"])
    return {
        "title": "rounds (each round's figures; the tables above show their medians)",
        "columns": ["system", "scenario", "samples/s", "machine CPU us/sample", "spread"],
        "rows": rows,
    }
