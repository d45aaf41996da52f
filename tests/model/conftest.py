"""Fixtures of the model tests (helpers live in `tiny.py`)."""

from __future__ import annotations

import pytest

from model.tiny import tiny_config
from ndp.config import Config


@pytest.fixture()
def cfg() -> Config:
    return tiny_config()
