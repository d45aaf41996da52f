"""Malformed Criteo lines: `fail` names file:line and the problem, `skip` drops and counts."""

from __future__ import annotations

import numpy as np
import pytest
from criteo_lines import SAMPLE_CATS, tsv_line

from ndp.data.criteo import CriteoReader, tsv_files
from ndp.errors import DataError

GOOD = tsv_line("0")
BAD_LINES = {
    "too few fields": ("\t".join(["0"] * 39), "39 tab-separated fields, expected 40"),
    "too many fields": (GOOD + "\textra", "41 tab-separated fields"),
    "bad hex": (tsv_line("0", cats=["xyz12345", *SAMPLE_CATS[1:]]), "C1, feature cat_0"),
    "hex too long": (tsv_line("0", cats=["123456789", *SAMPLE_CATS[1:]]), "1-8 digits"),
    "bad label": (tsv_line("2"), "label.*expected 0 or 1"),
    "empty label": (tsv_line(""), "label"),
    "non-integer dense": (tsv_line("1", ["1.5", *["0"] * 12]), "dense I1.*not an integer"),
    "word dense": (tsv_line("1", ["0", "abc", *["0"] * 11]), "field 3 \\(dense I2\\)"),
    "nan dense": (tsv_line("1", ["0", "0", "NaN", *["0"] * 10]), "dense I3.*nan_policy=zero"),
    "inf dense": (tsv_line("1", ["-inf", *["0"] * 12]), "NaN/Inf"),
}


def reader_for(make_tsv, bad: str, **policies) -> CriteoReader:
    path = make_tsv([GOOD, GOOD, bad, GOOD])
    return CriteoReader(tsv_files(path), **policies)


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_fail_policy_names_file_line_and_problem(case, make_tsv):
    bad, problem = BAD_LINES[case]
    reader = reader_for(make_tsv, bad)
    with pytest.raises(DataError, match=f"day.tsv:3: .*{problem}") as info:
        reader.read_all()
    assert "bad_line_policy=skip" in str(info.value)


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_skip_policy_drops_the_line_and_counts_it(case, make_tsv, caplog):
    bad, _ = BAD_LINES[case]
    reader = reader_for(make_tsv, bad, bad_line_policy="skip")
    with caplog.at_level("WARNING", logger="ndp.data"):
        rows = reader.read_all()
    assert len(rows) == 3
    assert reader.skipped_lines == 1
    assert [line for _, line in reader.skipped] == [3]
    assert "skipped 1 malformed lines" in caplog.text


def test_binary_garbage_is_named_as_non_text(tmp_path):
    path = tmp_path / "garbage.tsv"
    path.write_bytes((GOOD + "\n").encode() + b"\x00\x9f\x92\x96\xff\xfe\tPK\x03\x04\n")
    with pytest.raises(DataError, match="garbage.tsv:2: contains binary"):
        CriteoReader([path]).read_all()
    reader = CriteoReader([path], bad_line_policy="skip")
    assert len(reader.read_all()) == 1 and reader.skipped_lines == 1


def test_nan_policy_zero_reads_nan_and_inf_as_zero(make_tsv):
    path = make_tsv([tsv_line("1", ["nan", "inf", "-Inf", "7", *["0"] * 9])])
    rows = CriteoReader([path], nan_policy="zero").read_all()
    assert rows.dense[0, :4].tolist() == pytest.approx([0.0, 0.0, 0.0, np.log1p(7)])


def test_nan_policy_zero_still_rejects_other_non_integers(make_tsv):
    path = make_tsv([tsv_line("1", ["nana", *["0"] * 12])])
    with pytest.raises(DataError, match="day.tsv:1: .*not an integer"):
        CriteoReader([path], nan_policy="zero").read_all()


def test_line_numbers_are_per_file_and_count_across_chunks(tmp_path):
    (tmp_path / "a.tsv").write_text("".join(GOOD + "\n" for _ in range(5)))
    (tmp_path / "b.tsv").write_text("".join(GOOD + "\n" for _ in range(6)) + "0\t1\n")
    reader = CriteoReader(tsv_files(tmp_path), chunk_lines=4)
    with pytest.raises(DataError, match="b.tsv:7: has 2 tab-separated fields"):
        reader.read_all()


def test_skipped_lines_are_counted_once_over_repeated_passes(make_tsv):
    reader = reader_for(make_tsv, "garbage", bad_line_policy="skip")
    reader.read_all()
    reader.read_all()
    assert reader.skipped_lines == 1


def test_crlf_line_endings_are_accepted(tmp_path):
    path = tmp_path / "dos.tsv"
    path.write_bytes((GOOD + "\r\n").encode() * 2)
    assert len(CriteoReader([path]).read_all()) == 2
