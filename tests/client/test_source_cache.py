"""Source caching (issue 6) against real origins on loopback and a real casbah server.

Origins are real: a bare git repository served by `git daemon`, tarballs, zips and
files served by `python -m http.server`, each a child process on 127.0.0.1 that the
tests stop to play "the origin is down" (the port then refuses connections).  The
asset cache is a real `casbah serve` process.  Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the origin helpers live in the benchmark, which shares them
    sys.path.insert(0, str(ROOT))

from bench.sources import (  # noqa: E402
    Exe,
    GitDaemon,
    HttpOrigin,
    Link,
    expected_snapshot,
    free_port,
    make_corpus,
    make_git_repo,
    make_tarball,
    make_zip,
    snapshot,
)
from casbah.cli import main  # noqa: E402
from casbah.client.remote import RemoteClient  # noqa: E402
from casbah.client.source_cache import FETCH_POLICIES, PUSH_POLICIES, RemotePolicy, SourceCache  # noqa: E402
from casbah.client.sources import Source, SourceError, fetch_native, sri_sha256  # noqa: E402
from casbah.digest import Digest  # noqa: E402
from casbah.errors import AssetNotFound, NotFound, Unavailable  # noqa: E402
from casbah.local import LocalCache  # noqa: E402
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2  # noqa: E402
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc  # noqa: E402
from casbah.reapi.channel import RemoteSpec  # noqa: E402

T1 = {
    "README.md": b"hello, sources\n",
    "src/main.c": b"int main(void) { return 0; }\n",
    "src/lib/util.h": b"#define UTIL 1\n",
    "bin/run.sh": Exe(b"#!/bin/sh\necho run\n"),
    "docs/readme": Link("../README.md"),
    "empty.txt": b"",
}
T2 = {**T1, "src/main.c": b"int main(void) { return 2; }\n", "NEWS": b"v2\n"}
TAR_TREE = {
    "configure": Exe(b"#!/bin/sh\nexit 0\n"),
    "Makefile": b"all:\n\ttrue\n",
    "lib/a.c": b"int a;\n",
    "lib/deep/b.c": b"int b;\n",
    "include/a.h": Link("../lib/a.c"),
}
ZIP_TREE = {"tool/run": Exe(b"#!/bin/sh\necho zip\n"), "tool/data.txt": b"zip data\n", "top.txt": b"top\n"}
FILE_DATA = b"\x00\x01 a plain downloaded file \xff" * 100


class Origins:
    """A git daemon and an HTTP server holding one source of each kind.

    Everything lives under a random namespace (`http://…/<ns>/…`, `git://…/<ns>/…`), so
    the tests can share one casbah server without seeing each other's assets even if a
    port comes round again.
    """

    def __init__(self, root: Path) -> None:
        self.git = GitDaemon(root / "git")
        self.http = HttpOrigin(root / "http")
        self.ns = os.urandom(4).hex()
        (self.git.root / self.ns).mkdir()
        (self.http.root / self.ns).mkdir()
        self.commits = make_git_repo(self.git.root / self.ns / "proj.git", [T1, T2], tags={1: "v1.0"})
        self.tar_sha = make_tarball(self.path("proj-1.0.tar.gz"), TAR_TREE, prefix="proj-1.0")
        self.zip_sha = make_zip(self.path("proj-1.0.zip"), ZIP_TREE)
        self.path("data.bin").write_bytes(FILE_DATA)
        self.file_sha = hashlib.sha256(FILE_DATA).hexdigest()

    def path(self, name: str) -> Path:
        """Where the HTTP origin serves `name` from."""
        return self.http.root / self.ns / name

    def url(self, name: str) -> str:
        return self.http.url(f"{self.ns}/{name}")

    def git_url(self, name: str = "proj.git") -> str:
        return self.git.url(f"{self.ns}/{name}")

    def start(self) -> Origins:
        self.git.start()
        self.http.start()
        return self

    def stop(self) -> None:
        self.git.stop()
        self.http.stop()

    def git_source(self, commit: int = 0, **kw) -> Source:
        return Source("git", [self.git_url()], ref=self.commits[commit], branch="main", **kw)

    def sources(self) -> dict[str, tuple[Source, dict]]:
        """kind -> (source, the snapshot its staged tree must have)."""
        return {
            "git": (self.git_source(), expected_snapshot(T1)),
            "tar": (Source("tar", [self.url("proj-1.0.tar.gz")], sha256=self.tar_sha),
                    expected_snapshot({f"proj-1.0/{k}": v for k, v in TAR_TREE.items()})),
            "zip": (Source("zip", [self.url("proj-1.0.zip")], sha256=self.zip_sha),
                    expected_snapshot(ZIP_TREE)),
            "file": (Source("file", [self.url("data.bin")], sha256=self.file_sha),
                     expected_snapshot({"data.bin": FILE_DATA})),
        }


@pytest.fixture
def origins(tmp_path: Path) -> Iterator[Origins]:
    o = Origins(tmp_path / "origins").start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One casbah server for the tests that need no special one (each test's origins
    have their own URIs, so their assets never meet)."""
    root_conftest = request.config.pluginmanager.get_plugin(str(ROOT / "tests" / "conftest.py"))
    server = root_conftest.ServerProcess(tmp_path_factory.mktemp("casbah") / "data").start()
    yield server
    server.stop()


