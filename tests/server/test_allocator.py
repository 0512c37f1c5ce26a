"""The server's allocator settings (`casbah/server/allocator.py`): MiB-sized buffers,
allocated and freed one after another as a ByteStream upload does, are reused instead
of being faulted in afresh each time.  Measured in a fresh interpreter, with and
without the settings, by its minor page faults."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import queue, resource, sys, threading
from casbah.server import allocator
tuned = allocator.tune() if sys.argv[1] == "tune" else False
data = bytearray(1 << 20)

def upload(blocks):
    # Made in one thread, freed in another, up to 8 in flight: a session's queue.
    pending = queue.Queue(8)
    def store():
        while pending.get() is not None:
            pass
    thread = threading.Thread(target=store)
    thread.start()
    for _ in range(blocks):
        pending.put(bytes(data))  # a fresh 1 MiB object, as a parsed WriteRequest's data is
    pending.put(None)
    thread.join()

upload(16)  # warm up: the heaps grow to their working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
upload(64)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_mib_buffers_are_reused_not_faulted_in() -> None:
    tuned, with_settings = faults("tune")
    _, without = faults("plain")
    assert tuned
    assert without >= 64 * 16, f"glibc's defaults fault each 1 MiB block in ({without} faults): the probe is wrong"
    assert with_settings < 64 * 8, f"{with_settings} minor faults for 64 MiB-sized blocks: not reused"
