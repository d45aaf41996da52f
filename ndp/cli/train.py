"""`ndp-train`: train a DLRM from a YAML config, through ndp or the single-process reference.

    ndp-train [--config PATH] [--set KEY=VALUE]... [--mode ndp|reference] [--output-dir DIR]
              [--address RAY_ADDRESS] [--dry-run] [--resume [PATH]]

A run writes DIR/config.yaml (the resolved config), DIR/metrics.jsonl and DIR/summary.json
(DIR defaults to runs/<timestamp>). Exit status: 0 success, 2 user error (one line on
stderr, no traceback), 1 a bug, 130 interrupted by Ctrl-C (the summary is still written).

A run owns the directories it writes: DIR, its checkpoint dir and `storage.flash_dir` are
claimed (`ndp.dir_lock`) before anything is written into them and released when the run
ends, however it ends; a second run naming one of them exits 2 naming the run that holds it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ndp
from ndp.cli import run_cli
from ndp.config import Config, load_config
from ndp.dir_lock import claim_dirs
from ndp.errors import ConfigError, NotAvailableError
from ndp.run_dir import check_output_dir, make_run_dir

if TYPE_CHECKING:
    from ndp.train_loop import StepEngine

PROG = "ndp-train"
DEFAULT_CONFIG = Path(ndp.__file__).resolve().parent.parent / "configs" / "dlrm.yaml"
"""The embedded default config, resolved against the repository root."""
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=None, help=f"YAML config (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument(
        "--device-profile",
        metavar="NAME",
        help="emulate a device of configs/devices/ (sets storage.device_profile)",
    )
    parser.add_argument(
        "--mode",
        choices=("ndp", "reference"),
        default="ndp",
        help="ndp: storage nodes + GPU workers on Ray; reference: the whole model in this process",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: runs/<timestamp>")
    parser.add_argument(
        "--address", default=None, help="join this Ray cluster (--mode ndp; sets cluster.address)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and plan, then stop without training"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="resume from a checkpoint (default: the newest in the run's checkpoint dir)",
    )
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """Config file + --set overrides + --address, validated."""
    profile = [f"storage.device_profile={args.device_profile}"] if args.device_profile else []
    cfg = load_config(args.config or DEFAULT_CONFIG, profile + args.overrides)
    if args.address is not None:
        if args.mode != "ndp":
            raise ConfigError(
                "--address joins a Ray cluster, which only --mode ndp uses; drop it for --mode reference"
            )
        cfg = replace(cfg, cluster=replace(cfg.cluster, address=args.address))
    return cfg


def engine_factory(mode: str) -> Callable[[Config], StepEngine]:
    """The StepEngine constructor of `mode`; fails before any data is read if it is missing."""
    if mode == "reference":
        from ndp.reference import ReferenceEngine

        return ReferenceEngine
    try:
        from ndp.coordinator import NdpEngine
    except ModuleNotFoundError as exc:
        if exc.name != "ndp.coordinator":
            raise
        raise NotAvailableError(
            "--mode ndp: the distributed engine (ndp.coordinator) is not available yet in "
            "this build; use --mode reference"
        ) from None
    return NdpEngine


def _refuse_unwired(args: argparse.Namespace) -> None:
    # Flag combinations refused before any work: only the ndp engine writes checkpoints.
    if args.resume is not None and args.mode != "ndp":
        raise NotAvailableError("--resume: only --mode ndp writes checkpoints; use --mode ndp")


def train(args: argparse.Namespace) -> int:
    """Resolve config, data and engine, run the loop, print the final summary."""
    _refuse_unwired(args)
    cfg = resolve_config(args)
    if args.dry_run:
        return dry_run(cfg)
    resuming = args.resume is not None
    if not resuming:  # a resumed run appends to its own directory
        check_output_dir(args.output_dir)
    resume_from = _resume_source(args, cfg)  # a missing checkpoint fails before any work
    make_engine = engine_factory(args.mode)
    # torch, torchrec and Ray load only once the arguments are known to be good: a typo in
    # --set is answered in a fraction of a second.
    from ndp.data.loader import build_datasets

    train_data, val_data = build_datasets(cfg)
    if resuming and args.output_dir is not None:
        run_dir = Path(args.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = make_run_dir(args.output_dir)
    with claim_dirs(owned_dirs(args, cfg, run_dir)):
        if not resuming:  # again: a run that held the directory may have finished meanwhile
            check_output_dir(run_dir)
        return _train_in(args, cfg, run_dir, make_engine, train_data, val_data, resume_from)


def owned_dirs(args: argparse.Namespace, cfg: Config, run_dir: Path) -> list[tuple[str, Path]]:
    """(setting, directory) of each directory the run writes, for `claim_dirs`.

    The checkpoint dir is claimed when checkpoints are written or it exists (the schedule
    cleans up partial checkpoints there); the flash dir only when set (else each node makes
    a private temporary one).
    """
    dirs = [("--output-dir" if args.output_dir else "run directory", run_dir)]
    if args.mode == "ndp":
        from ndp.checkpoint import checkpoint_root

        root = checkpoint_root(cfg, run_dir)
        if cfg.checkpoint.enabled or root.is_dir():
            dirs.append(("checkpoint.dir" if cfg.checkpoint.dir else "checkpoint dir", root))
        if cfg.storage.flash_dir:
            dirs.append(("storage.flash_dir", Path(cfg.storage.flash_dir)))
    return dirs


def _train_in(
    args: argparse.Namespace,
    cfg: Config,
    run_dir: Path,
    make_engine: Callable[..., StepEngine],
    train_data: Any,
    val_data: Any,
    resume_from: Any,
) -> int:
    """Build the engine and train into `run_dir` (whose directories this run holds)."""
    from ndp.train_loop import run_training

    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if args.mode == "ndp":
        engine = make_engine(cfg, plan=plan_for_run(cfg, train_data))
    else:
        engine = make_engine(cfg)
    plan = getattr(engine, "plan", None)
    if plan is not None:  # the plan is saved with the run (plain JSON data)
        (run_dir / "plan.json").write_text(plan.to_json())
    try:
        engine, start_step = _with_checkpoints(args, cfg, engine, run_dir, train_data, resume_from)
        summary = run_training(
            cfg,
            engine,
            run_dir,
            train_data=train_data,
            val_data=val_data,
            mode=args.mode,
            start_step=start_step,
        )
    finally:
        engine.close()
    print(format_summary(summary, run_dir))
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


def plan_for_run(cfg: Config, train_data: Any = None) -> Any:
    """The sharding plan; measured on `cluster.plan_sample_batches` training batches if set."""
    from ndp.planner import plan_shards, sample_index_frequencies

    samples = cfg.cluster.plan_sample_batches
    if samples == 0:
        return plan_shards(cfg)
    if train_data is None:
        from ndp.data.loader import build_datasets

        train_data, _ = build_datasets(cfg)
    batches = itertools.islice(train_data.batches(cfg.train.batch_size), samples)
    return plan_shards(cfg, index_frequencies=sample_index_frequencies(cfg, batches))


def dry_run(cfg: Config) -> int:
    """Plan the run and print the plan; start nothing, write nothing."""
    print(plan_for_run(cfg).format_table())
    return 0


def _resume_source(args: argparse.Namespace, cfg: Config) -> Any:
    """The verified checkpoint --resume names (PATH, else the newest in the run's dir)."""
    if args.resume is None:
        return None
    from ndp.checkpoint import checkpoint_root, resolve_checkpoint

    if args.resume != "latest":
        return resolve_checkpoint(args.resume)
    if cfg.checkpoint.dir is None and args.output_dir is None:
        raise ConfigError("--resume without PATH needs --output-dir of the run to resume")
    return resolve_checkpoint(checkpoint_root(cfg, args.output_dir or "."))


def _with_checkpoints(
    args: argparse.Namespace,
    cfg: Config,
    engine: StepEngine,
    run_dir: Path,
    train_data: Any,
    resume_from: Any,
) -> tuple[StepEngine, int]:
    """--resume (load the checkpoint) and, in ndp mode, periodic checkpoints + recovery."""
    if args.mode != "ndp":
        return engine, 0
    from ndp.checkpoint import checkpoint_root
    from ndp.recovery import ResilientEngine, resume
    from ndp.train_loop import planned_steps

    root = checkpoint_root(cfg, run_dir)
    start_step = 0
    if resume_from is not None:
        start_step = resume(engine, resume_from)
        print(f"ndp: resumed at step {start_step} from {resume_from.path}", file=sys.stderr)
    resilient = ResilientEngine(
        engine,
        cfg,
        checkpoint_root=root,
        train_data=train_data,
        total_steps=planned_steps(cfg, train_data.num_samples),
    )
    return resilient, start_step


def format_summary(summary: dict, run_dir: Path) -> str:
    """The lines printed at the end of a run."""
    final_eval = summary.get("final_eval") or {}
    auc = final_eval.get("auc")
    quality = "validation AUC n/a" if auc is None else f"validation AUC {auc:.4f}"
    for key, name in (("logloss", "logloss"), ("ne", "NE"), ("calibration", "calibration")):
        if final_eval.get(key) is not None:
            quality += f", {name} {final_eval[key]:.4f}"
    status = " (interrupted)" if summary["interrupted"] else ""
    return (
        f"{PROG}: {summary['mode']}: {summary['steps']} steps{status}, "
        f"{summary['samples_per_s']:.0f} samples/s, {quality}\n"
        f"{PROG}: outputs in {run_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # ndp's own progress messages at INFO; libraries (FBGEMM's kernel loading...) only warn.
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    logging.getLogger("ndp").setLevel(logging.INFO)
    return run_cli(lambda: train(args), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
