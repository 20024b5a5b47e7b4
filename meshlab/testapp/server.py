"""Runs the test app: the HTTP listener and the gRPC server in one asyncio loop, the
ready file, and a clean exit on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .httpserver import HTTPApp


@dataclass
class Config:
    pod: str
    node: str
    http_port: int = 8080
    grpc_port: int = 9090
    bind: str = "0.0.0.0"
    ready_file: str | None = None
    log_requests: bool = False


def write_ready_file(path: str, info: dict) -> None:
    """Write `info` as JSON to `path` atomically (temp file in the same directory + rename)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _ignore_selector_double_close(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """CPython 3.11.2's selector transport can run _call_connection_lost twice after a send
    fails with EPIPE on a peer that reset (the test app resets connections on purpose); the
    second run raises AttributeError on the already-cleared protocol. Nothing is lost: the
    connection was already torn down. Everything else goes to the default handler."""
    if isinstance(context.get("exception"), AttributeError) and \
            "_call_connection_lost" in repr(context.get("handle")):
        return
    loop.default_exception_handler(context)


async def serve(cfg: Config, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT when stop is None)."""
    from .grpc_service import start_server   # grpc is the slow import; keep it here

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_ignore_selector_double_close)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    app = HTTPApp(cfg.pod, cfg.node, log_requests=cfg.log_requests)
    try:
        http_server = await loop.create_server(app.protocol_factory, host=cfg.bind, port=cfg.http_port,
                                               reuse_address=True, backlog=1024)
    except OSError as exc:
        raise OSError(f"cannot bind HTTP port {cfg.bind}:{cfg.http_port}: {exc.strerror or exc}") from None
    http_port = http_server.sockets[0].getsockname()[1]
    for s in http_server.sockets:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        grpc_server, grpc_port, health_servicer, echo_service = await start_server(
            cfg.pod, cfg.node, cfg.bind, cfg.grpc_port, cfg.log_requests)
    except BaseException:
        http_server.close()
        raise

    info = {"pod": cfg.pod, "node": cfg.node, "pid": os.getpid(), "bind": cfg.bind,
            "http_port": http_port, "grpc_port": grpc_port}
    print(f"testapp pod={cfg.pod} node={cfg.node} http={cfg.bind}:{http_port} "
          f"grpc={cfg.bind}:{grpc_port}", file=sys.stderr, flush=True)
    try:
        if cfg.ready_file:
            write_ready_file(cfg.ready_file, info)
        await stop.wait()
    finally:
        http_server.close()
        app.close_all()
        await health_servicer.enter_graceful_shutdown()
        await echo_service.shutdown()
        await grpc_server.stop(grace=0.5)
        if cfg.ready_file:
            try:
                with open(cfg.ready_file) as f:
                    ours = json.load(f).get("pid") == os.getpid()
            except (OSError, ValueError):
                ours = False
            if ours:
                os.unlink(cfg.ready_file)
