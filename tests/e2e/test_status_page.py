"""End-to-end: the status page in a real headless browser.

Debian's Chromium (installed by `scripts/system-deps`), driven by Playwright for
Python against `casbah serve --metrics-listen`.  Playwright's own browser download
is never used: the test launches /usr/bin/chromium.  After real gRPC traffic
(uploads, FindMissingBlobs hits and misses, an ActionCache miss and hit, an asset
push), the page must show the uploaded object count in the instance table, draw
hit-rate points in its SVG chart, look a digest up through the lookup box, browse
a Directory's tree into a subdirectory, and map an asset URI to its content.  A
screenshot goes to the test's tmp_path for a person to look at.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from pathlib import Path

import grpc
import pytest

from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extras install it
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK) and shutil.which("chromium") is None,
                       reason="chromium is not installed (scripts/system-deps installs it)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e .[dev])"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def text(d: re_pb2.Digest) -> str:
    return f"{d.hash}/{d.size_bytes}"


def make_traffic(address: str) -> dict:
    """Real client calls; returns what the page should then show."""
    blobs = [os.urandom(100 + i * 37) for i in range(5)]
    main_c = b"int main() { return 0; }\n"
    lib = os.urandom(2048)
    src = re_pb2.Directory(files=[re_pb2.FileNode(name="lib.so", digest=sha(lib), is_executable=True)])
    src_bytes = src.SerializeToString(deterministic=True)
    # An empty file and an empty directory: both the empty blob, present without being stored.
    root = re_pb2.Directory(files=[re_pb2.FileNode(name="empty.txt", digest=sha(b"")),
                                   re_pb2.FileNode(name="main.c", digest=sha(main_c))],
                            directories=[re_pb2.DirectoryNode(name="empty", digest=sha(b"")),
                                         re_pb2.DirectoryNode(name="src", digest=sha(src_bytes))])
    root_bytes = root.SerializeToString(deterministic=True)
    stored = [*blobs, main_c, lib, src_bytes, root_bytes]
    metadata = (("build.bazel.remote.execution.v2.requestmetadata-bin", re_pb2.RequestMetadata(
        tool_details=re_pb2.ToolDetails(tool_name="bazel", tool_version="7.4.1"),
        tool_invocation_id="e2e-invocation", action_id="e2e-action").SerializeToString()),)
    uri = f"https://example.com/archive-{uuid.uuid4().hex[:8]}.tar.gz"
    with grpc.insecure_channel(address) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=sha(b), data=b) for b in stored]), metadata=metadata)
        absent = [sha(os.urandom(10)) for _ in range(3)]
        # 9 present + 3 absent digests: 9 hits and 3 misses.
        found = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[sha(b) for b in stored] + absent), metadata=metadata)
        assert len(found.missing_blob_digests) == 3
        ac = re_grpc.ActionCacheStub(channel)
        action = sha(os.urandom(16))
        with pytest.raises(grpc.RpcError):
            ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), metadata=metadata)
        ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(action_digest=action, action_result=re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="bin/app", digest=sha(blobs[0]))])), metadata=metadata)
        ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), metadata=metadata)
        ra_grpc.PushStub(channel).PushDirectory(ra_pb2.PushDirectoryRequest(
            uris=[uri], root_directory_digest=sha(root_bytes)), metadata=metadata)
    return {"objects": len(stored), "blob": blobs[2], "root": sha(root_bytes), "uri": uri}


def test_status_page_in_headless_chromium(start_server, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(["--metrics-listen", f"127.0.0.1:{port}"])
    shown = make_traffic(server.address)
    blob = shown["blob"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("body[data-loaded='1']", timeout=15_000)

            # The instance table: the real object count and hit rates from the traffic.
            row = page.locator("#instances tbody tr[data-instance='']")
            assert int(row.locator("td.objects").get_attribute("data-value")) == shown["objects"]
            assert row.locator("td.objects").inner_text() == str(shown["objects"])
            assert int(row.locator("td.bytes").get_attribute("data-value")) > 0
            cas_rate = row.locator("td.rate-cas")
            assert (cas_rate.get_attribute("data-hits"), cas_rate.get_attribute("data-misses")) == ("9", "3")
            assert cas_rate.inner_text() == "75.0 %"
            assert row.locator("td.rate-action_cache").inner_text() == "50.0 %"

            # The chart: one point per cache with traffic this minute, at the right height.
            chart = page.locator("#hit-chart")
            assert int(chart.get_attribute("data-points")) >= 2
            assert chart.locator("path.series-cas").count() == 1
            assert float(chart.locator("circle.point-cas").last.get_attribute("data-rate")) == pytest.approx(0.75)
            assert chart.locator("circle.point-action_cache").count() >= 1
            # A young server's chart spans its uptime (a minute or two), over the full width,
            # and the legend names every series drawn, the grey lookup volume included.
            assert 1 <= int(chart.get_attribute("data-minutes")) <= 3
            box = chart.bounding_box()
            assert box is not None and box["width"] > 1000
            cx = float(chart.locator("circle.point-cas").first.get_attribute("cx"))
            assert cx < box["width"] * 0.8, "the first point must not be squeezed against the right edge"
            legend = page.locator("#chart-legend span")
            assert sorted(legend.evaluate_all("els => els.map(e => e.dataset.series)")) == \
                ["action_cache", "asset", "cas", "volume"]

            # Storage graph and recent invocations.
            expect(page.locator("#storage .node[data-node='storages.default']")).to_contain_text(
                f"{shown['objects']} objects")
            expect(page.locator("#invocations")).to_contain_text("e2e-invocation")

            # The lookup box: a blob is present, with its size.
            page.fill("#lookup-digest", text(sha(blob)))
            page.click("#lookup-button")
            expect(page.locator("#lookup-state")).to_have_text("present")
            assert int(page.locator("#lookup-size").get_attribute("data-value")) == len(blob)
            page.fill("#lookup-digest", text(sha(b"never uploaded")))
            page.click("#lookup-button")
            expect(page.locator("#lookup-state")).to_have_text("missing")

            # A Directory: its entries, then a click into the subdirectory.
            page.fill("#lookup-digest", text(shown["root"]))
            page.click("#lookup-button")
            listing = page.locator("#directory-listing")
            expect(listing).to_contain_text("main.c")
            expect(listing).to_contain_text("empty.txt")
            assert listing.locator(".badge.missing").count() == 0, "the empty blob and Directory are present"
            expect(listing.locator("tr.dir-entry a").last).to_have_text("src/")
            listing.locator("tr.dir-entry a").last.click()
            expect(page.locator("#directory-listing tr.file-entry")).to_contain_text("lib.so")
            expect(page.locator(".breadcrumbs")).to_contain_text("src")

            # The asset box: the URI maps to the pushed directory.
            page.fill("#asset-uri", shown["uri"])
            page.click("#asset-button")
            expect(page.locator("#asset-table")).to_contain_text(text(shown["root"]))
            expect(page.locator("#asset-table")).to_contain_text("directory")

            page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "status-page.png").stat().st_size > 10_000
