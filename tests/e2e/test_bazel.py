"""End-to-end: the real Bazel (Debian's `bazel-bootstrap`, 4.2.x) against `casbah serve`.

Each test builds a small generated workspace with `--remote_cache=grpc://…` on a cold
casbah (every action runs locally and is uploaded), wipes Bazel's state with
`bazel clean --expunge`, and builds again: every action that runs must then be a
remote cache hit, and the outputs must be byte-identical to the first build's.  This is
the acceptance test of the remote cache as Bazel uses it: GetCapabilities,
GetActionResult, FindMissingBlobs, ByteStream.Write in 16 KiB chunks (including a
> 1 MiB output), ByteStream.Read, UpdateActionResult, the empty blob, and instance names.

Offline: Debian's bootstrap build of Bazel has no embedded distdir, so the implicit
`@rules_cc`, `@rules_java` and `@rules_proto` repositories that `@bazel_tools` loads
would be downloaded.  The tests point them (`--override_repository`) at stubs that
re-export the native rules (all Bazel 4.2 has anyway), so no network is needed.  The
C++ toolchain (`@local_config_cc`) autoconfigures locally; the cc_binary target is
built only when gcc is installed.

Every Bazel call runs with `--batch`, so no Bazel server outlives a test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from casbah.protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

BAZEL = shutil.which("bazel")
HAVE_GCC = shutil.which("gcc") is not None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BAZEL is None, reason="bazel is not installed (scripts/system-deps installs bazel-bootstrap)"),
]

#: Debian's bazel-bootstrap ships an unpacked install base and sets these startup options in
#: /etc/bazel/bazelrc, which `--nosystem_rc` skips; the binary cannot extract itself.
DEBIAN_INSTALL_BASE = Path("/usr/share/bazel")

#: Outputs of the generated workspace, relative to bazel-bin, with the action count below.
GENRULE_OUTPUTS = ["greeting.txt", "empty.txt", "big.txt", "pair/a.bin", "pair/b.txt", "summary.txt"]
GENRULE_ACTIONS = 5
#: cc_binary: one compile and one link action.
CC_OUTPUTS = ["hello"] if HAVE_GCC else []
CC_ACTIONS = 2 if HAVE_GCC else 0
OUTPUTS = GENRULE_OUTPUTS + CC_OUTPUTS
SPAWN_ACTIONS = GENRULE_ACTIONS + CC_ACTIONS
HELLO_TEXT = "hello from a remotely cached binary"

BUILD_GENRULES = r'''
genrule(name = "greeting", outs = ["greeting.txt"], cmd = "echo 'hello from casbah e2e' > $@")

# The empty blob: never uploaded by Bazel, always present in CAS.
genrule(name = "empty", outs = ["empty.txt"], cmd = "touch $@")

# 2,888,895 bytes: several ByteStream chunks, and not a multiple of 16 KiB or 1 MiB.
genrule(name = "big", outs = ["big.txt"], cmd = "seq 1 400000 > $@")

# Two outputs from one action, in a subdirectory, one of them binary.
genrule(
    name = "pair",
    outs = ["pair/a.bin", "pair/b.txt"],
    cmd = "printf '\\000\\001\\377casbah' > $(location pair/a.bin); echo b > $(location pair/b.txt)",
)

# Depends on three other rules' outputs.
genrule(
    name = "summary",
    srcs = [":greeting", ":big", ":empty"],
    outs = ["summary.txt"],
    cmd = "cat $(location :greeting) > $@; wc -c < $(location :big) >> $@; " +
          "sha256sum $(location :big) | cut -c1-64 >> $@; wc -c < $(location :empty) >> $@",
)
'''

BUILD_CC = 'cc_binary(name = "hello", srcs = ["hello.c"])\n'
HELLO_C = f'#include <stdio.h>\nint main(void) {{ puts("{HELLO_TEXT}"); return 0; }}\n'

STUBS = {
    "rules_cc/cc/defs.bzl": [
        "cc_binary", "cc_import", "cc_library", "cc_proto_library", "cc_test", "cc_toolchain",
        "cc_toolchain_suite", "fdo_prefetch_hints", "fdo_profile", "objc_import", "objc_library",
    ],
    "rules_java/java/defs.bzl": [
        "java_binary", "java_import", "java_library", "java_lite_proto_library", "java_package_configuration",
        "java_plugin", "java_proto_library", "java_runtime", "java_test", "java_toolchain",
    ],
    "rules_proto/proto/defs.bzl": ["proto_lang_toolchain", "proto_library"],
}

#: "INFO: 10 processes: 6 remote cache hit, 4 internal." / "INFO: 1 process: 1 internal." / "INFO: 0 processes."
SUMMARY_RE = re.compile(r"^INFO: (\d+) process(?:es)?(?:: (.*))?\.$", re.MULTILINE)


def write_stubs(root: Path) -> list[str]:
    """Offline stand-ins for the rule repositories @bazel_tools loads; returns the override flags."""
    flags = []
    for rel, names in STUBS.items():
        path = root / rel
        repo = path.parent.parent
        path.parent.mkdir(parents=True, exist_ok=True)
        (repo / "WORKSPACE").write_text("")
        (repo / "BUILD").write_text("")
        (path.parent / "BUILD").write_text("")
        path.write_text('"""Offline stub: the native rules."""\n' + "".join(f"{n} = native.{n}\n" for n in names))
        flags.append(f"--override_repository={repo.name}={repo}")
    return flags


def write_workspace(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "WORKSPACE").write_text("")
    (root / "BUILD").write_text(BUILD_GENRULES + (BUILD_CC if HAVE_GCC else ""))
    if HAVE_GCC:
        (root / "hello.c").write_text(HELLO_C)
    return root


def parse_summary(output: str) -> dict[str, int]:
    """Bazel's process summary as {"remote cache hit": 6, "internal": 4, "linux-sandbox": ...}."""
    matches = SUMMARY_RE.findall(output)
    assert matches, f"no process summary in Bazel's output:\n{output}"
    total, detail = matches[-1]
    counts: dict[str, int] = {}
    for part in filter(None, (detail or "").split(", ")):
        number, kind = part.split(" ", 1)
        counts[kind] = counts.get(kind, 0) + int(number)
    assert sum(counts.values()) == int(total), output
    return counts


