"""Fixtures for the service tests: one server per test module, not per test.

Starting a `casbah serve` process costs about half a second; the service tests
make hundreds of calls against the same server, so each module shares one
(tests use fresh random blobs, so they do not see each other's data).  Tests
that need a server with special flags still use the per-test `start_server`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from server_test_helpers import OPTIONS


def _server_process_class(config: pytest.Config) -> type:
    """`ServerProcess` from tests/conftest.py, as pytest loaded it (conftests are not importable by name)."""
    wanted = Path(__file__).resolve().parent.parent / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if path and Path(path).resolve() == wanted:
            return plugin.ServerProcess
    raise AssertionError("tests/conftest.py was not loaded")


@pytest.fixture(scope="module")
def module_server_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        Callable]:
    """`factory(args=[...])` -> a ServerProcess that lives until the end of the module."""
    server_cls = _server_process_class(request.config)
    servers: list = []

    def start(args: list[str] | None = None, **kwargs):
        data_dir = tmp_path_factory.mktemp("casbah") / "data"
        server = server_cls(data_dir, args, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def mserver(module_server_factory):
    """The module's default server (instances '' and 'a/b/c', disk storage)."""
    return module_server_factory(["--instance", "a/b/c"])


@pytest.fixture(scope="module")
def mchannel(mserver) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(mserver.address, options=OPTIONS) as ch:
        yield ch
