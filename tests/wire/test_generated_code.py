"""The checked-in generated code is exactly what `make proto` produces from the .proto."""

from __future__ import annotations

from protos import generate


def test_checked_in_generated_code_is_not_stale(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "generate wrote nothing"
    stale = [
        relative
        for relative, fresh in zip(generate.generated_files(), written, strict=True)
        if (generate.REPO_ROOT / relative).read_bytes() != fresh.read_bytes()
    ]
    assert not stale, f"regenerate with `make proto`: stale {stale}"
