"""Command-line entry points (`ndp-train`, `ndp-bench`, `ndp-data`, `ndp-storage-node`) and
their shared exit rules.

Every ndp command exits 0 on success, 2 on a user error (`NDPError`: bad config, bad data)
with a one-line message on stderr and no traceback, and 1 on anything else (a bug: the
traceback is printed). `run_cli` applies that rule so each command's `main` only parses
arguments and calls the library.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from ndp.errors import NDPError

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2


def run_cli(body: Callable[[], int | None], *, prog: str) -> int:
    """Run a command body and map its outcome to an exit status (see the module docstring).

    Args:
        body: does the work; returns an exit status or None for success.
        prog: command name prefixed to error messages, e.g. `ndp-data`.
    """
    try:
        status = body()
    except NDPError as exc:
        message = " ".join(str(exc).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return EXIT_BUG
    return EXIT_OK if status is None else status
