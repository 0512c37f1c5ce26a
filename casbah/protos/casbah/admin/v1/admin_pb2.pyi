from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as _remote_execution_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScrubRequest(_message.Message):
    __slots__ = ("instance_name", "rate_bytes_per_second", "dry_run")
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    RATE_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    instance_name: str
    rate_bytes_per_second: int
    dry_run: bool
    def __init__(self, instance_name: _Optional[str] = ..., rate_bytes_per_second: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class Unreadable(_message.Message):
    __slots__ = ("digest", "error")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    digest: _remote_execution_pb2.Digest
    error: str
    def __init__(self, digest: _Optional[_Union[_remote_execution_pb2.Digest, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ScrubResponse(_message.Message):
    __slots__ = ("storage", "scanned", "bytes", "corrupt", "removed", "vanished", "unreadable", "seconds")
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    SCANNED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    VANISHED_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    storage: str
    scanned: int
    bytes: int
    corrupt: _containers.RepeatedCompositeFieldContainer[_remote_execution_pb2.Digest]
    removed: int
    vanished: int
    unreadable: _containers.RepeatedCompositeFieldContainer[Unreadable]
    seconds: float
    def __init__(self, storage: _Optional[str] = ..., scanned: _Optional[int] = ..., bytes: _Optional[int] = ..., corrupt: _Optional[_Iterable[_Union[_remote_execution_pb2.Digest, _Mapping]]] = ..., removed: _Optional[int] = ..., vanished: _Optional[int] = ..., unreadable: _Optional[_Iterable[_Union[Unreadable, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("instance_name",)
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    instance_name: str
    def __init__(self, instance_name: _Optional[str] = ...) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("node", "kind", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    node: str
    kind: str
    values: _containers.ScalarMap[str, int]
    def __init__(self, node: _Optional[str] = ..., kind: _Optional[str] = ..., values: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStats]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStats, _Mapping]]] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ("instance_name", "target_bytes")
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    instance_name: str
    target_bytes: int
    def __init__(self, instance_name: _Optional[str] = ..., target_bytes: _Optional[int] = ...) -> None: ...

class GcResponse(_message.Message):
    __slots__ = ("removed", "nodes")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    removed: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStats]
    def __init__(self, removed: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStats, _Mapping]]] = ...) -> None: ...
