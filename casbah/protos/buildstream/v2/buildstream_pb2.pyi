from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as _remote_execution_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetReferenceRequest(_message.Message):
    __slots__ = ("instance_name", "key")
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    instance_name: str
    key: str
    def __init__(self, instance_name: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class GetReferenceResponse(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: _remote_execution_pb2.Digest
    def __init__(self, digest: _Optional[_Union[_remote_execution_pb2.Digest, _Mapping]] = ...) -> None: ...

class UpdateReferenceRequest(_message.Message):
    __slots__ = ("instance_name", "keys", "digest")
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    instance_name: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    digest: _remote_execution_pb2.Digest
    def __init__(self, instance_name: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., digest: _Optional[_Union[_remote_execution_pb2.Digest, _Mapping]] = ...) -> None: ...

class UpdateReferenceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("instance_name",)
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    instance_name: str
    def __init__(self, instance_name: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("allow_updates",)
    ALLOW_UPDATES_FIELD_NUMBER: _ClassVar[int]
    allow_updates: bool
    def __init__(self, allow_updates: _Optional[bool] = ...) -> None: ...
