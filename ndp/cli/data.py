"""`ndp-data`: turn Criteo TSV or a synthetic config into the preprocessed columnar format.

    ndp-data preprocess --input PATH... --output DIR [--config PATH] [--val-fraction F]
                        [--workers N | --address ADDR] [--progress | --no-progress]
    ndp-data synth --config PATH --output DIR

`preprocess` reads Criteo TSV files, plain or gzip-compressed (`day_0.gz`), or directories of
them (`ndp.data.inputs` says which files a directory may hold). It takes
`data.bad_line_policy` / `data.nan_policy` / `data.val_fraction` from the config when one is
given (defaults otherwise); `--val-fraction` overrides the config, and `--input` stands in for
the config's `data.path` / `data.val_path`, which need not exist here. It parses on every
core (`--workers`), or as Ray tasks across the cluster at `--address` (inputs and --output on
a file system every node sees), and reports lines, MB/s and ETA on stderr when that is a
terminal (`--progress` / `--no-progress` to choose).

Heavy modules (pyarrow, torch, Ray) are imported by the commands that use them, so that
`ndp-data --help` starts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

from ndp.cli import run_cli
from ndp.config import DataConfig, load_config
from ndp.errors import DataError

PROG = "ndp-data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("preprocess", help="Criteo TSV -> columnar .npy splits")
    pre.add_argument(
        "--input", nargs="+", required=True, help="TSV files (plain or .gz) or directories"
    )
    pre.add_argument("--output", required=True, help="new or empty output directory")
    pre.add_argument("--config", help="YAML config (data.* policies and val_fraction)")
    pre.add_argument("--val-fraction", type=float, help="last fraction of lines -> val/")
    where = pre.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, help="local worker processes (default: every core; 1: no pool)"
    )
    where.add_argument(
        "--address",
        help="Ray cluster to run the parsing on as tasks (`auto` or HOST:PORT); inputs and "
        "--output must be on a file system every node sees",
    )
    pre.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="report lines, MB/s and ETA on stderr (default: when stderr is a terminal)",
    )
    synth = commands.add_parser("synth", help="write synthetic data of a config")
    synth.add_argument("--config", required=True, help="YAML config (model, data.synthetic)")
    synth.add_argument("--output", required=True, help="new or empty output directory")
    return parser


def _preprocess_data_config(args: argparse.Namespace) -> DataConfig:
    """`data` of --config, with --input standing in for `data.path` before validation.

    Why: the config only lends its policies and `val_fraction`; its `data.path` and
    `data.val_path` may name files of another machine, and must not refuse a run that
    reads --input.
    """
    if not args.config:
        return DataConfig()
    for path in args.input:  # named as --input, not as the data.path it stands in for
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or directory")
    first_input = json.dumps(str(Path(args.input[0]).resolve()))  # quoted YAML scalar
    overrides = [f"data.path={first_input}", "data.val_path=null"]
    return load_config(args.config, overrides).data


def _preprocess(args: argparse.Namespace) -> None:
    from ndp.data.preprocess import preprocess_criteo

    data = _preprocess_data_config(args)
    val_fraction = data.val_fraction if args.val_fraction is None else args.val_fraction
    run_tasks = None
    if args.address is not None:
        from ndp.ray_local import ray_tasks

        run_tasks = partial(ray_tasks, address=args.address)
    meta = preprocess_criteo(
        args.input,
        args.output,
        data=data,
        val_fraction=val_fraction,
        workers=args.workers,
        run_tasks=run_tasks,
        progress=args.progress,
    )
    counts = {split: info["num_samples"] for split, info in meta["splits"].items()}
    print(json.dumps({"output": args.output, **counts, "skipped_lines": meta["skipped_lines"]}))


def _synth(args: argparse.Namespace) -> None:
    from ndp.data.preprocess import prepare_output_dir
    from ndp.data.synthetic import write_synthetic

    cfg = load_config(args.config)
    prepare_output_dir(args.output)
    meta = write_synthetic(cfg, args.output)
    counts = {split: info["num_samples"] for split, info in meta["splits"].items()}
    print(json.dumps({"output": args.output, **counts}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    command = {"preprocess": _preprocess, "synth": _synth}[args.command]
    return run_cli(lambda: command(args), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
