"""The agent <-> control-plane gRPC API: ``discovery.proto`` and its generated code.

Regenerate with ``python -m controlplane.api.gen`` after editing a .proto file (a test
fails when the committed code is stale). Import the messages as
``from controlplane.api import discovery_pb2 as pb``.
"""

#: Full method name of the one discovery stream (hostmesh.api.v1.Discovery/StreamSnapshots).
STREAM_METHOD = "/hostmesh.api.v1.Discovery/StreamSnapshots"
SERVICE_NAME = "hostmesh.api.v1.Discovery"
