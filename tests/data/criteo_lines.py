"""Criteo TSV lines for the data-reader specifications (imported by the test modules)."""

from __future__ import annotations

SAMPLE_CATS = [f"{i:08x}" for i in range(0x10, 0x10 + 26)]


def tsv_line(
    label: str = "0", dense: list[str] | None = None, cats: list[str] | None = None
) -> str:
    """One Criteo line (without newline): label, 13 integer fields, 26 hex fields."""
    dense = ["1"] * 13 if dense is None else dense
    cats = SAMPLE_CATS if cats is None else cats
    return "\t".join([label, *dense, *cats])
