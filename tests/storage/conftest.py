"""Fixtures shared by the storage tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def small_tmpfs(tmpfs) -> Path:
    return tmpfs("20m")

