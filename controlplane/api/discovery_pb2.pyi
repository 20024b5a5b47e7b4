from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentMessage(_message.Message):
    __slots__ = ("hello", "ack", "nack", "health")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    nack: Nack
    health: HealthReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., nack: _Optional[_Union[Nack, _Mapping]] = ..., health: _Optional[_Union[HealthReport, _Mapping]] = ...) -> None: ...

class HealthReport(_message.Message):
    __slots__ = ("unhealthy",)
    UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    unhealthy: _containers.RepeatedCompositeFieldContainer[EndpointKey]
    def __init__(self, unhealthy: _Optional[_Iterable[_Union[EndpointKey, _Mapping]]] = ...) -> None: ...

class EndpointKey(_message.Message):
    __slots__ = ("address", "port", "service")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    service: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., service: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node", "agent_version", "snapshot_version", "resource_versions", "resource_digest", "bucket_digests")
    class ResourceVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BUCKET_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_version: str
    snapshot_version: str
    resource_versions: _containers.ScalarMap[str, str]
    resource_digest: str
    bucket_digests: bytes
    def __init__(self, node: _Optional[str] = ..., agent_version: _Optional[str] = ..., snapshot_version: _Optional[str] = ..., resource_versions: _Optional[_Mapping[str, str]] = ..., resource_digest: _Optional[str] = ..., bucket_digests: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("nonce", "snapshot_version")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    snapshot_version: str
    def __init__(self, nonce: _Optional[str] = ..., snapshot_version: _Optional[str] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("nonce", "snapshot_version", "error_detail")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    snapshot_version: str
    error_detail: str
    def __init__(self, nonce: _Optional[str] = ..., snapshot_version: _Optional[str] = ..., error_detail: _Optional[str] = ...) -> None: ...

class SnapshotUpdate(_message.Message):
    __slots__ = ("nonce", "snapshot_version", "changed", "removed", "full_state", "resource_digest", "send_versions", "version_buckets")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    FULL_STATE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SEND_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    snapshot_version: str
    changed: _containers.RepeatedCompositeFieldContainer[Resource]
    removed: _containers.RepeatedScalarFieldContainer[str]
    full_state: bool
    resource_digest: str
    send_versions: bool
    version_buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, nonce: _Optional[str] = ..., snapshot_version: _Optional[str] = ..., changed: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., removed: _Optional[_Iterable[str]] = ..., full_state: _Optional[bool] = ..., resource_digest: _Optional[str] = ..., send_versions: _Optional[bool] = ..., version_buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("name", "version", "service", "workload", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    service: Service
    workload: Workload
    config: ConfigObject
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., service: _Optional[_Union[Service, _Mapping]] = ..., workload: _Optional[_Union[Workload, _Mapping]] = ..., config: _Optional[_Union[ConfigObject, _Mapping]] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "namespace", "cluster_ip", "ports", "endpoints")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_IP_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    cluster_ip: str
    ports: _containers.RepeatedCompositeFieldContainer[ServicePort]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., cluster_ip: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[ServicePort, _Mapping]]] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class ServicePort(_message.Message):
    __slots__ = ("port", "target_port", "name", "protocol", "app_protocol")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    APP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    port: int
    target_port: int
    name: str
    protocol: str
    app_protocol: str
    def __init__(self, port: _Optional[int] = ..., target_port: _Optional[int] = ..., name: _Optional[str] = ..., protocol: _Optional[str] = ..., app_protocol: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "port", "node", "workload", "namespace")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    node: str
    workload: str
    namespace: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., node: _Optional[str] = ..., workload: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("name", "namespace", "node", "address", "service_account", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    node: str
    address: str
    service_account: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., node: _Optional[str] = ..., address: _Optional[str] = ..., service_account: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class ConfigObject(_message.Message):
    __slots__ = ("kind", "namespace", "name", "spec_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    spec_json: str
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...
