"""What a default `casbah serve` loads before it answers (issue 13: the port answers within 2 s).

Startup time is mostly imports; aiohttp (the HTTP front, /metrics, the status page)
and cryptography (mTLS names) are a fifth of it and serve nothing unless configured.
The server here is the real command line (`casbah.cli.main`, what `python -m casbah`
runs) in a child process that records `sys.modules` when it exits after SIGTERM, so
every import on the serve path up to shutdown counts, not only `casbah.server.app`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from server_test_helpers import caps

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

ROOT = Path(__file__).resolve().parent.parent.parent

#: `python -m casbah` with an exit hook that writes the top-level packages loaded to argv[1].
PROBE = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted({m.split(".")[0] for m in sys.modules}))))
from casbah.cli import main
main()
"""


def loaded_while_serving(tmp_path: Path, args: list[str]) -> set[str]:
    """The top-level modules a server started with `args` had loaded once it answered and stopped."""
    modules = tmp_path / "modules.json"
    command = [sys.executable, "-c", PROBE, str(modules), "serve", "--listen", "127.0.0.1:0",
               "--data-dir", str(tmp_path / "data"), *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the port, resolved, is on the "serving REAPI" line
            if match := re.search(r"serving REAPI on grpc://(\S+)", line):
                break
        else:
            raise AssertionError(f"casbah exited with {proc.wait()} before serving")
        with grpc.insecure_channel(match.group(1)) as channel:
            assert caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=10).cache_capabilities
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    return set(json.loads(modules.read_text()))


def test_default_serve_imports_no_aiohttp_and_no_cryptography(tmp_path: Path) -> None:
    loaded = loaded_while_serving(tmp_path, [])
    assert "casbah" in loaded and "grpc" in loaded  # the probe saw a real server
    assert "aiohttp" not in loaded
    assert "cryptography" not in loaded


@pytest.mark.parametrize("flag", ["--metrics-listen", "--http-listen"])
def test_the_http_side_loads_aiohttp_when_configured(tmp_path: Path, flag: str) -> None:
    """The counterpart: the probe does see aiohttp when a listener needs it."""
    assert "aiohttp" in loaded_while_serving(tmp_path, [flag, "127.0.0.1:0"])
