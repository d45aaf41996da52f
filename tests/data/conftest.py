"""Builders of small configs and TSV lines for the data-reader specifications."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ndp.config import Config, config_from_dict


@pytest.fixture()
def make_tsv(tmp_path: Path) -> Callable[..., Path]:
    def write(lines: list[str], name: str = "day.tsv") -> Path:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines))
        return path

    return write


def _tables(features: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"name": f"t_{name}", "num_rows": rows, "embedding_dim": 4, "features": [name]}
        for name, rows in features.items()
    ]


@pytest.fixture()
def criteo_config() -> Callable[..., Config]:
    """Config of a small DLRM over the given `{feature: num_rows}` reading Criteo data."""

    def build(path: str | Path, features: dict[str, int] | None = None, **data: Any) -> Config:
        features = features or {f"cat_{i}": 1000 + i for i in range(26)}
        raw = {
            "model": {"tables": _tables(features), "bottom_mlp": [8, 4]},
            "data": {"source": "criteo", "path": str(path), **data},
        }
        return config_from_dict(raw)

    return build


@pytest.fixture()
def synthetic_config() -> Callable[..., Config]:
    """Config of synthetic data over `{feature: num_rows}` with `data.synthetic` overrides."""

    def build(features: dict[str, int] | None = None, **synthetic: Any) -> Config:
        features = features or {"f0": 1000, "f1": 50_000}
        raw = {
            "model": {"tables": _tables(features), "bottom_mlp": [8, 4]},
            "data": {
                "source": "synthetic",
                "synthetic": {"num_samples": 4096, "num_val_samples": 1024, **synthetic},
            },
        }
        return config_from_dict(raw)

    return build
