"""A small gRPC client for the lab's test app, run inside pods by tests and the demo.

    python -m meshlab.probe grpc HOST:PORT [--message TEXT] [--timeout SECONDS]

prints one JSON object: the Echo reply (pod, node, message, peer) and the health status.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshlab.testapp import echo_pb2, echo_pb2_grpc


def probe_grpc(target: str, message: str, timeout: float) -> dict:
    with grpc.insecure_channel(target) as channel:
        reply = echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message=message), timeout=timeout)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return {
        "pod": reply.pod, "node": reply.node, "message": reply.message, "peer": reply.peer,
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlab.probe")
    sub = parser.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("grpc", help="call Echo and the health service")
    g.add_argument("target", help="HOST:PORT")
    g.add_argument("--message", default="hello")
    g.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        print(json.dumps(probe_grpc(args.target, args.message, args.timeout)))
    except grpc.RpcError as exc:
        print(f"probe: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
