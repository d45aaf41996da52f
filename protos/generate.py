"""Regenerate the checked-in Python of `protos/*.proto` with the pinned grpcio-tools.

Why from the repository root with `-I <root>`: protoc then names the modules
`protos.storage_node_pb2`, so the generated `*_pb2_grpc.py` imports
`from protos import storage_node_pb2` and works as part of the package (protoc's default
`import storage_node_pb2` would need `protos/` on sys.path).

Usage: `python -m protos.generate [--out DIR]` (default: the repository root, i.e. in place).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent
PROTO_FILES = ("storage_node.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files() -> list[str]:
    """Paths, relative to the repository root, of every file `generate` writes."""
    return [
        f"protos/{Path(name).stem}{suffix}" for name in PROTO_FILES for suffix in GENERATED_SUFFIXES
    ]


def generate(out_root: str | Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every proto file; write under `out_root/protos/`; return the paths."""
    from grpc_tools import protoc

    out_root = Path(out_root)
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    for name in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"protos/{name}",
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed on protos/{name} (exit {status})")
    return [out_root / path for path in generated_files()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT), help="output root (default: in place)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
