"""Two processes on one local cache: one commits trees under refs in a loop, the other
prunes in a loop.  No referenced object may ever be lost.

The trees are built to hit the dangerous interleaving: each new tree reuses content
of a tree whose ref was just moved elsewhere (so that content is unreferenced and
prune wants it gone).  Without the cache lock, commit sees such an object, skips
writing it, prune deletes it, and commit names a tree with a hole.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from client_helpers import ROOT, assert_same_tree

from casbah.local import LocalCache

COMMITTER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from casbah.local import LocalCache

    cache_dir, work, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cache = LocalCache(cache_dir)
    expected = {}
    deadline = time.monotonic() + 60
    while not (work / "pruning").exists():  # start together, however slowly the pruner started
        assert time.monotonic() < deadline, "the pruner never started"
        time.sleep(0.01)
    for i in range(rounds):
        tree = work / f"t{i}"
        (tree / "sub").mkdir(parents=True)
        (tree / "common.txt").write_text("in every tree\\n")
        (tree / f"unique-{i}.bin").write_bytes(os.urandom(2048))
        # Content of the tree committed 4 rounds ago, whose ref this commit moves away from.
        for j in range(max(0, i - 4), i + 1):
            (tree / "sub" / f"shared-{j}.txt").write_text(f"shared {j}\\n" * 50)
        if i % 3 == 0:
            (tree / "run.sh").write_text(f"#!/bin/sh\\necho {i}\\n")
            (tree / "run.sh").chmod(0o755)
        ref = f"refs/r{i % 4}"
        cache.commit(tree, ref=ref)
        expected[ref] = str(tree)
    (work / "expected.json").write_text(json.dumps(expected))
    (work / "done").write_text("")
""")

PRUNER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from casbah.local import LocalCache

    cache_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
    cache = LocalCache(cache_dir)
    prunes = removed = 0
    deadline = time.monotonic() + 120
    while not (work / "done").exists() and time.monotonic() < deadline:
        removed += cache.prune().objects_removed
        prunes += 1
        if prunes == 1:
            (work / "pruning").write_text("")
    print(json.dumps({"prunes": prunes, "removed": removed}))
""")


def test_commit_and_prune_in_parallel_lose_nothing(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    LocalCache(cache_dir)
    env_cmd = [sys.executable, "-c"]
    pruner = subprocess.Popen([*env_cmd, PRUNER, str(cache_dir), str(work)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    committer = subprocess.run([*env_cmd, COMMITTER, str(cache_dir), str(work), "60"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    out, err = pruner.communicate(timeout=300)
    assert committer.returncode == 0, committer.stderr
    assert pruner.returncode == 0, err
    stats = json.loads(out)
    # The pruner really ran alongside, and really deleted the trees the refs moved away from.
    assert stats["prunes"] >= 3, stats
    assert stats["removed"] > 0, stats

    cache = LocalCache(cache_dir)
    report = cache.fsck()
    assert report.clean, report
    expected = json.loads((work / "expected.json").read_text())
    assert sorted(name for name, _, _ in cache.list_refs()) == sorted(expected)
    for ref, tree in expected.items():
        out_dir = tmp_path / "checkout" / ref
        cache.checkout(cache.resolve(ref), out_dir)
        assert_same_tree(Path(tree), out_dir, exact_modes=True)
    # A last prune keeps exactly the four trees.
    cache.prune()
    assert cache.fsck().clean