@contextlib.contextmanager
def source_cache(server, cache_dir: Path, fetch: str, push: str) -> Iterator[SourceCache]:
    with RemoteClient(RemoteSpec(url=server.url)) as client:
        yield SourceCache(LocalCache(cache_dir), [RemotePolicy(client, fetch, push)])


def asset(server, src: Source, qualifiers: dict[str, str] | None = None) -> Digest | None:
    """What the server answers for the source's fetch (None on a miss)."""
    q = src.fetch_qualifiers() if qualifiers is None else qualifiers
    with RemoteClient(RemoteSpec(url=server.url)) as client:
        try:
            return client.fetch_blob(src.uris, q) if src.is_blob else client.fetch_directory(src.uris, q)
        except AssetNotFound:
            return None


def casbah(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "casbah", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"casbah {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


# -- every policy combination ----------------------------------------------------------


@pytest.mark.parametrize("push", PUSH_POLICIES)
@pytest.mark.parametrize("fetch", FETCH_POLICIES)
def test_policy_matrix(fetch: str, push: str, origins: Origins, shared_server, tmp_path: Path) -> None:
    """First fetch with the origin up, second into a fresh cache with the origin down."""
    server = shared_server
    sources = origins.sources()
    pushes = fetch != "only" and push == "on"

    # 1. Origin up, empty asset cache.
    with source_cache(server, tmp_path / "cache1", fetch, push) as sc:
        for kind, (src, expected) in sources.items():
            dest = tmp_path / "first" / kind
            if fetch == "only":
                # Never native, even with the origin up: the air-gapped guarantee.
                with pytest.raises(NotFound, match=r"not in the asset cache.*asset-fetch: only"):
                    sc.fetch(src, dest)
                assert not dest.exists()
            else:
                sc.fetch(src, dest)
                assert snapshot(dest) == expected, kind
        counts = sc.summary.counts
        if fetch == "only":
            assert (counts["miss"], counts["failed"], counts["native"]) == (4, 4, 0)
        else:
            assert counts["native"] == 4
            assert counts["miss"] == (4 if fetch == "fallback" else 0)
        assert counts["pushed"] == (4 if pushes else 0)
    for kind, (src, _) in sources.items():
        assert (asset(server, src) is not None) == pushes, kind

    # 2. Origin down, fresh local cache.
    origins.stop()
    with source_cache(server, tmp_path / "cache2", fetch, push) as sc:
        for kind, (src, expected) in sources.items():
            dest = tmp_path / "second" / kind
            if fetch != "off" and pushes:
                sc.fetch(src, dest)
                assert snapshot(dest) == expected, kind
            elif fetch == "only":
                with pytest.raises(NotFound, match=r"not in the asset cache.*asset-fetch: only"):
                    sc.fetch(src, dest)
            else:
                with pytest.raises(Unavailable, match="failed from every URI"):
                    sc.fetch(src, dest)
        served = fetch != "off" and pushes
        assert sc.summary.counts["hit"] == (4 if served else 0)
        assert sc.summary.counts["native"] == 0

    if fetch == "only":
        # 3. Warm the cache while the origin is up (another machine pushes), then air-gapped again.
        origins.start()
        with source_cache(server, tmp_path / "cache3", "off", "on") as warm:
            for kind, (src, _) in sources.items():
                warm.fetch(src, tmp_path / "warm" / kind)
            assert warm.summary.counts["pushed"] == 4
        origins.stop()
        with source_cache(server, tmp_path / "cache4", fetch, push) as sc:
            for kind, (src, expected) in sources.items():
                dest = tmp_path / "third" / kind
                sc.fetch(src, dest)
                assert snapshot(dest) == expected, kind
            assert (sc.summary.counts["hit"], sc.summary.counts["native"]) == (4, 0)
            # Again with the content in the local cache: a hit that downloads nothing.
            client = sc.remotes[0].client
            before = client.downloaded.blobs
            sc.fetch(sources["git"][0], tmp_path / "again")
            assert snapshot(tmp_path / "again") == sources["git"][1]
            assert client.downloaded.blobs == before and sc.summary.counts["hit"] == 5


def test_asset_server_down(origins: Origins, start_server, tmp_path: Path) -> None:
    """`fallback` survives an unreachable asset server; `only` fails saying why."""
    server = start_server()
    server.stop()
    src, expected = origins.sources()["tar"]
    with source_cache(server, tmp_path / "c1", "fallback", "on") as sc:
        sc.fetch(src, tmp_path / "d1")
        counts = sc.summary.counts
        assert (counts["error"], counts["native"], counts["pushed"]) == (2, 1, 0)  # the fetch and the push
        # The rest of the run skips the dead remote instead of waiting out the retries again.
        assert sc.remotes[0].unreachable is not None
        zip_src, zip_expected = origins.sources()["zip"]
        sc.fetch(zip_src, tmp_path / "z1")
        assert snapshot(tmp_path / "z1") == zip_expected
        assert (counts["error"], counts["native"]) == (4, 2)
    assert snapshot(tmp_path / "d1") == expected
    with source_cache(server, tmp_path / "c2", "only", "off") as sc, \
            pytest.raises(NotFound, match=f"asset-fetch: only.*{server.url}.*(UNAVAILABLE|unavailable|connect)"):
        sc.fetch(src, tmp_path / "d2")


# -- what is pushed, and who can read it ----------------------------------------------

#: The qualifiers README.md documents for each kind, spelled out (not taken from the
#: code) so that a change to either is caught.
def documented_push_qualifiers(origins: Origins) -> dict[str, dict[str, str]]:
    return {
        "git": {"resource_type": "application/x-git", "vcs.commit": origins.commits[0], "vcs.branch": "main"},
        "tar": {"resource_type": "application/x-tar", "checksum.sri": sri_sha256(origins.tar_sha)},
        "zip": {"resource_type": "application/zip", "checksum.sri": sri_sha256(origins.zip_sha)},
        "file": {"resource_type": "application/octet-stream", "checksum.sri": sri_sha256(origins.file_sha)},
    }


def test_pushes_are_standard_assets_any_client_can_fetch(origins: Origins, shared_server, tmp_path: Path) -> None:
    """`casbah source push` (CLI) and the library push; `casbah asset fetch` (CLI) and raw
    Remote Asset requests with the documented qualifiers, shuffled, find them."""
    server = shared_server
    sources = origins.sources()
    git_src, _ = sources["git"]
    done = casbah("source", "push", "--kind", "git", "--uri", git_src.uris[0], "--ref", git_src.ref, "--branch",
                  "main", "--remote", server.url, "--cache-dir", str(tmp_path / "cli-cache"))
    roots = {"git": done.stdout.strip()}
    assert "1 pushed" in done.stderr
    with source_cache(server, tmp_path / "cache", "off", "on") as sc:
        for kind in ("tar", "zip", "file"):
            roots[kind] = str(sc.fetch(sources[kind][0], tmp_path / "stage" / kind))
    file_blob = f"{origins.file_sha}/{len(FILE_DATA)}"

    for kind, (src, _) in sources.items():
        args = ["asset", "fetch", "--remote", server.url, *[a for u in src.uris for a in ("--uri", u)]]
        args += [a for n, v in src.fetch_qualifiers().items() for a in ("--qualifier", f"{n}={v}")]
        done = casbah(*args, *([] if src.is_blob else ["--directory"]))
        assert done.stdout.strip() == (file_blob if src.is_blob else roots[kind]), kind

    documented = documented_push_qualifiers(origins)
    rng = random.Random(6)
    with grpc.insecure_channel(server.address) as channel:
        stub = ra_grpc.FetchStub(channel)
        for kind, (src, _) in sources.items():
            pairs = list(documented[kind].items())
            rng.shuffle(pairs)
            qualifiers = [ra_pb2.Qualifier(name=n, value=v) for n, v in pairs]
            if src.is_blob:
                response = stub.FetchBlob(ra_pb2.FetchBlobRequest(uris=src.uris, qualifiers=qualifiers))
                got = f"{response.blob_digest.hash}/{response.blob_digest.size_bytes}"
            else:
                response = stub.FetchDirectory(ra_pb2.FetchDirectoryRequest(uris=src.uris, qualifiers=qualifiers))
                d = response.root_directory_digest
                got = f"{d.hash}/{d.size_bytes}"
            assert response.status.code == 0, (kind, response.status.message)
            assert got == (file_blob if src.is_blob else roots[kind]), kind
            # What was pushed is exactly the documented set: nothing casbah-specific.
            assert {q.name: q.value for q in response.qualifiers} == documented[kind], kind
        # Bazel's downloader asks for a file by checksum.sri alone.
        response = stub.FetchBlob(ra_pb2.FetchBlobRequest(
            uris=sources["file"][0].uris,
            qualifiers=[ra_pb2.Qualifier(name="checksum.sri", value=sri_sha256(origins.file_sha))]))
        assert response.status.code == 0 and response.blob_digest.hash == origins.file_sha


def test_git_tree_is_the_servers_origin_fetch_tree(origins: Origins, start_server, tmp_path: Path) -> None:
    """The client's native git checkout and the server's own origin fetch of the same
    commit give the same tree digest: either side can fill the cache for the other."""
    config = tmp_path / "origin.yaml"
    config.write_text(yaml.safe_dump({"instances": {"": {"origin-fetch": {"allow": ["git://127\\.0\\.0\\.1:"]}}}}))
    server = start_server(["--config", str(config)])
    src, _ = origins.sources()["git"]
    server_side = asset(server, src)  # a miss in the index: the server fetches the origin itself
    assert server_side is not None
    with source_cache(server, tmp_path / "cache", "off", "off") as sc:
        assert sc.fetch(src, tmp_path / "stage") == server_side


def test_wrong_checksum_is_rejected_and_nothing_pushed(origins: Origins, shared_server, tmp_path: Path) -> None:
    server = shared_server
    wrong = hashlib.sha256(b"something else").hexdigest()
    with source_cache(server, tmp_path / "cache", "fallback", "on") as sc:
        for kind, (src, _) in origins.sources().items():
            if kind == "git":
                continue
            bad = Source(kind, src.uris, sha256=wrong)
            dest = tmp_path / "stage" / kind
            with pytest.raises(SourceError, match=f"sha256 is {getattr(origins, kind + '_sha')}, expected {wrong}"):
                sc.fetch(bad, dest)
            assert not dest.exists()
            # The server has no entry under that URI with any qualifiers, right or wrong.
            assert asset(server, bad) is None
            assert asset(server, bad, qualifiers={}) is None
            assert asset(server, src) is None
        assert sc.summary.counts["failed"] == 3
        assert sc.summary.counts["pushed"] == 0


def test_another_commit_or_checksum_is_a_miss(origins: Origins, shared_server, tmp_path: Path) -> None:
    server = shared_server
    sources = origins.sources()
    with source_cache(server, tmp_path / "c1", "off", "on") as warm:
        warm.fetch(origins.git_source(0), tmp_path / "s1")
        warm.fetch(sources["tar"][0], tmp_path / "s2")
    # The second commit: the asset cache misses (same URI, other vcs.commit) and the
    # native fetch stages the second commit's tree, not the cached first one.
    with source_cache(server, tmp_path / "c2", "fallback", "off") as sc:
        sc.fetch(origins.git_source(1), tmp_path / "s3")
        assert snapshot(tmp_path / "s3") == expected_snapshot(T2)
        assert (sc.summary.counts["miss"], sc.summary.counts["native"], sc.summary.counts["hit"]) == (1, 1, 0)
    other_sha = make_tarball(origins.path("proj-1.1.tar.gz"), {"x": b"other release\n"})
    other_tar = Source("tar", sources["tar"][0].uris, sha256=other_sha)
    assert asset(server, other_tar) is None
    assert asset(server, origins.git_source(1)) is None
    # The first commit still hits, the second is simply not there with the origin down.
    origins.stop()
    with source_cache(server, tmp_path / "c3", "fallback", "off") as sc:
        sc.fetch(origins.git_source(0), tmp_path / "s4")
        assert snapshot(tmp_path / "s4") == expected_snapshot(T1)
        with pytest.raises(Unavailable):
            sc.fetch(origins.git_source(1), tmp_path / "s5")
        assert (sc.summary.counts["hit"], sc.summary.counts["miss"]) == (1, 1)


# -- mirrors -------------------------------------------------------------------------


def test_dead_mirrors_then_a_serving_one(origins: Origins, shared_server, tmp_path: Path) -> None:
    server = shared_server
    dead_http = f"http://127.0.0.1:{free_port()}/{origins.ns}/proj-1.0.tar.gz"  # nothing listens there
    missing = origins.url("nope/proj-1.0.tar.gz")  # 404
    corrupt = origins.url("proj-1.0.zip")  # serves other bytes: rejected by the checksum
    tar_src, tar_expected = origins.sources()["tar"]
    tar = Source("tar", [dead_http, missing, corrupt, *tar_src.uris], sha256=origins.tar_sha)
    git = Source("git", [f"git://127.0.0.1:{free_port()}/{origins.ns}/proj.git", origins.git_url("nope.git"),
                         origins.git_url()], ref=origins.commits[0])
    with source_cache(server, tmp_path / "cache", "fallback", "on") as sc:
        sc.fetch(tar, tmp_path / "tar")
        sc.fetch(git, tmp_path / "git")
        assert sc.summary.counts["pushed"] == 2
    assert snapshot(tmp_path / "tar") == tar_expected
    assert snapshot(tmp_path / "git") == expected_snapshot(T1)
    # Every URI was pushed as a name of the content: asking by a dead mirror alone hits.
    assert asset(server, Source("tar", [dead_http], sha256=origins.tar_sha)) is not None
    assert asset(server, Source("git", [git.uris[0]], ref=origins.commits[0])) is not None


def test_every_mirror_failing_names_each(origins: Origins, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/x.tar.gz"
    missing = origins.url("missing.tar.gz")
    src = Source("tar", [dead, missing], sha256=origins.tar_sha)
    (tmp_path / "work").mkdir()
    with pytest.raises(Unavailable) as info:
        fetch_native(src, tmp_path / "work")
    assert dead in str(info.value) and f"{missing}: HTTP 404" in str(info.value)
    assert list((tmp_path / "work").iterdir()) == []


# -- hostile and unusual archives ----------------------------------------------------


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size if kind == tarfile.REGTYPE else 0
    info.mode = 0o644
    return info


#: case -> (extra members, what the error must say)
HOSTILE_TARS = {
    "dotdot": ([_tar_member("../x")], "escapes the extraction directory"),
    "nested-dotdot": ([_tar_member("a/../../x")], "escapes the extraction directory"),
    "absolute": ([_tar_member("/abs")], "escapes the extraction directory"),
    "char-device": ([_tar_member("dev/null", tarfile.CHRTYPE)], "is a device or FIFO"),
    "block-device": ([_tar_member("dev/sda", tarfile.BLKTYPE)], "is a device or FIFO"),
    "fifo": ([_tar_member("pipe", tarfile.FIFOTYPE)], "is a device or FIFO"),
    "symlink-out": ([_tar_member("evil", tarfile.SYMTYPE, "../../x")], "leaves the tree"),
    "symlink-absolute": ([_tar_member("evil", tarfile.SYMTYPE, "/etc/passwd")], "leaves the tree"),
    "hardlink-out": ([_tar_member("evil", tarfile.LNKTYPE, "../x")], "leaves the tree"),
    # Each link is inside the tree on its own; through the first, the second leaves it
    # (caught by tarfile's data filter, which resolves real paths).
    "symlink-chain": ([_tar_member("d", tarfile.DIRTYPE), _tar_member("d/up", tarfile.SYMTYPE, ".."),
                       _tar_member("d/up/out", tarfile.SYMTYPE, "../x")], "outside the destination"),
}
HOSTILE_ZIPS = {
    "dotdot": ("../x", 0o100644, "escapes the extraction directory"),
    "absolute": ("/abs", 0o100644, "escapes the extraction directory"),
    "char-device": ("dev/null", stat.S_IFCHR | 0o644, "is a device"),
    "symlink": ("evil", stat.S_IFLNK | 0o777, "is a symlink"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tar_is_rejected(case: str, origins: Origins, tmp_path: Path) -> None:
    name = f"hostile-{case}.tar"
    members, message = HOSTILE_TARS[case]
    sha = make_tarball(origins.path(name), {"ok.txt": b"fine\n"}, compression="", extra=members)
    _assert_rejected(Source("tar", [origins.url(name)], sha256=sha), tmp_path, message)


@pytest.mark.parametrize("case", sorted(HOSTILE_ZIPS))
def test_hostile_zip_is_rejected(case: str, origins: Origins, tmp_path: Path) -> None:
    name = f"hostile-{case}.zip"
    member, mode, message = HOSTILE_ZIPS[case]
    sha = make_zip(origins.path(name), {"ok.txt": b"fine\n"}, extra=[(member, mode, b"../../x")])
    _assert_rejected(Source("zip", [origins.url(name)], sha256=sha), tmp_path, message)


def _assert_rejected(src: Source, tmp_path: Path, message: str) -> None:
    outer = tmp_path / "outer"
    work = outer / "a" / "work"  # `../x` and `../../x` would land inside `outer`
    work.mkdir(parents=True)
    with pytest.raises(SourceError, match="rejected") as info:
        fetch_native(src, work)
    assert message in str(info.value)
    left = sorted(p.relative_to(outer).as_posix() for p in outer.rglob("*"))
    assert left == ["a", "a/work"]


def test_zip_keeps_exec_bits_and_file_is_staged_under_its_name(origins: Origins, shared_server,
                                                               tmp_path: Path) -> None:
    server = shared_server
    zip_src, _ = origins.sources()["zip"]
    renamed = Source("file", [origins.url("data.bin")], sha256=origins.file_sha, filename="payload.dat")
    with source_cache(server, tmp_path / "c1", "fallback", "on") as sc:
        sc.fetch(zip_src, tmp_path / "zip")
        sc.fetch(renamed, tmp_path / "file")
    assert os.stat(tmp_path / "zip/tool/run").st_mode & 0o111 == 0o111
    assert os.stat(tmp_path / "zip/tool/data.txt").st_mode & 0o111 == 0
    assert snapshot(tmp_path / "file") == expected_snapshot({"payload.dat": FILE_DATA})
    # From the cache (origin down) the blob is staged under the same name.
    origins.stop()
    with source_cache(server, tmp_path / "c2", "only", "off") as sc:
        sc.fetch(renamed, tmp_path / "file2")
    assert snapshot(tmp_path / "file2") == expected_snapshot({"payload.dat": FILE_DATA})


def test_with_git_dir_is_a_separate_asset(origins: Origins, shared_server, tmp_path: Path) -> None:
    """A checkout with `.git` never answers a plain fetch, and the other way round."""
    server = shared_server
    with_git = origins.git_source(0, keep_git_dir=True)
    with source_cache(server, tmp_path / "c1", "fallback", "on") as sc:
        sc.fetch(with_git, tmp_path / "g1")
    first = snapshot(tmp_path / "g1")  # before `git status` refreshes .git/index
    head = subprocess.run(["git", "-C", str(tmp_path / "g1"), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert head.stdout.strip() == origins.commits[0]
    status = subprocess.run(["git", "-C", str(tmp_path / "g1"), "status", "--porcelain"], capture_output=True,
                            text=True)
    assert status.returncode == 0 and status.stdout == ""
    origins.stop()
    with source_cache(server, tmp_path / "c2", "fallback", "off") as sc:
        # The server's answer to the plain fetch is the .git checkout (its qualifiers are a
        # superset): refused, then the native fallback fails with the origin down.
        with pytest.raises(Unavailable):
            sc.fetch(origins.git_source(0), tmp_path / "plain")
        assert sc.summary.counts["error"] == 1 and sc.summary.counts["hit"] == 0
        sc.fetch(with_git, tmp_path / "g2")
        assert (tmp_path / "g2/.git").is_dir()
        assert snapshot(tmp_path / "g2") == first
    origins.start()
    with source_cache(server, tmp_path / "c3", "fallback", "on") as sc:
        sc.fetch(origins.git_source(0), tmp_path / "plain")
    origins.stop()
    with source_cache(server, tmp_path / "c4", "only", "off") as sc:
        sc.fetch(origins.git_source(0), tmp_path / "plain2")
    assert snapshot(tmp_path / "plain2") == expected_snapshot(T1)


# -- the command line ------------------------------------------------------------------


def test_cli_fetch_only_serves_or_explains(origins: Origins, shared_server, tmp_path: Path) -> None:
    server = shared_server
    src, expected = origins.sources()["tar"]
    common = ["source", "fetch", "--kind", "tar", "--uri", src.uris[0], "--sha256", src.sha256, "--remote",
              server.url]
    origins.stop()
    done = casbah(*common, "--asset-fetch", "only", "--cache-dir", str(tmp_path / "c1"), str(tmp_path / "d1"),
                  check=False)
    assert done.returncode == 1
    assert "not in the asset cache and native fetching is off (asset-fetch: only)" in done.stderr
    assert "Traceback" not in done.stderr
    origins.start()
    casbah(*common, "--asset-push", "on", "--cache-dir", str(tmp_path / "c2"), str(tmp_path / "d2"))
    origins.stop()
    done = casbah(*common, "--asset-fetch", "only", "--cache-dir", str(tmp_path / "c3"), str(tmp_path / "d3"))
    assert "1 hit" in done.stderr
    assert snapshot(tmp_path / "d3") == expected


def test_manifest_errors_are_reported_by_entry(tmp_path: Path) -> None:
    """Bad entries fail before any fetch, naming the entry (in-process: nothing to fetch)."""
    cases = {
        "directory": ({"kind": "tar", "url": "http://x/a.tgz", "sha256": "0" * 64, "directory": "../out"},
                      "must be a relative path"),
        "sha": ({"kind": "tar", "url": "http://x/a.tgz", "sha256": "abc"}, "sources[0]: tar source"),
        "kind": ({"kind": "svn", "url": "http://x/"}, "unknown source kind 'svn'"),
        "ref": ({"kind": "git", "url": "git://x/r.git", "ref": "main"}, "full 40-hex commit"),
        "twice": ({"kind": "local", "url": "/tmp", "directory": "same"}, "are both staged in"),
    }
    for name, (entry, message) in cases.items():
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump({"sources": [entry, entry] if name == "twice" else [entry]}))
        result = CliRunner().invoke(main, ["source", "fetch-all", str(manifest), str(tmp_path / "dest"),
                                           "--cache-dir", str(tmp_path / "cache")])
        assert result.exit_code == 1 and message in result.output, (name, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (name, result.exception)
        assert not (tmp_path / "dest").exists()


def test_fetch_all_50_sources_from_a_warm_cache_with_origins_down(start_server, tmp_path: Path) -> None:
    """25 git repositories + 25 tarballs (through an alias whose first mirror is dead):
    pushed by a first fetch-all, then all 50 hits with the origins stopped."""
    corpus = make_corpus(tmp_path / "origins", n_git=25, n_tar=25, files=6, size=200, seed=6)
    server = start_server()
    dead = f"http://127.0.0.1:{free_port()}/"
    manifest = dict(corpus.manifest)
    manifest["aliases"] = {"mirror": [dead, f"http://127.0.0.1:{corpus.http.port}/"]}
    manifest["remotes"] = [{"url": server.url, "asset-fetch": "fallback", "asset-push": "on"}]
    for entry in manifest["sources"]:
        if entry["kind"] == "tar":
            entry["url"] = "mirror:" + entry["url"].rsplit("/", 1)[1]
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump(manifest))
    corpus.git.start()
    corpus.http.start()
    try:
        done = casbah("source", "fetch-all", str(path), str(tmp_path / "d1"), "--cache-dir", str(tmp_path / "c1"))
        assert "50 sources" in done.stderr and "50 native" in done.stderr and "50 pushed" in done.stderr
    finally:
        corpus.git.stop()
        corpus.http.stop()
    done = casbah("source", "fetch-all", str(path), str(tmp_path / "d2"), "--cache-dir", str(tmp_path / "c2"),
                  "--asset-fetch", "only", "-j", "8")
    assert "50 hit" in done.stderr and "native" not in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 50
    for directory, files in corpus.trees.items():
        assert snapshot(tmp_path / "d2" / directory) == expected_snapshot(files), directory
