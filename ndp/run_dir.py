"""Where a run writes its outputs: config.yaml, metrics.jsonl, summary.json (and checkpoints).

Why refuse a directory that already holds a run: metrics.jsonl is appended to, so a second
run into the same directory would silently interleave two runs' records. A run that is still
going may not have written metrics.jsonl yet: `ndp.dir_lock` covers that case (ndp-train
claims the directory, then checks it again).
"""

from __future__ import annotations

import time
from pathlib import Path

from ndp.errors import ConfigError

RUN_FILES = ("metrics.jsonl", "summary.json")
"""Files whose presence marks a directory as holding a run."""


def make_run_dir(output_dir: str | Path | None, *, root: str | Path = "runs") -> Path:
    """Create the run directory: `output_dir`, or `root/<YYYYmmdd-HHMMSS>` (suffixed if taken).

    Raises:
        ConfigError: `output_dir` already holds a run, or is a file.
    """
    if output_dir is None:
        return _new_timestamped_dir(Path(root))
    path = Path(output_dir)
    check_output_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_timestamped_dir(root: Path) -> Path:
    """`root/<YYYYmmdd-HHMMSS>[-n]`, created by this call (an exclusive mkdir, so two runs
    started in the same second never both take the same one)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while True:
        path = root / (f"{stamp}-{suffix}" if suffix else stamp)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1


def check_output_dir(output_dir: str | Path | None) -> None:
    """Fail early (before data is read) if `output_dir` cannot take a new run."""
    if output_dir is None:
        return
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir: {path} is a file; name a directory")
    taken = [name for name in RUN_FILES if (path / name).exists()]
    if taken:
        raise ConfigError(
            f"--output-dir: {path} already holds a run ({taken[0]}); "
            "choose a new directory or remove the old run"
        )
