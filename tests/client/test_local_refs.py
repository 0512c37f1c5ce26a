"""Refs of the local cache: compare-and-swap updates, in one process and across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from client_helpers import ROOT

from casbah.digest import Digest
from casbah.errors import Aborted, NotFound
from casbah.local import LocalCache


def test_set_ref_with_expected_swaps_only_from_that_value(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "c")
    a, b, c = (cache.add_bytes(x) for x in (b"a", b"b", b"c"))
    cache.set_ref("r/x", a, expected=None)  # absent: created
    with pytest.raises(Aborted, match="expected absent"):
        cache.set_ref("r/x", b, expected=None)
    cache.set_ref("r/x", b, expected=a)
    with pytest.raises(Aborted, match=f"found {b}"):
        cache.set_ref("r/x", c, expected=a)  # a stale expectation: refused, the ref unchanged
    assert cache.resolve("r/x") == b
    cache.set_ref("r/x", c)  # no expectation: unconditional
    assert cache.get_ref("r/x") == c


def test_remove_ref_with_expected(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "c")
    a, b = cache.add_bytes(b"a"), cache.add_bytes(b"b")
    cache.set_ref("deep/name/r", a)
    with pytest.raises(Aborted):
        cache.named.remove("deep/name/r", expected=b)
    cache.named.remove("deep/name/r", expected=a)
    assert cache.get_ref("deep/name/r") is None
    assert not (cache.refs / "deep").exists()  # emptied parents go too
    with pytest.raises(NotFound):
        cache.remove_ref("deep/name/r")


INCREMENTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from casbah.digest import Digest
    from casbah.errors import Aborted
    from casbah.local import LocalCache

    cache, rounds, start = LocalCache(Path(sys.argv[1])), int(sys.argv[2]), Path(sys.argv[3])
    while not start.exists():
        time.sleep(0.005)
    won = lost = 0
    while won < rounds:
        current = cache.get_ref("counter")
        value = int(cache.read_bytes(current)) if current is not None else 0
        new = cache.add_bytes(str(value + 1).encode())
        try:
            cache.set_ref("counter", new, expected=current)
            won += 1
        except Aborted:
            lost += 1
    print(lost)
""")


def test_compare_and_swap_loses_no_update_across_processes(tmp_path: Path) -> None:
    """Read-modify-write races from several processes: with compare-and-swap, every
    increment lands exactly once (a lost update would leave the counter short)."""
    cache_dir, start, rounds, procs = tmp_path / "c", tmp_path / "go", 30, 3
    LocalCache(cache_dir)
    runners = [subprocess.Popen([sys.executable, "-c", INCREMENTER, str(cache_dir), str(rounds), str(start)],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    start.touch()
    losses = []
    for p in runners:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        losses.append(int(out))
    cache = LocalCache(cache_dir)
    final = cache.get_ref("counter")
    assert isinstance(final, Digest)
    assert int(cache.read_bytes(final)) == rounds * procs
