"""`casbah cache` as a user runs it (the real command in its own process): safe checkouts,
sizes, the automatic quota, subdirectory checkout and diff, tags, JSON output."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from client_helpers import add_awkward_entries, assert_same_tree, cli_process, small_tree

from casbah.local import LocalCache


def _env(tmp_path: Path, config: str | None = None) -> dict[str, str]:
    env = {"CASBAH_CACHE_DIR": str(tmp_path / "cache")}
    path = tmp_path / "config.yaml"
    path.write_text(config or "{}\n")
    env["CASBAH_CONFIG"] = str(path)
    return env


def _modes(top: Path) -> dict[str, int]:
    return {str(p.relative_to(top)): stat.S_IMODE(p.lstat().st_mode)
            for p in sorted(top.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_checkout_copies_with_ordinary_modes_and_editing_it_leaves_the_cache_intact(tmp_path: Path) -> None:
    env = _env(tmp_path)
    tree = small_tree(tmp_path / "tree", "v1")
    add_awkward_entries(tree)
    os.umask(0o022)  # the child inherits it
    cli_process("cache", "commit", str(tree), "--ref", "app/v1", env=env)
    out = tmp_path / "out"
    cli_process("cache", "checkout", "app/v1", str(out), env=env)
    assert_same_tree(tree, out, exact_modes=True)
    modes = _modes(out)
    assert modes["README"] == 0o644 and modes["run.sh"] == 0o755 and modes["empty-exec"] == 0o755
    original = (out / "run.sh").read_bytes()
    with open(out / "run.sh", "r+b") as f:  # an in-place edit, as an editor or a build might do
        f.write(b"#!/bin/sh\necho EDITED\n")
    assert "corrupt" not in cli_process("cache", "fsck", env=env).stdout  # exit 0: clean
    again = tmp_path / "again"
    cli_process("cache", "checkout", "app/v1", str(again), env=env)
    assert (again / "run.sh").read_bytes() == original


def test_checkout_honours_the_umask(tmp_path: Path) -> None:
    env = _env(tmp_path)
    tree = small_tree(tmp_path / "tree")
    cli_process("cache", "commit", str(tree), "--ref", "t", env=env)
    old = os.umask(0o077)
    try:
        cli_process("cache", "checkout", "t", str(tmp_path / "out"), env=env)
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out")["README"] == 0o600
    assert _modes(tmp_path / "out")["run.sh"] == 0o700


def test_link_checkout_is_read_only_and_an_edit_through_it_is_detected(tmp_path: Path) -> None:
    env = _env(tmp_path)
    tree = small_tree(tmp_path / "tree")
    cli_process("cache", "commit", str(tree), "--ref", "t", env=env)
    linked = tmp_path / "linked"
    cli_process("cache", "checkout", "--link", "t", str(linked), env=env)
    readme = linked / "README"
    assert _modes(linked)["README"] == 0o444 and readme.stat().st_nlink >= 2  # the cache's own inode
    readme.chmod(0o644)  # what a careless consumer (or root) does
    readme.write_text("edited through a hard link\n")
    refused = cli_process("cache", "checkout", "--verify", "t", str(tmp_path / "v"), env=env, expect=1)
    assert "modified" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "v").exists() or not any((tmp_path / "v").iterdir())
    # --verify removed the edited object, so fsck now reports the ref incomplete (exit 1).
    assert "incomplete: ref t" in cli_process("cache", "fsck", env=env, expect=1).stdout


def test_fsck_detects_an_object_edited_through_a_link_checkout(tmp_path: Path) -> None:
    env = _env(tmp_path)
    tree = small_tree(tmp_path / "tree")
    cli_process("cache", "commit", str(tree), "--ref", "t", env=env)
    linked = tmp_path / "linked"
    cli_process("cache", "checkout", "--link", "t", str(linked), env=env)
    (linked / "README").chmod(0o644)
    (linked / "README").write_text("edited\n")
    assert "corrupt: " in cli_process("cache", "fsck", env=env, expect=1).stdout


def test_subdirectory_checkout_diff_tags_and_json(tmp_path: Path) -> None:
    env = _env(tmp_path)
    v1, v2 = small_tree(tmp_path / "v1", "one"), small_tree(tmp_path / "v2", "two")
    (v2 / "src" / "pkg" / "new.h").write_text("new\n")
    (v2 / "README").unlink()
    root1 = cli_process("cache", "commit", str(v1), "--ref", "a/1", "--ref", "a/latest", env=env).stdout.strip()
    cli_process("cache", "commit", str(v2), "--ref", "a/2", env=env)
    refs = json.loads(cli_process("cache", "ls", "--json", env=env).stdout)
    assert {r["ref"] for r in refs} == {"a/1", "a/latest", "a/2"}
    assert {r["digest"] for r in refs if r["ref"] in ("a/1", "a/latest")} == {root1}

    sub = tmp_path / "sub"
    cli_process("cache", "checkout", "a/2", str(sub), "--path", "src/pkg", env=env)
    assert sorted(p.name for p in sub.iterdir()) == ["new.h", "util.h"]
    assert_same_tree(v2 / "src" / "pkg", sub, exact_modes=True)
    missing = cli_process("cache", "checkout", "a/2", str(tmp_path / "x"), "--path", "nope", env=env, expect=1)
    assert "no directory 'nope'" in missing.stderr and "Traceback" not in missing.stderr

    whole = json.loads(cli_process("cache", "diff", "a/1", "a/2", "--json", env=env).stdout)
    assert whole == {"added": ["src/pkg/new.h"], "removed": ["README"],
                     "modified": ["run.sh", "src/main.c", "src/pkg/util.h"]}
    part = cli_process("cache", "diff", "a/1", "a/2", "--path", "src/pkg", env=env).stdout.splitlines()
    assert part == ["A new.h", "M util.h"]  # paths relative to the subdirectory

    cli_process("cache", "tag", "a/2", "release", env=env)
    assert LocalCache(tmp_path / "cache").get_ref("release") == LocalCache(tmp_path / "cache").get_ref("a/2")
    clash = cli_process("cache", "tag", "a/1", "release", env=env, expect=1)
    assert "--force" in clash.stderr
    cli_process("cache", "tag", "--force", "a/1", "release", env=env)
    assert str(LocalCache(tmp_path / "cache").get_ref("release")) == root1

    size = json.loads(cli_process("cache", "size", "--json", env=env).stdout)
    assert size["refs"] == 4 and size["bytes"] == LocalCache(tmp_path / "cache").size() and size["quota"] is None
    line = cli_process("cache", "size", env=env).stdout.strip()
    assert line.endswith("4 refs") and "objects" in line and "B " in line


def test_quota_in_the_config_keeps_the_cache_under_it_newest_refs_kept(tmp_path: Path) -> None:
    env = _env(tmp_path, "quota: 50M\n")
    names = []
    for i in range(10):  # 10 trees of 20 MB: 200 MB committed
        tree = tmp_path / f"t{i}"
        tree.mkdir()
        for j in range(2):
            (tree / f"blob{j}.bin").write_bytes(os.urandom(10 * 1024 * 1024))
        cli_process("cache", "commit", str(tree), "--ref", f"build/{i}", env=env)
        names.append(f"build/{i}")
        for f in tree.iterdir():
            f.unlink()  # keep the test's own disk use small
        cache = LocalCache(tmp_path / "cache")
        assert cache.size() <= 50 * 1024 * 1024
    kept = {name for name, _, _ in LocalCache(tmp_path / "cache").list_refs()}
    assert kept == {"build/8", "build/9"}  # two 20 MB trees fit in 50 MB; the newest are kept
    size = json.loads(cli_process("cache", "size", "--json", env=env).stdout)
    assert size["quota"] == 50 * 1024 * 1024 and size["bytes"] <= size["quota"]
    assert "(quota 50 MiB)" in cli_process("cache", "size", env=env).stdout
