from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SignRequest(_message.Message):
    __slots__ = ("csr_pem", "namespace", "service_account")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    namespace: str
    service_account: str
    def __init__(self, csr_pem: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("cert_chain_pem", "trust_bundle_pem", "not_before", "not_after", "spiffe_id", "serial")
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    cert_chain_pem: str
    trust_bundle_pem: str
    not_before: int
    not_after: int
    spiffe_id: str
    serial: str
    def __init__(self, cert_chain_pem: _Optional[str] = ..., trust_bundle_pem: _Optional[str] = ..., not_before: _Optional[int] = ..., not_after: _Optional[int] = ..., spiffe_id: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...
