"""docs/bad_input.md: every row of every table names at least one test, and each one exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "bad_input.md"


def table_rows() -> list[list[str]]:
    """Cells of each body row (header and `---` rows left out)."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("input", "---"):
            rows.append(cells)
    return rows


def named_tests(cell: str) -> list[tuple[str, str]]:
    """(file, test) of each `file::test` or `::test` (same file as the one before) in a cell."""
    tests, file = [], ""
    for path, name in re.findall(r"`([^`:]*)::(\w+)`", cell):
        file = path or file
        tests.append((file, name))
    return tests


def test_every_row_names_a_test_that_exists():
    rows = table_rows()
    assert len(rows) > 40
    for cells in rows:
        tests = named_tests(cells[-1])
        assert tests, f"docs/bad_input.md row {cells[0]!r} names no test"
        for file, name in tests:
            source = REPO / file
            assert source.is_file(), f"row {cells[0]!r}: {file} does not exist"
            assert re.search(rf"^def {name}\(", source.read_text(), re.MULTILINE), (
                f"row {cells[0]!r}: {file} has no test {name}"
            )
