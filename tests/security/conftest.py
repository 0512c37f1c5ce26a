"""Fixtures of the security tests: a test PKI, and casbah servers that may listen on
TLS or unix sockets (see security_helpers.Casbah)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from security_helpers import Casbah, Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Casbah]]:
    """`launch(args, listeners=1)` -> a started `casbah serve ARGS`; stopped after the test."""
    servers: list[Casbah] = []

    def start(args: list[str], listeners: int = 1) -> Casbah:
        server = Casbah(args, tmp_path / f"casbah-{len(servers)}.log", listeners)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
