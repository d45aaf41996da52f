"""`ndp-bench`: measure ndp and write results.json, results.md and results.png.

    ndp-bench storage [--config PATH] [--output-dir DIR] [--quick]
    ndp-bench load    [--output-dir DIR] [--quick]
    ndp-bench train   [--config PATH] [--output-dir DIR] [--quick] [--scenarios A,B] [--rounds N]
                      [--device-profile NAME] [--flash-dir DIR] [--beyond-ram-memory-bytes N]

`storage` measures pooled lookups/s of a storage node over gRPC against in-process
`embedding_bag` (pooling 1, 8, 32) and the hit rate of each cache policy against Belady's
optimum; it prints each figure against its target. `--config` supplies
`storage.hot_fraction` and, when `data.path` names a Criteo TSV, the trace file. The output
directory defaults to bench-results/<subcommand>-<timestamp>.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from ndp.bench.report import write_results
from ndp.cli import run_cli
from ndp.config import load_config

PROG = "ndp-bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("storage", "lookups over gRPC vs in process; cache policies vs Belady"),
        ("train", "end-to-end training throughput: ndp vs all-GPU, hybrid, OS-paged"),
        ("load", "lookup/push latency percentiles of one node under 8 concurrent clients"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", help="YAML config (storage.hot_fraction, data.path)")
        sub.add_argument("--output-dir", help="default: bench-results/<command>-<timestamp>")
        sub.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes")
        sub.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
        if name == "train":
            sub.add_argument(
                "--device-profile",
                metavar="NAME",
                help="emulate a device of configs/devices/ on every storage node and price "
                "energy with its constants (default: the config's storage.device_profile)",
            )
            sub.add_argument(
                "--scenarios",
                help="comma-separated subset of fits_in_dram,large_zipf,cache_5pct,cache_full,"
                "multihot (default: all), or beyond_ram (only when named: table state twice "
                "this machine's memory on disk)",
            )
            sub.add_argument(
                "--rounds",
                type=int,
                metavar="N",
                help="measure every system N times per scenario, interleaved (forward, then "
                "backward), and report medians (default 2)",
            )
            sub.add_argument(
                "--flash-dir",
                metavar="DIR",
                help="beyond_ram: where the shard files live; a later run with the same dir "
                "reuses them (default /var/tmp/ndp-beyond-ram)",
            )
            sub.add_argument(
                "--beyond-ram-memory-bytes",
                type=int,
                metavar="BYTES",
                help="beyond_ram: size the state from this memory figure instead of this "
                "machine's (a small end-to-end run)",
            )
    return parser


def default_output_dir(command: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{command}-{stamp}"


def _storage(args: argparse.Namespace, command_line: str) -> int:
    from ndp.bench.storage import StorageBenchOptions, run_storage_bench

    options = StorageBenchOptions.quick() if args.quick else StorageBenchOptions.full()
    if args.config:
        cfg = load_config(args.config)
        options = replace(options, hot_fraction=cfg.storage.hot_fraction)
        if cfg.data.source == "criteo" and cfg.data.path and Path(cfg.data.path).is_file():
            options = replace(options, criteo_path=cfg.data.path)
    if args.scale != 1.0:
        options = options.scaled(args.scale)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir("storage")
    results = run_storage_bench(
        options, command=command_line, log=lambda line: print(f"{PROG}: {line}", file=sys.stderr)
    )
    paths = write_results(results, output_dir)
    for line in results["summary"]:
        print(line)
    print(f"results: {', '.join(str(p) for p in paths.values())}")
    return 0


def _train(args: argparse.Namespace, command_line: str) -> int:
    from ndp.bench.train import BenchOptions, run_train_bench

    options = BenchOptions.quick() if args.quick else BenchOptions()
    if args.config:
        cfg = load_config(args.config)
        options = replace(options, device=cfg.train.device, batch_size=cfg.train.batch_size)
        options = replace(options, device_profile=cfg.storage.device_profile)
    if args.device_profile:
        options = replace(options, device_profile=args.device_profile)
    if args.scale != 1.0:
        options = options.scaled(args.scale)
    if args.scenarios:
        options = replace(options, scenarios=tuple(_scenarios(args.scenarios)))
    if args.rounds is not None:
        if args.rounds < 1:
            from ndp.errors import ConfigError

            raise ConfigError(f"--rounds: {args.rounds} must be >= 1")
        options = replace(options, rounds=args.rounds)
    if args.flash_dir:
        options = replace(options, flash_dir=args.flash_dir)
    if args.beyond_ram_memory_bytes is not None:
        if args.beyond_ram_memory_bytes <= 0:
            from ndp.errors import ConfigError

            raise ConfigError(
                f"--beyond-ram-memory-bytes: {args.beyond_ram_memory_bytes} must be > 0"
            )
        options = replace(options, beyond_ram_memory_bytes=args.beyond_ram_memory_bytes)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir("train")
    results = run_train_bench(
        options, command=command_line, log=lambda line: print(f"{PROG}: {line}", file=sys.stderr)
    )
    paths = write_results(results, output_dir)
    for line in results["summary"]:
        print(line)
    print(f"results: {', '.join(str(p) for p in paths.values())}")
    return 0


def _scenarios(text: str) -> list[str]:
    from ndp.bench.train import OPT_IN_SCENARIOS, SCENARIOS
    from ndp.errors import ConfigError

    known = SCENARIOS + OPT_IN_SCENARIOS
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigError(
            f"--scenarios: unknown {unknown or 'empty list'}; choose from {', '.join(known)}"
        )
    return names


def _load(args: argparse.Namespace, command_line: str) -> int:
    from ndp.bench.load import LoadOptions, run_load_bench

    options = LoadOptions.quick() if args.quick else LoadOptions()
    if args.scale != 1.0:
        options = options.scaled(args.scale)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir("load")
    results = run_load_bench(
        options, command=command_line, log=lambda line: print(f"{PROG}: {line}", file=sys.stderr)
    )
    paths = write_results(results, output_dir)
    for line in results["summary"]:
        print(line)
    print(f"results: {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command_line = shlex.join([PROG, *argv])
    body = {"storage": _storage, "load": _load, "train": _train}[args.command]
    status = run_cli(lambda: body(args, command_line), prog=PROG)
    return status


if __name__ == "__main__":
    sys.exit(main())
