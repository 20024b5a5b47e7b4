"""Compare generated protobuf/gRPC code without the generators' version stamps.

grpcio-tools and protobuf write their own version into the code they generate
(`GRPC_GENERATED_VERSION`, `# Protobuf Python Version`, the runtime version check). A
fresh install may pull a newer patch release than the one that generated the committed
files: that must not fail the staleness tests, a changed .proto must.
"""

from __future__ import annotations

import re

_STAMPS = (
    re.compile(rb"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(rb"^# Protobuf Python Version: .*$", re.M),
    re.compile(rb"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,"),
)


def without_version_stamps(code: bytes) -> bytes:
    for stamp in _STAMPS:
        code = stamp.sub(b"<version>", code)
    return code
