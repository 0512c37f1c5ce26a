"""Round trips of a real tree (a copy of the Python standard library plus awkward entries)
through the local cache and a server: commit, push, wipe, pull, checkout, and the
result must be byte-identical with the same modes and symlinks.

Against `casbah serve` the ref name travels as a Remote Asset; against BuildGrid 0.9.1
(no Remote Asset, no ReferenceStorage) push must warn that the name was not published
and still succeed, and the tree is pulled by digest.  Both also check that nothing is
sent twice: a re-commit writes no object and a second push sends no blob.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from buildgrid import start_buildgrid
from client_helpers import (
    assert_same_tree,
    cli_process,
    copy_stdlib,
    object_files,
    server_blob_files,
)

from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.reapi.channel import RemoteSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def std_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_stdlib(tmp_path_factory.mktemp("stdlib") / "tree")


def _tree_digests(cache_dir: Path, root: str) -> set[Digest]:
    from casbah.local import LocalCache

    return LocalCache(cache_dir).tree_digests(Digest.parse(root))


def test_roundtrip_through_casbah(std_tree: Path, start_server, tmp_path: Path) -> None:
    server = start_server()
    cache_dir = tmp_path / "cache"
    remote = ["--remote", server.url]
    files_in_tree = sum(1 for p in std_tree.rglob("*") if p.is_file() and not p.is_symlink())
    assert files_in_tree > 2000

    root = cli_process("cache", "commit", "--cache-dir", str(cache_dir), str(std_tree), "--ref", "std/lib").stdout
    root = root.strip()
    before = object_files(cache_dir)
    assert len(before) > 2000

    # Re-commit of the unchanged tree: same root, not one object file added or rewritten.
    again = cli_process("cache", "commit", "--cache-dir", str(cache_dir), str(std_tree), "--ref", "std/lib")
    assert again.stdout.strip() == root
    assert object_files(cache_dir) == before

    first = cli_process("cache", "push", "--cache-dir", str(cache_dir), *remote, "std/lib")
    assert first.stdout.strip() == root
    needed = _tree_digests(cache_dir, root)
    assert f"transferred {len(needed)} blobs" in first.stderr
    on_server = server_blob_files(server.data_dir)
    # Blobs over twice the server's largest chunk (4 MiB with the default 512 KiB average:
    # libpython3.11.a here) travel and are kept as FastCDC chunks; every other blob is stored
    # whole, once, and nothing else is.
    whole = {f"{d.hash}-{d.size}" for d in needed if d.size <= 4 * 1024 * 1024}
    large = [d for d in needed if d.size > 4 * 1024 * 1024]
    assert whole <= set(on_server)
    chunks = set(on_server) - whole
    assert all(size <= 2 * 1024 * 1024 for name, size in on_server.items() if name in chunks)
    assert 0 < sum(on_server[name] for name in chunks) <= sum(d.size for d in large)  # chunks dedupe

    # Second push of the same ref: FindMissingBlobs finds nothing, no blob is sent.
    with RemoteClient(RemoteSpec(server.url)) as client:
        assert client.find_missing(needed) == []
    second = cli_process("cache", "push", "--cache-dir", str(cache_dir), *remote, "std/lib")
    assert "transferred 0 blobs, 0 B" in second.stderr
    assert "warning" not in second.stderr
    assert server_blob_files(server.data_dir) == on_server  # nothing written, nothing rewritten

    # Wipe the local cache; pull by ref name (published as a Remote Asset) and check out.
    shutil.rmtree(cache_dir)
    pulled = cli_process("cache", "pull", "--cache-dir", str(cache_dir), *remote, "std/lib")
    assert pulled.stdout.strip() == root
    out = tmp_path / "checkout"
    cli_process("cache", "checkout", "--cache-dir", str(cache_dir), "--link", "std/lib", str(out))
    assert_same_tree(std_tree, out, exact_modes=False)
    copied = tmp_path / "copy"
    cli_process("cache", "checkout", "--cache-dir", str(cache_dir), "std/lib", str(copied))
    assert_same_tree(std_tree, copied, exact_modes=True)
    assert cli_process("cache", "fsck", "--cache-dir", str(cache_dir)).stdout == ""

    # Pulling again transfers nothing.
    again = cli_process("cache", "pull", "--cache-dir", str(cache_dir), *remote, "std/lib")
    assert "transferred 0 blobs" in again.stderr

    # `casbah cas download` writes the same tree straight from the server.
    direct = tmp_path / "direct"
    cli_process("cas", "download", *remote, root, "-o", str(direct))
    assert_same_tree(std_tree, direct, exact_modes=True)


def test_roundtrip_through_buildgrid(std_tree: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    with start_buildgrid(tmp_path / "buildgrid") as bg:
        remote = ["--remote", bg.url]
        root = cli_process("cache", "commit", "--cache-dir", str(cache_dir), str(std_tree), "--ref", "std").stdout
        root = root.strip()

        pushed = cli_process("cache", "push", "--cache-dir", str(cache_dir), *remote, "std")
        assert pushed.stdout.strip() == root
        assert "warning:" in pushed.stderr and "no Remote Asset service" in pushed.stderr
        assert "'std' was not published" in pushed.stderr
        needed = _tree_digests(cache_dir, root)
        assert f"transferred {len(needed)} blobs" in pushed.stderr
        blobs = bg.blob_count()
        assert blobs >= len(needed)

        second = cli_process("cache", "push", "--cache-dir", str(cache_dir), *remote, "std")
        assert "transferred 0 blobs, 0 B" in second.stderr
        assert bg.blob_count() == blobs
        with RemoteClient(RemoteSpec(bg.url)) as client:
            assert client.find_missing(needed) == []

        shutil.rmtree(cache_dir)
        # The name was never published: pulling it fails clearly; pulling the digest works.
        by_name = cli_process("cache", "pull", "--cache-dir", str(cache_dir), *remote, "std", expect=1)
        assert "pull by digest" in by_name.stderr
        assert "Traceback" not in by_name.stderr
        pulled = cli_process("cache", "pull", "--cache-dir", str(cache_dir), *remote, root)
        assert pulled.stdout.strip() == root
        out = tmp_path / "checkout"
        cli_process("cache", "checkout", "--cache-dir", str(cache_dir), root, str(out))
        assert_same_tree(std_tree, out, exact_modes=True)

        direct = tmp_path / "direct"
        cli_process("cas", "download", *remote, root, "-o", str(direct))
        assert_same_tree(std_tree, direct, exact_modes=True)
    assert bg.proc is None
