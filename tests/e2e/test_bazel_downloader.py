"""Bazel's `--experimental_remote_downloader` through casbah's origin fetch (issue 3).

Bazel 4.2 asks FetchBlob(uris=[url], checksum.sri=sha256-…) for every `http_file`, then reads the blob over
ByteStream.  casbah, with origin fetch allowed for the local HTTP server, downloads it, verifies the SRI,
indexes it, and serves it again later, when the origin is gone.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import yaml
from test_bazel import (  # noqa: F401  (bazel_user_root: a fixture)
    BAZEL,
    Bazel,
    assert_server_log_clean,
    bazel_user_root,
    write_stubs,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(BAZEL is None, reason="bazel is not installed")]


class Origin:
    """A real HTTP server on loopback serving one directory, stoppable mid-test."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.requests = 0
        original = handler.func.do_GET

        def counting(handler_self) -> None:
            self.requests += 1
            original(handler_self)

        handler.func.do_GET = counting
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_file_through_casbah_origin_fetch(tmp_path: Path, start_server, bazel_user_root: Path) -> None:  # noqa: F811
    payload = os.urandom(300_000)
    www = tmp_path / "www"
    www.mkdir()
    (www / "payload.bin").write_bytes(payload)
    origin = Origin(www)
    try:
        config = tmp_path / "casbah.yaml"
        config.write_text(yaml.safe_dump({"instances": {"": {"origin-fetch": {"allow": [r"http://127\.0\.0\.1:"]}}}}))
        server = start_server(args=["--config", str(config)])

        ws = tmp_path / "ws"
        ws.mkdir()
        sha = hashlib.sha256(payload).hexdigest()
        (ws / "WORKSPACE").write_text(
            'load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_file")\n'
            f'http_file(name = "payload", urls = ["http://127.0.0.1:{origin.port}/payload.bin"], '
            f'sha256 = "{sha}", downloaded_file_path = "payload.bin")\n'
        )
        (ws / "BUILD").write_text(
            'genrule(name = "copy", srcs = ["@payload//file"], outs = ["copy.bin"], cmd = "cp $< $@")\n'
        )
        bazel = Bazel(ws, bazel_user_root, write_stubs(tmp_path / "stubs"))
        downloader = f"--experimental_remote_downloader={server.url}"

        bazel.build(server.url, downloader, f"--repository_cache={tmp_path / 'repo-cache-1'}")
        assert (bazel.bin_dir / "copy.bin").read_bytes() == payload
        assert origin.requests >= 1, "casbah should have fetched the file from the origin"

        # The origin goes away; a fresh output base and repository cache must still get the file: from casbah.
        origin.stop()
        bazel.clean_expunge()
        bazel.build(server.url, downloader, f"--repository_cache={tmp_path / 'repo-cache-2'}")
        assert (bazel.bin_dir / "copy.bin").read_bytes() == payload
        assert_server_log_clean(server)
    finally:
        if origin.thread.is_alive():
            origin.stop()
