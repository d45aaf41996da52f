"""Write a benchmark's results as `results.json`, `results.md` and `results.png`.

One writer for every `ndp-bench` subcommand. A results dict is plain JSON data; besides the
raw figures a benchmark chooses to keep, two keys drive the human-readable files:

    "tables": [{"title": str, "columns": [str], "rows": [[cell, ...]]}]     -> results.md
    "plots":  [{"title": str, "xlabel": str, "ylabel": str, "xscale": "linear" | "log",
                "series": [{"label": str, "x": [num], "y": [num]}]}]      -> results.png
              or grouped bars over named categories:
              [{"kind": "bars", "title", "xlabel", "ylabel", "categories": [str],
                "series": [{"label": str, "y": [num | None]}]}]  (None: not measured)
    "summary": [str]                     (lines printed and listed in results.md, optional)

so a new benchmark (e.g. `ndp-bench train`) only builds the dict.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULT_FILES = ("results.json", "results.md", "results.png")


def machine_info() -> dict[str, Any]:
    """Where the figures were taken: what a reader needs to compare them."""
    import numpy as np
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }


def timestamp() -> str:
    """Local time, to the second, for result headers and default output directories."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: header (command, date, machine), the tables, the summary lines."""
    machine = results.get("machine", {})
    lines = [
        f"# ndp-bench {results.get('benchmark', '')}".rstrip(),
        "",
        f"- command: `{results.get('command', '')}`",
        f"- date: {results.get('date', '')}",
        f"- machine: {machine.get('cpu_count')} CPUs, {machine.get('platform')}, "
        f"torch {machine.get('torch')}, python {machine.get('python')}",
        "",
    ]
    for table in results.get("tables", []):
        lines += [f"## {table['title']}", ""]
        lines.append("| " + " | ".join(table["columns"]) + " |")
        lines.append("|" + "---|" * len(table["columns"]))
        for row in table["rows"]:
            lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
        lines.append("")
    if results.get("summary"):
        lines += ["## Summary", ""] + [f"- {line}" for line in results["summary"]] + [""]
    return "\n".join(lines)


def render_plots(results: dict[str, Any], path: Path) -> None:
    """results.png: one panel per entry of results["plots"], side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = results.get("plots", [])
    count = max(1, len(plots))
    figure, axes = plt.subplots(1, count, figsize=(6 * count, 4.5), squeeze=False)
    for ax, plot in zip(axes[0], plots, strict=False):
        if plot.get("kind") == "bars":
            _draw_bars(ax, plot)
        else:
            for series in plot["series"]:
                ax.plot(series["x"], series["y"], marker="o", label=series["label"])
            ax.set_xscale(plot.get("xscale", "linear"))
        ax.set_title(plot["title"])
        ax.set_xlabel(plot["xlabel"])
        ax.set_ylabel(plot["ylabel"])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw_bars(ax: Any, plot: dict[str, Any]) -> None:
    """Grouped bars: one group per category, one bar per series (missing values left out)."""
    categories = plot["categories"]
    width = 0.8 / max(1, len(plot["series"]))
    for i, series in enumerate(plot["series"]):
        positions = [
            c + (i - (len(plot["series"]) - 1) / 2) * width for c in range(len(categories))
        ]
        shown = [(p, y) for p, y in zip(positions, series["y"], strict=True) if y is not None]
        ax.bar([p for p, _ in shown], [y for _, y in shown], width=width, label=series["label"])
    ax.set_xticks(range(len(categories)), categories, rotation=15, fontsize=8)


def write_results(results: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and results.png into `output_dir` (created if needed).

    Returns:
        {file name: path written}.
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in RESULT_FILES}
    paths["results.json"].write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    paths["results.md"].write_text(render_markdown(results))
    render_plots(results, paths["results.png"])
    return paths
