"""python -m meshlab.testapp --pod NAME --node NODE [--http-port 8080] [--grpc-port 9090]
                            [--bind 0.0.0.0] [--ready-file PATH] [--log-requests]"""
from __future__ import annotations

import argparse
import asyncio
import re
import sys

from .server import Config, serve

_NAME = re.compile(r"[\x21-\x7e]{1,253}\Z")


def _name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use 1-253 printable ASCII characters, no spaces")
    return text


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535, 0 = any free port)")
    return port


def parse_args(argv: list[str] | None = None) -> Config:
    ap = argparse.ArgumentParser(
        prog="python -m meshlab.testapp",
        description="The lab's test workload: HTTP/1.1 + HTTP/2 (prior knowledge) on the HTTP "
                    "port, gRPC Echo + grpc.health.v1 on the gRPC port.")
    ap.add_argument("--pod", required=True, type=_name, help="pod name reported in every answer")
    ap.add_argument("--node", required=True, type=_name, help="node name reported in every answer")
    ap.add_argument("--http-port", type=_port, default=8080, help="HTTP port (default 8080; 0 = any)")
    ap.add_argument("--grpc-port", type=_port, default=9090, help="gRPC port (default 9090; 0 = any)")
    ap.add_argument("--bind", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    ap.add_argument("--ready-file", metavar="PATH",
                    help="once both ports are bound, write JSON {pod, node, pid, bind, http_port, "
                         "grpc_port} here (atomically); removed again on clean exit")
    ap.add_argument("--log-requests", action="store_true",
                    help="log one line per request (HTTP and gRPC) to stderr "
                         "(off by default: it costs throughput)")
    a = ap.parse_args(argv)
    return Config(pod=a.pod, node=a.node, http_port=a.http_port, grpc_port=a.grpc_port, bind=a.bind,
                  ready_file=a.ready_file, log_requests=a.log_requests)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        print(f"testapp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:      # SIGINT before the handler was installed
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
