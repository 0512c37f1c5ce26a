"""Capabilities: what each instance serves, honest to the configured limits."""

from __future__ import annotations

from casbah.digest import DigestFunction
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.build.bazel.semver import semver_pb2
from casbah.server.base import Instances, rpc

LOW_API = semver_pb2.SemVer(major=2, minor=0)
HIGH_API = semver_pb2.SemVer(major=2, minor=3)


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    def __init__(self, instances: Instances) -> None:
        self.instances = instances

    @rpc
    async def GetCapabilities(self, request, context):
        instance = self.instances.get(request.instance_name, None, context, what="GetCapabilities")
        functions = [f.proto_value for f in instance.digest_functions]  # exactly what requests may use
        cache = re_pb2.CacheCapabilities(
            digest_functions=functions,
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                update_enabled=not instance.read_only and "action-cache" in instance.services
            ),
            max_batch_total_size_bytes=self.instances.max_batch_size,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
            supported_compressors=[re_pb2.Compressor.ZSTD],
            supported_batch_update_compressors=[re_pb2.Compressor.ZSTD],
        )
        if instance.chunking is not None:
            # Content-defined chunking (docs/chunking.md).  RepMaxCDC is not advertised:
            # rep_max_cdc_params stays unset.
            cache.split_blob_support = cache.splice_blob_support = True
            cache.fast_cdc_2020_params.avg_chunk_size_bytes = instance.chunking.avg
            cache.fast_cdc_2020_params.seed = instance.chunking.seed
        execution = re_pb2.ExecutionCapabilities(
            digest_function=_preferred(instance.digest_functions).proto_value, exec_enabled=False,
            digest_functions=functions
        )
        return re_pb2.ServerCapabilities(
            cache_capabilities=cache,
            execution_capabilities=execution,
            deprecated_api_version=LOW_API,
            low_api_version=LOW_API,
            high_api_version=HIGH_API,
        )


def _preferred(functions: tuple[DigestFunction, ...]) -> DigestFunction:
    """The legacy single `digest_function`: SHA-256 where enabled, else the first listed."""
    return DigestFunction.SHA256 if DigestFunction.SHA256 in functions else functions[0]
