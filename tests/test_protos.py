"""Checks for the generated protobuf modules under casbah/protos."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS_DIR = ROOT / "casbah" / "protos"
GENERATOR = ROOT / "scripts" / "genprotos"

MODULES = [
    "casbah.protos.build.bazel.semver.semver_pb2",
    "casbah.protos.build.bazel.remote.execution.v2.remote_execution_pb2",
    "casbah.protos.build.bazel.remote.execution.v2.remote_execution_pb2_grpc",
    "casbah.protos.build.bazel.remote.asset.v1.remote_asset_pb2",
    "casbah.protos.build.bazel.remote.asset.v1.remote_asset_pb2_grpc",
    "casbah.protos.google.bytestream.bytestream_pb2",
    "casbah.protos.google.bytestream.bytestream_pb2_grpc",
    "casbah.protos.buildstream.v2.buildstream_pb2",
    "casbah.protos.buildstream.v2.buildstream_pb2_grpc",
    "casbah.protos.casbah.admin.v1.admin_pb2",
    "casbah.protos.casbah.admin.v1.admin_pb2_grpc",
]


def _generated_files(base: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(base.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(base).as_posix()
        if rel == "__init__.py":  # hand-written package docstring, not generated
            continue
        files[rel] = path.read_bytes()
    return files


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "protos"
    subprocess.run([str(GENERATOR), str(out)], cwd=ROOT, check=True)
    fresh = _generated_files(out)
    committed = _generated_files(PROTOS_DIR)
    assert fresh, "generator produced no files"
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    stale = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    hint = "re-run ./scripts/genprotos"
    assert not missing, f"generated files not committed ({hint}): {missing}"
    assert not extra, f"committed files the generator no longer produces ({hint}): {extra}"
    assert not stale, f"committed generated files are stale ({hint}): {stale}"


@pytest.mark.parametrize("name", MODULES)
def test_modules_import(name: str) -> None:
    importlib.import_module(name)


def _numbers(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_reapi_field_numbers() -> None:
    from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re

    assert _numbers(re.Digest) == {"hash": 1, "size_bytes": 2}
    assert _numbers(re.FindMissingBlobsRequest) == {
        "instance_name": 1,
        "blob_digests": 2,
        "digest_function": 3,
    }
    assert _numbers(re.FindMissingBlobsResponse) == {"missing_blob_digests": 2}
    assert _numbers(re.BatchUpdateBlobsRequest)["digest_function"] == 5
    assert _numbers(re.BatchUpdateBlobsRequest.Request) == {"digest": 1, "data": 2, "compressor": 3}
    assert _numbers(re.BatchReadBlobsRequest) == {
        "instance_name": 1,
        "digests": 2,
        "acceptable_compressors": 3,
        "digest_function": 4,
    }
    assert _numbers(re.BatchReadBlobsResponse.Response) == {
        "digest": 1,
        "data": 2,
        "status": 3,
        "compressor": 4,
    }
    assert _numbers(re.GetTreeRequest)["digest_function"] == 5
    assert _numbers(re.GetActionResultRequest)["digest_function"] == 6
    assert _numbers(re.UpdateActionResultRequest)["digest_function"] == 5
    assert _numbers(re.ExecuteRequest)["digest_function"] == 9
    assert _numbers(re.ServerCapabilities) == {
        "cache_capabilities": 1,
        "execution_capabilities": 2,
        "deprecated_api_version": 3,
        "low_api_version": 4,
        "high_api_version": 5,
    }
    assert _numbers(re.CacheCapabilities) == {
        "digest_functions": 1,
        "action_cache_update_capabilities": 2,
        "cache_priority_capabilities": 3,
        "max_batch_total_size_bytes": 4,
        "symlink_absolute_path_strategy": 5,
        "supported_compressors": 6,
        "supported_batch_update_compressors": 7,
        "max_cas_blob_size_bytes": 8,
        "split_blob_support": 9,
        "splice_blob_support": 10,
        "fast_cdc_2020_params": 11,
        "rep_max_cdc_params": 12,
    }
    assert _numbers(re.FastCdc2020Params) == {"avg_chunk_size_bytes": 1, "seed": 2}
    assert _numbers(re.RepMaxCdcParams) == {"min_chunk_size_bytes": 1, "horizon_size_bytes": 2}
    assert _numbers(re.SplitBlobRequest) == {
        "instance_name": 1,
        "blob_digest": 2,
        "digest_function": 3,
        "chunking_function": 4,
    }
    assert _numbers(re.SplitBlobResponse) == {"chunk_digests": 1, "chunking_function": 2}
    assert _numbers(re.SpliceBlobRequest) == {
        "instance_name": 1,
        "blob_digest": 2,
        "chunk_digests": 3,
        "digest_function": 4,
        "chunking_function": 5,
    }
    assert _numbers(re.SpliceBlobResponse) == {"blob_digest": 1}
    actionresult = _numbers(re.ActionResult)
    assert actionresult["output_files"] == 2
    assert actionresult["output_directories"] == 3
    assert actionresult["output_symlinks"] == 12
    assert actionresult["execution_metadata"] == 9
    assert _numbers(re.ExecutedActionMetadata)["virtual_execution_duration"] == 12
    assert _numbers(re.OutputDirectory) == {
        "path": 1,
        "tree_digest": 3,
        "is_topologically_sorted": 4,
        "root_directory_digest": 5,
    }
    assert _numbers(re.FileNode) == {"name": 1, "digest": 2, "is_executable": 4, "node_properties": 6}
    assert _numbers(re.Command)["output_directory_format"] == 9


def test_reapi_enums() -> None:
    from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re

    assert dict(re.DigestFunction.Value.items()) == {
        "UNKNOWN": 0,
        "SHA256": 1,
        "SHA1": 2,
        "MD5": 3,
        "VSO": 4,
        "SHA384": 5,
        "SHA512": 6,
        "MURMUR3": 7,
        "SHA256TREE": 8,
        "BLAKE3": 9,
        "GITSHA1": 10,
    }
    assert dict(re.ChunkingFunction.Value.items()) == {"UNKNOWN": 0, "FAST_CDC_2020": 1, "REP_MAX_CDC": 2}
    assert dict(re.Compressor.Value.items()) == {"IDENTITY": 0, "ZSTD": 1, "DEFLATE": 2, "BROTLI": 3}
    assert dict(re.ExecutionStage.Value.items()) == {
        "UNKNOWN": 0,
        "CACHE_CHECK": 1,
        "QUEUED": 2,
        "EXECUTING": 3,
        "COMPLETED": 4,
    }


def test_other_field_numbers() -> None:
    from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra
    from casbah.protos.build.bazel.semver import semver_pb2
    from casbah.protos.buildstream.v2 import buildstream_pb2 as bs
    from casbah.protos.google.bytestream import bytestream_pb2 as bst

    assert _numbers(semver_pb2.SemVer) == {"major": 1, "minor": 2, "patch": 3, "prerelease": 4}
    assert _numbers(ra.FetchBlobRequest) == {
        "instance_name": 1,
        "timeout": 2,
        "oldest_content_accepted": 3,
        "uris": 4,
        "qualifiers": 5,
        "digest_function": 6,
    }
    assert _numbers(ra.FetchDirectoryResponse)["root_directory_digest"] == 5
    assert _numbers(ra.PushBlobRequest)["digest_function"] == 8
    assert _numbers(bst.ReadResponse) == {"data": 10}
    assert _numbers(bst.WriteRequest) == {
        "resource_name": 1,
        "write_offset": 2,
        "finish_write": 3,
        "data": 10,
    }
    assert _numbers(bst.QueryWriteStatusResponse) == {"committed_size": 1, "complete": 2}
    assert _numbers(bs.UpdateReferenceRequest) == {"instance_name": 1, "keys": 2, "digest": 3}
    assert _numbers(bs.StatusResponse) == {"allow_updates": 1}


def test_service_method_paths() -> None:
    from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re
    from casbah.protos.buildstream.v2 import buildstream_pb2 as bs
    from casbah.protos.google.bytestream import bytestream_pb2 as bst

    cas = re.DESCRIPTOR.services_by_name["ContentAddressableStorage"]
    assert cas.full_name == "build.bazel.remote.execution.v2.ContentAddressableStorage"
    assert [m.name for m in cas.methods] == [
        "FindMissingBlobs",
        "BatchUpdateBlobs",
        "BatchReadBlobs",
        "GetTree",
        "SplitBlob",
        "SpliceBlob",
    ]
    assert set(re.DESCRIPTOR.services_by_name) == {
        "Execution",
        "ActionCache",
        "ContentAddressableStorage",
        "Capabilities",
    }
    assert bst.DESCRIPTOR.services_by_name["ByteStream"].full_name == "google.bytestream.ByteStream"
    refs = bs.DESCRIPTOR.services_by_name["ReferenceStorage"]
    assert refs.full_name == "buildstream.v2.ReferenceStorage"
    assert [m.name for m in refs.methods] == ["GetReference", "UpdateReference", "Status"]
