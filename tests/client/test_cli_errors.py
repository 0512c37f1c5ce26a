"""Every expected failure of the `casbah` command is one line on stderr and a non-zero exit.

Each test runs the real command as its own process (as a user would) and checks the
exit status, that the single `Error:` line names the thing at fault, and that no
traceback (nor grpc's raw `E… add_port.cc` log lines) reaches the user.  The manifest
row is checked at the loader (what `fetch-all` calls first).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from client_helpers import CliResult, cli_process

from casbah.cli.source import load_manifest

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/5"


def failed(*args: str, expect: int = 1, timeout: float = 60) -> CliResult:
    """Run casbah, expect it to fail cleanly, return the result (one Error: line on stderr)."""
    out = cli_process(*args, expect=expect, timeout=timeout)
    assert "Traceback" not in out.stderr, out
    assert "add_port.cc" not in out.stderr and "E1" not in out.stderr.split("Error:")[0], out
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    return out


def error_line(out: CliResult) -> str:
    return next(line for line in out.stderr.splitlines() if line.startswith("Error:"))


def serve(tmp_path: Path, *args: str, expect: int = 1) -> str:
    out = failed("serve", "--data-dir", str(tmp_path / "data"), *args, expect=expect)
    return error_line(out)


def test_remote_with_a_port_that_is_not_a_number() -> None:
    line = error_line(failed("cas", "missing", "--remote", "grpc://127.0.0.1:notaport", DIGEST))
    assert "grpc://127.0.0.1:notaport" in line and "port" in line


def test_remote_without_a_port_is_refused() -> None:
    line = error_line(failed("cas", "missing", "--remote", "grpc://127.0.0.1", DIGEST))
    assert "'grpc://127.0.0.1' needs a port" in line


def test_unreachable_server() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = error_line(failed("cas", "missing", "--remote", f"grpc://127.0.0.1:{port}", DIGEST))
    assert f"127.0.0.1:{port}" in line and "UNAVAILABLE" in line


def test_listen_without_a_port(tmp_path: Path) -> None:
    line = serve(tmp_path, "--listen", "127.0.0.1", expect=2)
    assert "'127.0.0.1' needs a port" in line and "--listen" in line
    assert not (tmp_path / "data").exists()


def test_listen_on_an_address_of_another_machine(tmp_path: Path) -> None:
    line = serve(tmp_path, "--listen", "192.0.2.1:50051")  # TEST-NET-1: never local
    assert "192.0.2.1:50051" in line and "cannot assign requested address" in line


def test_listen_on_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = serve(tmp_path, "--listen", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in line and "already in use" in line


@pytest.mark.parametrize("content, expected", [
    (b"garbage\n", "is not a PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n", "bad TLS certificate"),
])
def test_garbage_tls_certificate(tmp_path: Path, content: bytes, expected: str) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(content)
    key = tmp_path / "key.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n")
    line = serve(tmp_path, "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    assert expected in line and str(cert) in line


def test_malformed_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tok.txt"
    tokens.write_text("not-a-token write\n")
    line = serve(tmp_path, "--listen", "127.0.0.1:0", "--tokens", str(tokens))
    assert f"{tokens}:1:" in line and "sha256:<64 hex>" in line


def test_config_whose_disk_path_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    config = tmp_path / "casbah.yaml"
    config.write_text(f"storages:\n  default: {{kind: disk, path: {a_file}}}\n")
    line = serve(tmp_path, "--listen", "127.0.0.1:0", "--config", str(config))
    assert str(a_file) in line


def test_data_dir_without_write_permission(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root may write anywhere a mode allows: use a file system that refuses
        data = Path("/sys/casbah-data")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        data = locked / "data"
    out = failed("serve", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    line = error_line(out)
    assert str(data) in line and ("Permission denied" in line or "not permitted" in line)


def test_bad_config_key_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "casbah.yaml"
    config.write_text("listen: ['127.0.0.1']\nbogus: 1\n")
    line = serve(tmp_path, "--config", str(config))
    assert str(config) in line and "needs a port" in line and "bogus" in line


def test_scrub_of_a_missing_data_dir_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    line = error_line(failed("admin", "scrub", "--data-dir", str(typo)))
    assert f"--data-dir {typo}: no such directory" in line
    assert not typo.exists()


def test_unknown_option_is_one_line() -> None:
    line = error_line(failed("cas", "missing", "--bogus", expect=2))
    assert "--bogus" in line and "--help" in line


def test_debug_shows_the_traceback() -> None:
    out = cli_process("--debug", "cas", "missing", "--remote", "grpc://127.0.0.1", DIGEST, expect=1)
    assert "Traceback" in out.stderr and "needs a port" in out.stderr


def test_manifest_accepts_yaml_booleans(tmp_path: Path) -> None:
    """The README's manifest with `on`/`off` unquoted: YAML reads booleans, the loader takes the words."""
    manifest = tmp_path / "sources.yaml"
    manifest.write_text("remotes:\n  - url: grpc://127.0.0.1:50051\n    asset-fetch: off\n    asset-push: on\n"
                        "sources:\n  - kind: local\n    url: /tmp\n")
    remote = load_manifest(manifest).remotes[0]
    assert (remote.asset_fetch, remote.asset_push) == ("off", "on")


def test_broken_pipe_is_quiet(server, tmp_path: Path) -> None:
    """`casbah cas tree … | head`: the reader goes away; casbah stops without a word."""
    tree = tmp_path / "wide"
    tree.mkdir()
    for i in range(3000):  # ~200 KB of listing: more than a pipe buffer
        (tree / f"file-{i:05d}").write_text("same")
    root = cli_process("cas", "upload", "--remote", server.url, str(tree)).stdout.split()[0]
    proc = subprocess.Popen([sys.executable, "-m", "casbah", "cas", "tree", "--remote", server.url, root],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert stderr == ""


def test_missing_json_and_request_metadata(start_server, tmp_path: Path) -> None:
    """`cas missing --json` is parseable, and the server's status API names casbah as the tool."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    server = start_server(["--metrics-listen", f"127.0.0.1:{http_port}"])
    blob = tmp_path / "blob"
    blob.write_text("present")
    present = cli_process("cas", "upload", "--remote", server.url, str(blob)).stdout.split()[0]
    out = cli_process("cas", "missing", "--json", "--remote", server.url, present, DIGEST, expect=1)
    assert json.loads(out.stdout) == {"missing": [DIGEST], "present": [present]}
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/requests", timeout=10) as response:
        data = json.load(response)
    tools = {r.get("tool") for r in data["recent"]}
    assert "casbah" in tools, data["recent"][:3]
    assert "quota 20 GiB" in server.log()
