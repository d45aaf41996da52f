"""CLIs start at once: `--help` imports none of torch, Ray, pyarrow or gRPC.

Why a test of the import set and not of the time: on a shared CI machine a time limit fails
by chance, while an import of torch at module level (about 5 s) is what makes `--help` slow.
Each command is run in a fresh interpreter, as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "pyarrow", "grpc")
CLIS = ["ndp.cli.data", "ndp.cli.train", "ndp.cli.bench"]

PROBE = """
import contextlib, io, json, sys
import {module} as cli
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        cli.main(["--help"])
    except SystemExit as exit:
        code = exit.code
print(json.dumps({{"code": code, "help": out.getvalue(),
                  "heavy": sorted(m for m in {heavy} if m in sys.modules)}}))
"""


@pytest.mark.parametrize("module", CLIS)
def test_help_prints_usage_without_importing_torch_ray_pyarrow_or_grpc(module):
    probe = PROBE.format(module=module, heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert "usage:" in report["help"]
    assert report["heavy"] == [], f"{module} --help imports {report['heavy']}"
