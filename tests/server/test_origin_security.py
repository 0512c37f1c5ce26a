"""Origin fetch stays inside its allow-list (issue 11, rows 3, 4 and 8).

Everything is real and on loopback: an allowed HTTP origin that redirects, a
forbidden one holding TOP-SECRET content (its request log proves it was never
asked), a listener standing in for an FTP server, `git daemon` repositories, and
a casbah server whose allow-list admits only the allowed origin's port.  The
server has a tokens file and `anonymous: read-only`, so the fetches below are
made by callers who cannot write anything themselves.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from pydantic import ValidationError
from server_test_helpers import OPTIONS, bs_read, key, missing, read_name, rpc_error, sha
from test_origin_fetch import GitOrigin, HttpOrigin, _free_port, fetch_blob, fetch_dir, git, q, sri

from casbah.assets.origin import git_scheme
from casbah.config import OriginFetchConfig

OK = grpc.StatusCode.OK.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
SECRET = b"TOP-SECRET: the intranet's answer\n"
READ_TOKEN = "origin-reader-token-0123456789"
CAP = 64 * 1024


class Listener:
    """A TCP port that records every connection and closes it (an "FTP server" that must stay unvisited)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def allowed() -> Iterator[HttpOrigin]:
    server = HttpOrigin()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def forbidden() -> Iterator[HttpOrigin]:
    """Another port on the same host: the allow-list names the allowed origin's port only."""
    server = HttpOrigin()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ftp() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> Iterator[tuple[GitOrigin, str, str, Path]]:
    """The git origin of test_origin_fetch, plus `big.git` (a commit with a file over the cap)
    in the directory `git daemon` serves; yields (origin, big repo URI, its commit, that directory)."""
    base = tmp_path_factory.mktemp("git")
    origin = GitOrigin(base, _free_port())
    work = base / "big"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "big.bin").write_bytes(os.urandom(3 * CAP))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "big", cwd=work)
    commit = git("rev-parse", "HEAD", cwd=work)
    git("clone", "-q", "--bare", str(work), str(base / "serve" / "big.git"), cwd=base)
    yield origin, f"git://127.0.0.1:{origin.port}/big.git", commit, base / "serve"
    origin.stop()


@pytest.fixture(scope="module")
def sec_server(module_server_factory, tmp_path_factory, allowed: HttpOrigin, repos):
    """Allowed: the allowed HTTP origin's port under /ok/, /nolength/, /trickle/, /git/, and the
    git daemon; `file://` and `ext::` are listed too, to show they are never used whatever the list says."""
    cfg = tmp_path_factory.mktemp("cfg")
    tokens = cfg / "tokens"
    tokens.write_text(f"sha256:{hashlib.sha256(READ_TOKEN.encode()).hexdigest()} read\n")
    config = cfg / "casbah.yaml"
    config.write_text(rf"""
auth:
  tokens: {tokens}
  anonymous: read-only
instances:
  "":
    origin-fetch:
      max-size: {CAP}
      allow:
        - 'http://127\.0\.0\.1:{allowed.port}/(ok|nolength|trickle|git)/'
        - 'git://127\.0\.0\.1:{repos[0].port}/'
        - 'file://'
        - 'ext::'
""")
    return module_server_factory(["--config", str(config)])


@pytest.fixture(scope="module")
def ch(sec_server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sec_server.address, options=OPTIONS) as channel:
        yield channel


def unique(prefix: str = "ok") -> str:
    return f"/{prefix}/{uuid.uuid4().hex}/file"


def wait_for_log(server, pattern: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = server.log_path.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match.group(0)
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r} in:\n{text[-3000:]}")
        time.sleep(0.05)


# -- row 3: redirects ---------------------------------------------------------------------------


def test_redirect_to_another_port_is_refused_and_nothing_stored(ch, allowed, forbidden) -> None:
    path = unique()
    allowed.redirects[path] = forbidden.url(path)
    forbidden.files[path] = SECRET
    response = fetch_blob(ch, [allowed.url(path)])
    assert response.status.code == PERMISSION_DENIED, response.status
    assert "allow-list" in response.status.message
    assert path not in forbidden.requests  # not one request reached the forbidden origin
    assert missing(ch, [sha(SECRET)]) == {key(sha(SECRET))}
    # Nothing indexed: the next fetch asks the allowed origin again, and is refused again.
    again = fetch_blob(ch, [allowed.url(path)])
    assert again.status.code == PERMISSION_DENIED
    assert allowed.requests.count(path) == 2


