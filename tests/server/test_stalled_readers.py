"""ByteStream readers that stop reading: bounded server memory per stream, and an end.

A reader that takes one message and then nothing fills its flow-control window; what
the server holds for it must stay near one storage chunk (it held ~5.7 MB: several
1 MiB messages in several copies each), and after `limits.idle-timeout` without
progress the call ends with DEADLINE_EXCEEDED, freeing it all.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path

import grpc
import yaml

from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

MiB = 1 << 20
READERS = 100
IDLE = 4.0
#: Per stalled reader: one 1 MiB storage chunk plus the copies of one 512 KiB message.
PER_READER = 2.5 * MiB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stalled_readers_hold_about_one_chunk_each_and_are_ended(start_server, tmp_path: Path) -> None:
    config = tmp_path / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "storages": {"mem": {"kind": "memory", "max-size": "256M"}},
        "instances": {"": {"storage": "mem"}},
        "limits": {"idle-timeout": IDLE},
    }))
    server = start_server(["--config", str(config)])
    data = os.urandom(20 * MiB)
    digest = hashlib.sha256(data).hexdigest()

    async def main() -> tuple[int, int, list[tuple[grpc.StatusCode, str]], float]:
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(server.address, options=options) as channel:
            name = f"uploads/{uuid.uuid4()}/blobs/{digest}/{len(data)}"

            async def requests():
                for i in range(0, len(data), MiB):
                    yield bs_pb2.WriteRequest(resource_name=name, write_offset=i, data=data[i:i + MiB],
                                              finish_write=i + MiB >= len(data))

            await bs_grpc.ByteStreamStub(channel).Write(requests(), timeout=30)
        before = rss(server.pid)
        # The readers' channels keep HTTP/2's fixed 64 KiB windows: with BDP probing on, a
        # loopback transport may grow its window until it has taken the whole blob, and a
        # reader that has buffered everything was never stalled on the server's side.
        fixed = [*options, ("grpc.http2.bdp_probe", 0)]
        channels = [grpc.aio.insecure_channel(server.address, options=fixed) for _ in range(10)]
        calls = []
        for i in range(READERS):
            call = bs_grpc.ByteStreamStub(channels[i % 10]).Read(
                bs_pb2.ReadRequest(resource_name=f"blobs/{digest}/{len(data)}"), timeout=60)
            first = len((await call.read()).data)  # one message, then nothing
            calls.append((call, first))
        started = time.monotonic()
        await asyncio.sleep(1.5)
        stalled = rss(server.pid)
        await asyncio.sleep(IDLE * 1.5)  # stalled past the idle timeout

        async def drain(call, first: int) -> tuple[grpc.StatusCode, str]:
            """What was buffered, then the status the server ended the stream with.  A
            stream may end OK only if the client's transport had taken the whole blob
            into its own buffers (HTTP/2 windows grow on loopback): then it was never
            stalled on the server's side."""
            received = 0
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    received += len(message.data)
                assert received == len(data) - first, received
                return grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as exc:
                assert received < len(data)
                return exc.code(), exc.details() or ""

        outcomes = await asyncio.gather(*(drain(call, first) for call, first in calls))
        ended = time.monotonic() - started
        for ch in channels:
            await ch.close()
        return before, stalled, outcomes, ended

    before, stalled, outcomes, ended = asyncio.run(main())
    growth = stalled - before
    assert growth < READERS * PER_READER, f"{growth / MiB:.0f} MiB for {READERS} stalled readers"
    ended_by_server = [d for code, d in outcomes if code != grpc.StatusCode.OK]
    assert {code for code, _ in outcomes} <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}, outcomes[:3]
    assert len(ended_by_server) >= READERS // 2, f"only {len(ended_by_server)} of {READERS} readers were stalled"
    assert all(f"the client took nothing for {IDLE:.0f}s; closing the stalled stream" in d for d in ended_by_server)
    assert ended >= IDLE * 0.8
    assert "Traceback" not in server.log()
