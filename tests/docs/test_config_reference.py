"""The README's configuration reference is generated from ndp/config.py and must be current."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ndp.config import Config, StorageConfig
from ndp.config_reference import (
    BEGIN_MARKER,
    END_MARKER,
    README,
    main,
    render_reference,
    replace_section,
    update_readme,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_readme_reference_is_current():
    assert update_readme(README, check=True), (
        "README.md's configuration reference is stale; run `python -m ndp.config_reference`"
    )


def test_every_config_field_appears_with_its_docstring():
    text = render_reference()
    for section in (f.name for f in dataclasses.fields(Config)):
        assert f"#### `{section}`" in text
    for f in dataclasses.fields(StorageConfig):
        assert f"| `{f.name}` |" in text
    assert "Ray resources each storage-node actor asks for" in text
    assert "#### `model.tables[i]`" in text
    assert "#### `cluster.constraints.<key>`" in text
    assert '| `cache_policy` | `lru` \\| `lfu` \\| `hot+lfu` | `"hot+lfu"` |' in text
    assert "| `name` | str | required |" in text


@dataclass(frozen=True, kw_only=True)
class Inner:
    """Inner section."""

    depth: int | None = None
    """How deep it goes."""


@dataclass(frozen=True, kw_only=True)
class Root:
    """Root."""

    inner: Inner = field(default_factory=Inner)
    """The inner one."""


def test_a_new_field_shows_up_in_the_rendering():
    text = render_reference(Root)
    assert "#### `inner`" in text
    assert "| `depth` | int \\| null | `null` | How deep it goes. |" in text


def test_check_mode_reports_a_stale_file_and_leaves_it_alone(tmp_path):
    stale = tmp_path / "README.md"
    original = f"# x\n\n{BEGIN_MARKER}\nold table\n{END_MARKER}\n\n## after\n"
    stale.write_text(original)
    assert main(["--readme", str(stale), "--check"]) == 1
    assert stale.read_text() == original
    assert main(["--readme", str(stale)]) == 0
    rewritten = stale.read_text()
    assert "old table" not in rewritten and "#### `train`" in rewritten
    assert rewritten.endswith(f"{END_MARKER}\n\n## after\n")
    assert main(["--readme", str(stale), "--check"]) == 0


def test_missing_markers_are_an_error_naming_them():
    with pytest.raises(ValueError, match="BEGIN CONFIG REFERENCE"):
        replace_section("# no markers\n", "body")


def test_readme_keeps_the_two_quick_start_commands_and_links_the_docs():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()[1:] if line.strip()]
    assert commands == ["make train", "make test"]
    for link in ("docs/cluster.md", "docs/architecture.md", "BENCHMARKS.md"):
        assert f"]({link})" in text


def test_architecture_doc_names_functions_that_exist():
    """Every `module.py: name` (and `module.py: a`, `b` list) reference in
    docs/architecture.md resolves to real code, and so does every `Class.method`."""
    import importlib
    import re

    text = (DOCS / "architecture.md").read_text()
    refs = re.findall(r"`([a-z_/]+)\.py: ([A-Za-z_]+)`((?:, `[A-Za-z_]+`)*)", text)
    assert len(refs) > 10
    namespace: dict[str, object] = {}
    for module_path, name, more in refs:
        module = importlib.import_module(module_path.replace("/", "."))
        namespace.update(vars(module))
        for each in [name, *re.findall(r"`([A-Za-z_]+)`", more)]:
            assert hasattr(module, each), f"docs/architecture.md names {module_path}.py: {each}"

    methods = re.findall(r"`([A-Z][A-Za-z]+)\.([a-z_][A-Za-z_]*)[`(]", text)
    assert len(methods) > 10
    for class_name, method in methods:
        assert class_name in namespace, f"docs/architecture.md names unknown class {class_name}"
        assert hasattr(namespace[class_name], method), (
            f"docs/architecture.md names {class_name}.{method}, which does not exist"
        )
