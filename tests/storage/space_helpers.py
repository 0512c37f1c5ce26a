"""Filling a small filesystem, for the full-disk tests (the `small_tmpfs` fixture is in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def fill_up(mount: Path) -> Path:
    """Write `mount/filler` until the filesystem refuses another byte; returns it (unlink it to free the space)."""
    filler = mount / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler
