"""The startup warning for a server reachable from other machines without credentials."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from security_helpers import free_port, token_hash

from casbah.server.exposure import is_loopback

WRITE_WARNING = re.compile(r"WARNING casbah\.server: (\S+) is reachable from other machines and anonymous callers "
                           r"may WRITE instance\(s\) (.*?): anyone who can connect can poison")
READ_NOTE = re.compile(r"INFO casbah\.server: (\S+) is reachable from other machines and anonymous callers may "
                       r"read instance\(s\) (.*?) without credentials")


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("127.1.2.3:1", True), ("localhost:50051", True), ("LOCALHOST:1", True),
    ("[::1]:50051", True), ("ipv6:[::1]:1", True), ("[::ffff:127.0.0.1]:1", True), ("unix:/tmp/casbah.sock", True),
    ("unix-abstract:casbah", True),
    ("0.0.0.0:50051", False), ("[::]:50051", False), (":50051", False), ("10.0.0.5:50051", False),
    ("[2001:db8::1]:50051", False), ("cache.example.com:50051", False), ("127.0.0.1.nip.io:1", False),
    ("localhost.evil.example:1", False),
])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def serve(launch, tmp_path: Path, listen: str, auth: dict | None = None, instances: dict | None = None) -> str:
    """Start `casbah serve --listen LISTEN` with this auth section; its log once it serves."""
    config = tmp_path / f"casbah-{free_port()}.yaml"
    config.write_text(yaml.safe_dump({"auth": auth or {}, **({"instances": instances} if instances else {})}))
    server = launch(["--config", str(config), "--listen", listen, "--data-dir", str(tmp_path / "data")])
    log = server.log()
    server.stop()
    return log


def test_warning_when_the_network_may_write(launch, tmp_path: Path) -> None:
    """`--listen 0.0.0.0:PORT` with the defaults (no credentials, anonymous read-write):
    one WARNING line naming the address and the writable instances."""
    port = free_port()
    log = serve(launch, tmp_path, f"0.0.0.0:{port}")
    found = WRITE_WARNING.findall(log)
    assert found == [(f"0.0.0.0:{port}", "''")], log
    assert "docs/security.md" in log


def test_no_warning_on_loopback(launch, tmp_path: Path) -> None:
    log = serve(launch, tmp_path, f"127.0.0.1:{free_port()}")
    assert "reachable from other machines" not in log, log


def test_milder_note_when_the_network_may_only_read(launch, tmp_path: Path) -> None:
    """Tokens for writers, anonymous read-only: no WARNING, an INFO line about anonymous reads.
    A read-only instance cannot be written by anyone, so it never counts as writable."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token_hash('a-writer-token-0123456789')} write\n")
    log = serve(launch, tmp_path, f"0.0.0.0:{free_port()}", {"tokens": str(tokens), "anonymous": "read-only"})
    assert not WRITE_WARNING.search(log), log
    assert READ_NOTE.search(log), log

    log = serve(launch, tmp_path, f"0.0.0.0:{free_port()}", {},
                {"mirror": {"read-only": True}})
    assert not WRITE_WARNING.search(log), log
    assert READ_NOTE.search(log).group(2) == "'mirror'", log


def test_no_warning_when_credentials_are_required(launch, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token_hash('a-writer-token-0123456789')} write\n")
    log = serve(launch, tmp_path, f"0.0.0.0:{free_port()}", {"tokens": str(tokens)})
    assert "reachable from other machines" not in log, log