def test_redirect_to_a_path_outside_the_list_on_the_allowed_host_is_refused(ch, allowed) -> None:
    """Each hop is checked against the allow-list, not merely against the first URI's host."""
    path, denied = unique(), f"/denied/{uuid.uuid4().hex}"
    allowed.redirects[path] = denied
    allowed.files[denied] = SECRET
    response = fetch_blob(ch, [allowed.url(path)])
    assert response.status.code == PERMISSION_DENIED, response.status
    assert denied not in allowed.requests


def test_redirect_to_ftp_is_refused(ch, allowed, ftp) -> None:
    path = unique()
    allowed.redirects[path] = f"ftp://127.0.0.1:{ftp.port}/secret.txt"
    response = fetch_blob(ch, [allowed.url(path)], timeout=duration_pb2.Duration(seconds=5))
    assert response.status.code == PERMISSION_DENIED, response.status
    assert "only http and https" in response.status.message
    assert ftp.connections == 0


def test_redirect_inside_the_allow_list_is_followed(ch, allowed, sec_server) -> None:
    """A relative redirect to an allowed path still works; the content is indexed under the
    requested URI (the one the client named), and the store is audited."""
    path, target = unique(), unique()
    data = os.urandom(2000)
    allowed.redirects[path] = target
    allowed.files[target] = data
    response = fetch_blob(ch, [allowed.url(path)], [q("checksum.sri", sri(data))])
    assert response.status.code == OK, response.status
    assert response.uri == allowed.url(path)
    assert bs_read(ch, read_name(response.blob_digest)) == data
    assert allowed.requests[-2:] == [path, target]
    wait_for_log(sec_server, rf"WRITE OriginFetchBlob on instance '' {re.escape(allowed.url(path))} -> "
                             rf"{sha(data).hash}/{len(data)} by anonymous \(peer [^)]+\)")


def test_git_does_not_follow_a_redirect(ch, allowed, forbidden) -> None:
    """git's default follows the first request's redirect; origin fetch turns that off."""
    allowed.redirects["/git/"] = forbidden.url("/git/")
    response = fetch_dir(ch, [allowed.url("/git/repo.git")], [q("vcs.commit", "ab" * 20)])
    assert response.status.code != OK
    assert any(r.startswith("/git/repo.git/info/refs") for r in allowed.requests)
    assert not [r for r in forbidden.requests if r.startswith("/git/")]


def test_git_never_uses_file_or_ext_even_when_listed(ch, repos, tmp_path) -> None:
    """`file://` would read the server's own disk, `ext::` run a command: a plain miss."""
    origin, _, _, served = repos
    marker = tmp_path / "ran"
    for uri in (f"file://{served}/repo.git", f"ext::sh -c touch% {marker}"):
        response = fetch_dir(ch, [uri], [q("vcs.commit", origin.commit)])
        assert response.status.code == NOT_FOUND, (uri, response.status)
    assert not marker.exists()


def test_git_scheme() -> None:
    assert git_scheme("https://example.com/r.git") == "https"
    assert git_scheme("GIT://example.com/r.git") == "git"
    assert git_scheme("ssh://git@example.com/r.git") == "ssh"
    for uri in ("ext::sh -c id", "file:///srv/r.git", "/srv/r.git", "git@example.com:r.git", "-uhttps://x/",
                "fd::3", "http:/x"):
        assert git_scheme(uri) is None, uri


# -- row 4: indexed only under the URI fetched ---------------------------------------------------


def test_content_is_indexed_only_under_the_uri_it_came_from(ch, allowed, forbidden, sec_server) -> None:
    victim_path = unique()
    victim = forbidden.url(victim_path)  # not in the allow-list: never fetched by casbah
    attacker_path = unique()
    attacker = os.urandom(700)
    allowed.files[attacker_path] = attacker
    response = fetch_blob(ch, [victim, allowed.url(attacker_path)], [q("resource_type", "application/octet-stream")])
    assert response.status.code == OK, response.status
    assert response.uri == allowed.url(attacker_path)
    later = fetch_blob(ch, [victim])
    assert later.status.code == NOT_FOUND, later.status
    assert not later.blob_digest.hash
    later = fetch_blob(ch, [victim], [q("resource_type", "application/octet-stream")])
    assert later.status.code == NOT_FOUND, later.status
    assert victim_path not in forbidden.requests
    # The write is audited, naming the one URI and the digest.
    line = wait_for_log(sec_server, rf"WRITE OriginFetchBlob on instance '' [^\n]*{sha(attacker).hash}[^\n]*")
    assert allowed.url(attacker_path) in line and victim not in line