def summary_line(output: str) -> str:
    return next(line for line in reversed(output.splitlines()) if SUMMARY_RE.match(line))


def executed_locally(counts: dict[str, int]) -> int:
    return sum(n for kind, n in counts.items() if kind not in ("internal", "remote cache hit"))


def hash_outputs(bin_dir: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((bin_dir / rel).read_bytes()).hexdigest() for rel in OUTPUTS}


@dataclass
class Bazel:
    """One workspace and output base, driven in `--batch` mode."""

    workspace: Path
    output_user_root: Path
    overrides: list[str]

    def startup(self) -> list[str]:
        flags = ["--nosystem_rc", "--nohome_rc", "--noworkspace_rc", "--batch",
                 f"--output_user_root={self.output_user_root}"]
        if (DEBIAN_INSTALL_BASE / "A-server.jar").exists():
            flags += [f"--install_base={DEBIAN_INSTALL_BASE}", "--trust_install_base"]
        return flags

    def run(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        assert BAZEL is not None
        argv = [BAZEL, *self.startup(), command, *args]
        proc = subprocess.run(argv, cwd=self.workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
        if check:
            assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}"
        return proc

    def build(self, remote_cache: str, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = self.run(
            "build", "//...", f"--remote_cache={remote_cache}", "--color=no", "--curses=no",
            "--jobs=4", "--local_cpu_resources=2", "--incompatible_strict_action_env", *self.overrides, *flags,
            check=check,
        )
        if check:
            # Bazel degrades remote cache failures to warnings and carries on locally: catch them here.
            complaints = [line for line in proc.stdout.splitlines()
                          if line.startswith(("WARNING:", "ERROR:")) and "remote" in line.lower()]
            assert not complaints, f"Bazel reported remote cache problems:\n{proc.stdout}"
        return proc

    def clean_expunge(self) -> None:
        self.run("clean", "--expunge")
        assert not (self.workspace / "bazel-bin").exists()

    @property
    def bin_dir(self) -> Path:
        return self.workspace / "bazel-bin"


@pytest.fixture(scope="session")
def bazel_user_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the tests (install base extraction, if any, happens once); output bases are per workspace."""
    return tmp_path_factory.mktemp("bazel-root")


@pytest.fixture
def bazel(tmp_path: Path, bazel_user_root: Path) -> Bazel:
    return Bazel(write_workspace(tmp_path / "ws"), bazel_user_root, write_stubs(tmp_path / "stubs"))


def assert_server_log_clean(server) -> None:
    """No RPC handler crashed (INTERNAL) or logged an error while Bazel used the server."""
    text = server.log_path.read_text(errors="replace")
    bad = [line for line in text.splitlines()
           if " ERROR " in line or "Traceback" in line or "failed unexpectedly" in line]
    assert not bad, f"casbah logged errors:\n{text[-5000:]}"


def cold_build(bazel: Bazel, url: str, *flags: str) -> subprocess.CompletedProcess:
    """The first build against an empty casbah: every action runs locally (and is uploaded)."""
    proc = bazel.build(url, *flags)
    counts = parse_summary(proc.stdout)
    print("cold:", summary_line(proc.stdout))
    assert counts.get("remote cache hit", 0) == 0, proc.stdout
    assert executed_locally(counts) == SPAWN_ACTIONS, proc.stdout
    return proc


def warm_build(bazel: Bazel, url: str, *flags: str) -> subprocess.CompletedProcess:
    """After `clean --expunge`: every action must be answered from casbah's ActionCache."""
    proc = bazel.build(url, *flags)
    counts = parse_summary(proc.stdout)
    print("warm:", summary_line(proc.stdout))
    assert executed_locally(counts) == 0, f"actions ran locally instead of hitting the cache:\n{proc.stdout}"
    assert counts.get("remote cache hit") == SPAWN_ACTIONS, proc.stdout
    return proc


def check_outputs_identical(bazel: Bazel, reference: dict[str, str]) -> None:
    assert hash_outputs(bazel.bin_dir) == reference
    assert (bazel.bin_dir / "empty.txt").stat().st_size == 0
    assert (bazel.bin_dir / "big.txt").stat().st_size > 1 << 20
    if HAVE_GCC:
        # The binary came back from CAS with its executable bit (OutputFile.is_executable) and still runs.
        hello = bazel.bin_dir / "hello"
        assert os.access(hello, os.X_OK)
        assert subprocess.run([hello], capture_output=True, text=True, check=True).stdout.strip() == HELLO_TEXT


def test_bazel_remote_cache_round_trip(bazel: Bazel, start_server) -> None:
    """Cold build uploads everything; after `clean --expunge` every action is a hit with identical outputs."""
    server = start_server()
    cold_build(bazel, server.url)
    reference = hash_outputs(bazel.bin_dir)
    bazel.clean_expunge()
    warm_build(bazel, server.url)
    check_outputs_identical(bazel, reference)
    assert_server_log_clean(server)


def test_bazel_named_instance(bazel: Bazel, start_server) -> None:
    """`--remote_instance_name` with a multi-segment name served via `--instance`; unknown names are refused."""
    server = start_server(["--instance", "ci/bazel"])
    flags = ("--remote_instance_name=ci/bazel",)
    cold_build(bazel, server.url, *flags)
    reference = hash_outputs(bazel.bin_dir)
    bazel.clean_expunge()
    warm_build(bazel, server.url, *flags)
    check_outputs_identical(bazel, reference)

    # The name really reaches casbah and is checked: a name the server does not serve fails the build.
    proc = bazel.build(server.url, "--remote_instance_name=ci/other", check=False)
    assert proc.returncode != 0, proc.stdout
    assert "INVALID_ARGUMENT" in proc.stdout and "unknown instance name 'ci/other'" in proc.stdout, proc.stdout
    assert_server_log_clean(server)


def test_bazel_remote_download_minimal(bazel: Bazel, start_server, tmp_path: Path) -> None:
    """`--remote_download_minimal` hits download nothing, yet CAS serves every output Bazel was told about."""
    server = start_server()
    minimal = "--remote_download_minimal"
    cold_build(bazel, server.url, minimal)
    reference = hash_outputs(bazel.bin_dir)  # executed locally, so present despite minimal
    bazel.clean_expunge()

    bep = tmp_path / "bep.json"
    warm_build(bazel, server.url, minimal, f"--build_event_json_file={bep}")
    # Minimal really was in effect: the hits left the outputs in CAS only.
    assert not any((bazel.bin_dir / rel).exists() for rel in OUTPUTS)

    # The build event stream names each output by its digest in casbah (bytestream://ADDR/blobs/HASH/SIZE):
    # fetch each with ByteStream.Read and compare with what the cold build produced.
    uris: dict[str, str] = {}
    for line in bep.read_text().splitlines():
        event = json.loads(line)
        for f in event.get("namedSetOfFiles", {}).get("files", []):
            path = "/".join([*f.get("pathPrefix", []), f["name"]])
            prefix = "bazel-out/k8-fastbuild/bin/"
            if path.startswith(prefix) and "uri" in f:
                uris[path.removeprefix(prefix)] = f["uri"]
    assert sorted(uris) == sorted(OUTPUTS)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = bytestream_pb2_grpc.ByteStreamStub(channel)
        for rel, uri in uris.items():
            assert uri.startswith(f"bytestream://{server.address}/blobs/"), uri
            resource = uri.removeprefix(f"bytestream://{server.address}/")
            data = b"".join(r.data for r in stub.Read(bytestream_pb2.ReadRequest(resource_name=resource)))
            assert hashlib.sha256(data).hexdigest() == reference[rel], rel
            assert resource.split("/")[1:] == [reference[rel], str(len(data))]

    # And Bazel itself can fetch them later: a build that wants all outputs downloads them, executing nothing.
    proc = bazel.build(server.url, "--remote_download_outputs=all")
    print("download all:", summary_line(proc.stdout))
    assert executed_locally(parse_summary(proc.stdout)) == 0, proc.stdout
    check_outputs_identical(bazel, reference)
    assert_server_log_clean(server)
