"""The gRPC side of the test app: hostmesh.testapp.v1.Echo plus grpc.health.v1.Health,
on a grpc.aio server."""
from __future__ import annotations

import asyncio
import base64
import functools
import random
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshlab.testapp import echo_pb2, echo_pb2_grpc
from meshlab.testapp.behaviour import BehaviourError, parse_fraction

SERVICE_NAME = "hostmesh.testapp.v1.Echo"
MAX_DELAY_MS = 60_000
MAX_RESPONSE_SIZE = 16 * 1024 * 1024
MAX_STREAM_COUNT = 1_000_000

_STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
_PAYLOAD_CACHE: dict[int, bytes] = {}


def status_code(code: int) -> grpc.StatusCode | None:
    """gRPC status integer -> grpc.StatusCode (None for an unknown integer)."""
    return _STATUS_BY_CODE.get(code)


def metadata_dict(metadata) -> dict[str, str]:
    """Invocation metadata -> {key: value}; repeated keys joined by ', ', binary (-bin)
    values base64-encoded."""
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        out[key] = out[key] + ", " + value if key in out else value
    return out


def _payload(size: int) -> bytes:
    if not size:
        return b""
    data = _PAYLOAD_CACHE.get(size)
    if data is None:
        data = (b"0123456789abcdef" * (size // 16 + 1))[:size]
        if len(_PAYLOAD_CACHE) < 64:
            _PAYLOAD_CACHE[size] = data
    return data


def _handler(method):
    """Wrap an RPC: end it with UNAVAILABLE when the server shuts down (instead of a bare
    cancellation, which grpc reports with a traceback) and, with --log-requests, log one
    line per call."""
    path = f"/{SERVICE_NAME}/{method.__name__}"

    @functools.wraps(method)
    async def wrapper(self, request, context):
        task = asyncio.current_task()
        self._active.add(task)
        t0 = time.monotonic()
        status = "OK"
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:
            if not self._stopping:
                status = "CANCELLED"
                raise
            status = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the test app is shutting down")
        except BaseException:
            code = context.code()
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            self._active.discard(task)
            if self.log_file is not None:
                self.log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.pod} gRPC "
                                    f"{context.peer()} \"{path}\" {status} "
                                    f"{(time.monotonic() - t0) * 1000.0:.1f}ms\n")
                self.log_file.flush()
    return wrapper


class EchoService(echo_pb2_grpc.EchoServicer):
    def __init__(self, pod: str, node: str, log_file=None):
        self.pod = pod
        self.node = node
        self.log_file = log_file
        self._active: set[asyncio.Task] = set()
        self._stopping = False

    async def shutdown(self) -> None:
        """End every RPC in progress with UNAVAILABLE."""
        self._stopping = True
        tasks = list(self._active)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    # ---- helpers
    async def _begin(self, context) -> None:
        await context.send_initial_metadata((("x-testapp-pod", self.pod),))

    @staticmethod
    async def _check(context, *, delay_ms: int, response_size: int, code: int) -> None:
        if delay_ms > MAX_DELAY_MS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"delay_ms {delay_ms} is over the limit of {MAX_DELAY_MS}")
        if response_size > MAX_RESPONSE_SIZE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"response_size {response_size} is over the limit of {MAX_RESPONSE_SIZE}")
        if code and status_code(code) is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"status_code {code} is not a gRPC status code (0..16)")

    @staticmethod
    async def _fail_if_asked(context, code: int, message: str) -> None:
        if code:
            await context.abort(status_code(code), message or f"failing with status {code} as requested")

    def _reply(self, context, message: str, count: int, size: int) -> echo_pb2.EchoReply:
        return echo_pb2.EchoReply(pod=self.pod, node=self.node, message=message, peer=context.peer(),
                                  metadata=metadata_dict(context.invocation_metadata()),
                                  count=count, payload=_payload(size))

    async def _process(self, request: echo_pb2.EchoRequest, context) -> None:
        """Validate, wait delay_ms, fail if asked: the per-request part of every method."""
        await self._check(context, delay_ms=request.delay_ms, response_size=request.response_size,
                          code=request.status_code)
        if request.delay_ms:
            await asyncio.sleep(request.delay_ms / 1000.0)
        await self._fail_if_asked(context, request.status_code, request.status_message)

    async def _targeted(self, context) -> bool | None:
        """The HTTP side's ``pod=``/``fail=`` knobs as metadata (``x-testapp-pod``,
        ``x-testapp-fail``): None without them; else whether this call applies its delay and
        status here (a share of the calls, and only on the named pod)."""
        md = dict(context.invocation_metadata() or ())
        only, share = md.get("x-testapp-pod"), md.get("x-testapp-fail")
        if only is None and share is None:
            return None
        fail = 1.0
        if share is not None:
            try:
                fail = parse_fraction(share)
            except BehaviourError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"x-testapp-fail: {exc}")
        return (only is None or only == self.pod) and (fail >= 1.0 or random.random() < fail)

    # ---- RPCs
    @_handler
    async def Echo(self, request, context):
        targeted = await self._targeted(context)
        if targeted is not None:
            if targeted:  # before any header, as a server failing early: a trailers-only answer
                await self._process(request, context)
            request = echo_pb2.EchoRequest(message=request.message, response_size=request.response_size)
        await self._begin(context)
        await self._process(request, context)
        return self._reply(context, request.message, 1, request.response_size)

    @_handler
    async def ServerStream(self, request, context):
        await self._begin(context)
        await self._check(context, delay_ms=request.interval_ms, response_size=request.response_size,
                          code=request.status_code)
        if request.count > MAX_STREAM_COUNT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"count {request.count} is over the limit of {MAX_STREAM_COUNT}")
        for i in range(1, request.count + 1):
            if request.interval_ms:
                await asyncio.sleep(request.interval_ms / 1000.0)
            await context.write(self._reply(context, request.message, i, request.response_size))
        await self._fail_if_asked(context, request.status_code, request.status_message)

    @_handler
    async def ClientStream(self, request_iterator, context):
        await self._begin(context)
        count, message, size = 0, "", 0
        async for request in request_iterator:
            await self._process(request, context)
            count += 1
            message, size = request.message, request.response_size
        return self._reply(context, message, count, size)

    @_handler
    async def Bidi(self, request_iterator, context):
        await self._begin(context)
        count = 0
        async for request in request_iterator:
            await self._process(request, context)
            count += 1
            await context.write(self._reply(context, request.message, count, request.response_size))


async def start_server(pod: str, node: str, bind: str, port: int, log_requests: bool = False
                       ) -> tuple[grpc.aio.Server, int, object, EchoService]:
    """Start the gRPC server; returns (server, bound port, health servicer, echo service)."""
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),        # a second app on the same port must fail, not share
        ("grpc.max_send_message_length", MAX_RESPONSE_SIZE + 1024 * 1024),
        # calls not yet picked up by the (single-threaded) handler loop: grpc core starts
        # cancelling them at random from 1000 and all of them at 3000 by default, which
        # a load test with a few thousand calls in flight hits
        ("grpc.server.max_pending_requests", 20000),
        ("grpc.server.max_pending_requests_hard_limit", 40000),
    ])
    echo = EchoService(pod, node, sys.stderr if log_requests else None)
    echo_pb2_grpc.add_EchoServicer_to_server(echo, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    host = f"[{bind}]" if ":" in bind else bind
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC port {host}:{port}: {exc}") from None
    if not bound:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    return server, bound, health_servicer, echo