def test_unverified_qualifiers_are_not_indexed(ch, allowed) -> None:
    """A download verifies `checksum.sri`, never `vcs.commit`: that pin is not recorded."""
    path = unique()
    allowed.files[path] = os.urandom(300)
    response = fetch_blob(ch, [allowed.url(path)], [q("vcs.commit", "cd" * 20)])
    assert response.status.code == OK, response.status
    assert [(x.name, x.value) for x in response.qualifiers] == []


def test_audit_names_an_authenticated_caller(ch, allowed, sec_server) -> None:
    path = unique()
    data = os.urandom(400)
    allowed.files[path] = data
    response = fetch_blob(ch, [allowed.url(path)], metadata=[("authorization", f"Bearer {READ_TOKEN}")])
    assert response.status.code == OK, response.status
    who = "token:" + hashlib.sha256(READ_TOKEN.encode()).hexdigest()[:12]
    wait_for_log(sec_server, rf"WRITE OriginFetchBlob on instance '' {re.escape(allowed.url(path))} -> "
                             rf"{sha(data).hash}/400 by {who} ")


# -- row 8: vcs.commit is a full match --------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\x00"])
def test_commit_with_trailing_characters_is_invalid(ch, repos, suffix: str) -> None:
    origin, _, _, _ = repos
    error = rpc_error(lambda: fetch_dir(ch, [origin.uri], [q("vcs.commit", origin.commit + suffix)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vcs.commit" in error.details()


def test_sri_of_the_wrong_length_is_invalid_before_any_download(ch, allowed) -> None:
    path = unique()
    allowed.files[path] = b"data"
    short = sri(b"data")[:-4] + "="  # a 31-byte "sha256"
    error = rpc_error(lambda: fetch_blob(ch, [allowed.url(path)], [q("checksum.sri", short)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert path not in allowed.requests


def test_git_fetch_still_works(ch, repos) -> None:
    origin, _, _, _ = repos
    response = fetch_dir(ch, [origin.uri], [q("vcs.commit", origin.commit)])
    assert response.status.code == OK, response.status


# -- size cap ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["ok", "nolength"])
def test_download_over_the_cap_is_refused_and_nothing_stored(ch, allowed, prefix: str) -> None:
    """Announced by Content-Length or only counted while reading: RESOURCE_EXHAUSTED, nothing stored."""
    path = unique(prefix)
    data = os.urandom(CAP + 1)
    allowed.files[path] = data
    response = fetch_blob(ch, [allowed.url(path)])
    assert response.status.code == RESOURCE_EXHAUSTED, response.status
    assert "size cap" in response.status.message
    assert missing(ch, [sha(data)]) == {key(sha(data))}
    allowed.files[path] = data[:CAP]  # at the cap: fine, and fetched anew (nothing was indexed)
    response = fetch_blob(ch, [allowed.url(path)])
    assert response.status.code == OK, response.status
    assert key(response.blob_digest) == key(sha(data[:CAP]))
    assert allowed.requests.count(path) == 2


def test_git_fetch_over_the_cap_is_refused(ch, repos) -> None:
    _, uri, commit, _ = repos
    response = fetch_dir(ch, [uri], [q("vcs.commit", commit)])
    assert response.status.code == RESOURCE_EXHAUSTED, response.status
    assert "size cap" in response.status.message


def test_trickling_origin_is_still_bounded_by_the_timeout(ch, allowed) -> None:
    path = unique("trickle")
    start = time.monotonic()
    response = fetch_blob(ch, [allowed.url(path)], timeout=duration_pb2.Duration(seconds=1))
    assert response.status.code == DEADLINE_EXCEEDED, response.status
    assert time.monotonic() - start < 3.5


def test_default_cap_is_the_store_quota(start_server, tmp_path: Path, allowed) -> None:
    """No max-size: a store with a 32K quota caps fetches at 32K, before the download."""
    config = tmp_path / "casbah.yaml"
    config.write_text(rf"""
instances:
  "":
    origin-fetch:
      allow: ['http://127\.0\.0\.1:{allowed.port}/ok/']
""")
    server = start_server(["--config", str(config), "--quota", "32K"])
    path = unique()
    allowed.files[path] = os.urandom(40 * 1024)
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        response = fetch_blob(channel, [allowed.url(path)])
    assert response.status.code == RESOURCE_EXHAUSTED, response.status
    assert f"size cap of {32 * 1024} bytes" in response.status.message


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="positive"):
        OriginFetchConfig.model_validate({"allow": ["x"], "max-size": 0})
    assert OriginFetchConfig.model_validate({"allow": ["x"], "max-size": "1G"}).max_size == 1 << 30
