"""The agent <-> control-plane gRPC API: ``discovery.proto``, ``certificates.proto`` and their generated code.

Regenerate with ``python -m controlplane.api.gen`` after editing a .proto file (a test
fails when the committed code is stale). Import the messages as
``from controlplane.api import discovery_pb2 as pb``.
"""

#: Full method name of the one discovery stream (hostmesh.api.v1.Discovery/StreamSnapshots).
STREAM_METHOD = "/hostmesh.api.v1.Discovery/StreamSnapshots"
SERVICE_NAME = "hostmesh.api.v1.Discovery"
#: The certificate API (certificates.proto): one unary Sign call per workload identity.
CERTIFICATES_SERVICE = "hostmesh.api.v1.Certificates"
SIGN_METHOD = "/hostmesh.api.v1.Certificates/Sign"
#: gRPC metadata every agent call carries (see certificates.proto).
TOKEN_METADATA = "authorization"
NODE_METADATA = "x-hostmesh-node"
