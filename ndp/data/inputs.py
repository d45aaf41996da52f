"""Which files a Criteo data path reads, and how they are opened.

Why a module of its own: choosing files and undoing their encoding is where input goes
silently wrong (a skipped `.gz`, a README read as data, a BOM taken for binary). Every rule
lives here, so that training (`ndp.data.loader`) and `ndp-data preprocess` read the same
files the same way.

A data path is a file or a directory. A file is read whatever its name. A directory is read
file by file in natural name order (`day_2` before `day_10`), each file by these rules::

    read      *.tsv  *.txt  names without a suffix (day_0), each also gzip-compressed (+ .gz)
    ignored   hidden files and folders (.DS_Store), README*, LICENSE* / LICENCE*, COPYING*,
              NOTICE*, *.md, checksum lists (SHA256SUMS, MD5SUMS, *.sha256, *.md5); logged
    refused   anything else (part0.csv, day_0.zip) and subfolders: a DataError naming them

Opening: gzip is recognised by its magic bytes and decompressed as a stream (never whole in
memory or on disk), so line numbers in errors are decompressed line numbers. A file named
`.gz` that is not gzip, other compressions (bzip2, xz, zstd, zip) and Parquet are refused
by name.
A UTF-8 byte order mark before the first line is skipped.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ndp.errors import DataError

log = logging.getLogger("ndp.data")

UTF8_BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"
_OTHER_FORMATS = {
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"PK\x03\x04": "a zip archive",
    b"PAR1": "a Parquet file",
}
_DATA_SUFFIXES = (".tsv", ".txt", "")
_IGNORED_PREFIXES = ("README", "LICENSE", "LICENCE", "COPYING", "NOTICE")
_IGNORED_SUFFIXES = (".md", ".sha256", ".sha1", ".sha512", ".md5")
SUPPORTED = (
    "Criteo TSV files named *.tsv, *.txt or without a suffix (day_0), each optionally "
    "gzip-compressed (.gz); hidden files, README*, LICENSE*, *.md and checksum lists "
    "(SHA256SUMS) are ignored"
)
"""What a data directory may hold, quoted in errors."""


# --------------------------------------------------------------------------- choosing files


def _is_ignored(path: Path) -> bool:
    """Hidden files and the documentation and checksums that ship beside data."""
    name = path.name
    upper = name.upper()
    return (
        name.startswith(".")
        or upper.startswith(_IGNORED_PREFIXES)
        or upper.endswith("SUMS")
        or path.suffix.lower() in _IGNORED_SUFFIXES
    )


def _is_data_name(path: Path) -> bool:
    stem = path.with_suffix("") if path.suffix.lower() == ".gz" else path
    return stem.suffix.lower() in _DATA_SUFFIXES


def natural_key(name: str) -> list[str | int]:
    """Sort key comparing digit runs as numbers: `day_2` < `day_10` (Criteo 1TB's days)."""
    parts = re.split(r"(\d+)", name)  # text, digits, text, ...: digits at odd positions
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]


def data_files(path: str | Path) -> list[Path]:
    """The files a data path reads, in order (see the module docstring for the rules).

    Raises:
        DataError: the path does not exist, a directory holds a file or subfolder that is
            neither read nor ignored (named), or no file to read.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    read, ignored = [], []
    for entry in sorted(path.iterdir(), key=lambda p: natural_key(p.name)):
        if _is_ignored(entry):
            ignored.append(entry.name)
        elif entry.is_dir():
            raise DataError(
                f"{entry}: is a directory; data directories are not read recursively "
                f"({SUPPORTED}); move it out or point data.path at it"
            )
        elif _is_data_name(entry):
            read.append(entry)
        else:
            raise DataError(
                f"{entry}: not a supported input in data directory {path}; a data directory "
                f"holds {SUPPORTED}. Move the file out, or rename it if it is Criteo TSV"
            )
    if not read:
        raise DataError(
            f"{path}: directory holds no *.tsv, *.txt or suffix-less files (optionally .gz)"
            + (f"; ignored: {', '.join(ignored)}" if ignored else "")
        )
    if ignored:
        log.info(
            "%s: reading %d file(s), ignoring %s (not data)", path, len(read), ", ".join(ignored)
        )
    return read


# --------------------------------------------------------------------------- opening


def is_gzip(path: Path) -> bool:
    """Whether a file is gzip, by its first bytes; other compressions are refused."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(GZIP_MAGIC):
        return True
    for magic, kind in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise DataError(
                f"{path}: is {kind}; ndp reads Criteo TSV, plain or gzip-compressed "
                "(decompress it, or recompress it with gzip)"
            )
    if path.suffix.lower() == ".gz":
        raise DataError(f"{path}: named .gz but not gzip-compressed; rename it if it is plain TSV")
    return False


@contextmanager
def open_input(path: Path) -> Iterator[io.BufferedIOBase]:
    """The decompressed bytes of an input file, positioned after any UTF-8 BOM.

    Raises:
        DataError: the file is compressed other than with gzip, or its gzip stream is
            corrupt or truncated (also when found while the caller reads).
    """
    compressed = is_gzip(path)
    handle: io.BufferedIOBase = gzip.GzipFile(path, "rb") if compressed else open(path, "rb")
    with handle:
        try:
            if handle.read(len(UTF8_BOM)) != UTF8_BOM:
                handle.seek(0)
            yield handle
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            if not compressed:
                raise
            raise DataError(
                f"{path}: gzip data is corrupt or truncated ({exc}); download or write it again"
            ) from None


def scan_input(path: Path) -> tuple[int, int]:
    """Lines and decompressed bytes of an input file (a last line without newline counts).

    Why both: the line count places the train/validation split; the byte count, not the
    size on disk, says whether parsed input fits in memory.
    """
    lines = text_bytes = 0
    last = b"\n"
    with open_input(path) as handle:
        while block := handle.read(16 << 20):
            lines += block.count(b"\n")
            text_bytes += len(block)
            last = block[-1:]
    return lines + (last != b"\n"), text_bytes
