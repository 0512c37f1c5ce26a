"""The calls that name content, for the CAS client: GetTree, Remote Asset, ReferenceStorage.

A miss raises the NotFound family (`AssetNotFound` for a Remote Asset or reference
miss, answered in the response's status or as an RPC error alike; `BlobNotFound`
for a tree root), so callers see one convention.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from google.protobuf.message import Message
from google.rpc import code_pb2

from casbah.digest import Digest, DigestFunction
from casbah.errors import AssetNotFound, BlobNotFound, CasbahError, NotFound, Unsupported, code_from_int, from_status
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.reapi.connection import AsyncRemote
from casbah.tree import first_missing_directory, walk_levels


def _proto(d: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size)


Qualifiers = dict[str, str] | Sequence[tuple[str, str]] | None


def _qualifiers(qualifiers: Qualifiers) -> list[ra_pb2.Qualifier]:
    items = qualifiers.items() if isinstance(qualifiers, dict) else (qualifiers or ())
    return [ra_pb2.Qualifier(name=n, value=v) for n, v in items]


class NameCalls:
    """Mixed into `CasClient`; needs `self.remote`."""

    remote: AsyncRemote

    async def read_many(self, digests: Sequence[Digest], verify: bool = True,
                        source: str | None = None) -> tuple[dict[Digest, bytes], dict[Digest, CasbahError]]:
        raise NotImplementedError  # CasClient's

    # -- trees ---------------------------------------------------------------------

    async def get_tree(self, root: Digest) -> dict[Digest, bytes]:
        """Every Directory of a tree, serialized, by digest: GetTree, or a walk of batch
        reads for a server without it (or whose answer is not the closed tree: a server may
        serialize differently from us, or leave out a subtree it lacks; the exact bytes
        name a missing directory precisely).  A missing root or directory is BlobNotFound."""
        directories: dict[Digest, bytes] = {}
        try:
            async for page in self.get_tree_pages(root):
                for directory in page.directories:
                    data = directory.SerializeToString(deterministic=True)
                    directories[Digest.of(data, root.function)] = data
        except Unsupported:
            return await self._walk_tree(root)
        except NotFound:
            raise BlobNotFound(root, f"tree root not on {self.remote.describe()}") from None
        if root.size and first_missing_directory(root, directories) is not None:
            return await self._walk_tree(root)
        return directories

    async def _walk_tree(self, root: Digest) -> dict[Digest, bytes]:
        async def read_many(digests: list[Digest]) -> dict[Digest, bytes]:
            found, lost = await self.read_many(digests)
            if lost:
                raise next(iter(lost.values()))
            return found

        directories: dict[Digest, bytes] = {}
        # Unchecked, as GetTree's answer is: the caller checks the whole tree (plan_tree).
        async for visits in walk_levels(read_many, [(root, "")], check=None):
            for visit in visits:
                if visit.directory is None:
                    raise BlobNotFound(visit.digest, f"not on {self.remote.describe()}")
                directories[visit.digest] = visit.data
        return directories

    async def get_tree_pages(self, root: Digest) -> AsyncIterator[re_pb2.GetTreeResponse]:
        """Every GetTree page, following page tokens (each call retried).  Raises Unsupported
        when the server has no GetTree, NotFound when the root is missing."""
        token = ""
        stub = self.remote.stubs().cas
        while True:
            request = re_pb2.GetTreeRequest(instance_name=self.remote.instance,
                                            digest_function=root.function.proto_value, root_digest=_proto(root),
                                            page_token=token)
            pages = await self.remote.policy.call(
                lambda r=request: _collect(stub.GetTree(r, metadata=self.remote.metadata,
                                                        timeout=self.remote.policy.request_timeout)),
                f"GetTree on {self.remote.describe()}")
            token = ""
            for page in pages:
                yield page
                token = page.next_page_token
            if not token:
                return

    # -- Remote Asset --------------------------------------------------------------

    async def fetch_blob(self, uris: list[str], qualifiers: Qualifiers = None,
                         function: DigestFunction = DigestFunction.SHA256,
                         fetch_timeout: float | None = None, failed_is_miss: bool = False) -> ra_pb2.FetchBlobResponse:
        """FetchBlob; NotFound on a miss, another casbah error for a failed fetch
        (NotFound too with `failed_is_miss`: a proxy's view of its upstream)."""
        request = ra_pb2.FetchBlobRequest(instance_name=self.remote.instance, uris=uris,
                                          digest_function=function.proto_value, qualifiers=_qualifiers(qualifiers))
        if fetch_timeout:  # how long the server may spend fetching from the origin
            request.timeout.FromNanoseconds(int(fetch_timeout * 1e9))
        return await self._fetch(self.remote.stubs().fetch.FetchBlob, request, "FetchBlob", uris, failed_is_miss)

    async def fetch_directory(self, uris: list[str], qualifiers: Qualifiers = None,
                              function: DigestFunction = DigestFunction.SHA256,
                              fetch_timeout: float | None = None,
                              failed_is_miss: bool = False) -> ra_pb2.FetchDirectoryResponse:
        """FetchDirectory; NotFound on a miss, another casbah error for a failed fetch."""
        request = ra_pb2.FetchDirectoryRequest(instance_name=self.remote.instance, uris=uris,
                                               digest_function=function.proto_value,
                                               qualifiers=_qualifiers(qualifiers))
        if fetch_timeout:  # how long the server may spend fetching from the origin
            request.timeout.FromNanoseconds(int(fetch_timeout * 1e9))
        return await self._fetch(self.remote.stubs().fetch.FetchDirectory, request, "FetchDirectory", uris,
                                 failed_is_miss)

    async def _fetch(self, method, request: Message, what: str, uris: list[str], failed_is_miss: bool):
        try:
            response = await self.remote.unary(method, request, what)
        except NotFound as exc:  # a server that answers a miss as an RPC error (`asset-miss: rpc-error`)
            raise AssetNotFound(f"{uris[0]}: {exc}") from None
        code = response.status.code
        if code == code_pb2.NOT_FOUND or (code != code_pb2.OK and failed_is_miss):
            raise AssetNotFound(f"{what} {uris[0]} on {self.remote.describe()}: {response.status.message or 'miss'}")
        if code != code_pb2.OK:  # e.g. PERMISSION_DENIED: say so, not "miss"
            raise from_status(code_from_int(code), f"{uris[0]}: {response.status.message}")
        return response

    async def push_blob(self, uris: list[str], blob: Digest, qualifiers: Qualifiers = None,
                        expire_at: float | None = None,
                        references_blobs: Sequence[Digest] = (),
                        references_directories: Sequence[Digest] = ()) -> None:
        request = ra_pb2.PushBlobRequest(blob_digest=_proto(blob), **self._push_common(
            uris, blob, qualifiers, references_blobs, references_directories))
        if expire_at is not None:
            request.expire_at.FromNanoseconds(int(expire_at * 1e9))
        await self.remote.unary(self.remote.stubs().push.PushBlob, request, "PushBlob")

    async def push_directory(self, uris: list[str], root: Digest, qualifiers: Qualifiers = None,
                             expire_at: float | None = None,
                             references_blobs: Sequence[Digest] = (),
                             references_directories: Sequence[Digest] = ()) -> None:
        request = ra_pb2.PushDirectoryRequest(root_directory_digest=_proto(root), **self._push_common(
            uris, root, qualifiers, references_blobs, references_directories))
        if expire_at is not None:
            request.expire_at.FromNanoseconds(int(expire_at * 1e9))
        await self.remote.unary(self.remote.stubs().push.PushDirectory, request, "PushDirectory")

    def _push_common(self, uris, digest: Digest, qualifiers, references_blobs, references_directories) -> dict:
        return {
            "instance_name": self.remote.instance, "uris": list(uris), "qualifiers": _qualifiers(qualifiers),
            "references_blobs": [_proto(d) for d in references_blobs],
            "references_directories": [_proto(d) for d in references_directories],
            "digest_function": digest.function.proto_value,
        }

    # -- ReferenceStorage (BuildStream) --------------------------------------------

    async def get_reference(self, key: str) -> Digest:
        """The digest a key names; AssetNotFound when it names nothing."""
        request = bst_pb2.GetReferenceRequest(instance_name=self.remote.instance, key=key)
        try:
            response = await self.remote.unary(self.remote.stubs().references.GetReference, request, "GetReference")
        except NotFound as exc:
            raise AssetNotFound(f"reference {key!r}: {exc}") from None
        return Digest(response.digest.hash, response.digest.size_bytes)

    async def reference_status(self) -> bool:
        """ReferenceStorage Status: whether the server accepts reference updates (a
        read-only instance says no).  Unsupported when it has no ReferenceStorage."""
        request = bst_pb2.StatusRequest(instance_name=self.remote.instance)
        response = await self.remote.unary(self.remote.stubs().references.Status, request, "Status")
        return response.allow_updates

    async def update_reference(self, keys: list[str], root: Digest) -> None:
        request = bst_pb2.UpdateReferenceRequest(instance_name=self.remote.instance, keys=keys, digest=_proto(root))
        await self.remote.unary(self.remote.stubs().references.UpdateReference, request, "UpdateReference")


async def _collect(call) -> list:
    return [page async for page in call]
