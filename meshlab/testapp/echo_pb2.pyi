from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ("message", "status_code", "status_message", "delay_ms", "response_size")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SIZE_FIELD_NUMBER: _ClassVar[int]
    message: str
    status_code: int
    status_message: str
    delay_ms: int
    response_size: int
    def __init__(self, message: _Optional[str] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ..., delay_ms: _Optional[int] = ..., response_size: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("message", "count", "interval_ms", "response_size", "status_code", "status_message")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    count: int
    interval_ms: int
    response_size: int
    status_code: int
    status_message: str
    def __init__(self, message: _Optional[str] = ..., count: _Optional[int] = ..., interval_ms: _Optional[int] = ..., response_size: _Optional[int] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ...) -> None: ...

class EchoReply(_message.Message):
    __slots__ = ("pod", "node", "message", "peer", "metadata", "count", "payload")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    pod: str
    node: str
    message: str
    peer: str
    metadata: _containers.ScalarMap[str, str]
    count: int
    payload: bytes
    def __init__(self, pod: _Optional[str] = ..., node: _Optional[str] = ..., message: _Optional[str] = ..., peer: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., count: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...
