"""Small pieces the HTTP drivers share (HTTP/1.1 and HTTP/2): plain functions, no I/O."""

from __future__ import annotations

import asyncio
import logging

from nodeagent.proxy.l7.metrics import UNKNOWN, HttpLabels
from nodeagent.telemetry import destination_workload_fields

log = logging.getLogger(__name__)


class DriverLifecycle:
    """What both HTTP drivers do the same way toward the listener: ``abort()`` closes now,
    ``_report_done()`` calls ``ctx.on_done`` exactly once. Needs ``ctx``, ``transport``,
    ``lost``, ``closing``, ``reported`` and ``name`` ("http1" / "http2") on the driver."""

    __slots__ = ()

    def abort(self, reason: str = "drain") -> None:
        """Close everything now (drain deadline, shutdown)."""
        log.debug("%s: aborting connection from %s: %s", self.name, self.ctx.src_ip, reason)
        if self.lost:
            return
        self.closing = True
        self.transport.abort()  # connection_lost follows and cleans up

    def _gate(self, exchange, ep, method: bytes, target: bytes, authority: bytes, headers: list):
        """The destination's request checks (``ctx.gate_for``, ``request_policy``): (target,
        headers) to forward, or None after ``exchange.local(...)`` answered the request."""
        gate = self.ctx.gate_for(ep)
        if gate is None:
            return target, headers
        verdict = gate.check(method, target, authority, headers, self.ctx.scheme)
        if type(verdict) is tuple:
            return verdict
        exchange.local(verdict.flag, verdict.status, verdict.message, verdict.headers)
        return None

    def _report_done(self) -> None:
        self.reported = True
        try:
            self.ctx.on_done(self)
        except Exception:  # the listener's bookkeeping must not break the loop
            log.exception("%s: on_done callback failed", self.name)


def labels_for(cache: dict, ctx, backend, ep, protocol: str | None = None) -> HttpLabels:
    """The metric labels of a request of connection ``ctx`` to ``ep`` of ``backend`` (either
    may be None), cached in the connection's ``cache``; ``protocol`` overrides
    ``request_protocol``. The destination workload's app, version and canonical labels come
    from its Workload in ``ctx.snapshot`` (``telemetry.destination_workload_fields``).
    ``ctx.secure_labels`` (set when the proxy has a tunnel) adds the principals and
    ``mutual_tls`` for an endpoint the request reaches through the tunnel."""
    key = (id(backend), id(ep), protocol)
    lab = cache.get(key)
    if lab is not None:
        return lab
    base = ctx.labels
    if backend is not None:
        svc = backend.service
        service = {"destination_service": backend.hostname, "destination_service_name": svc.name,
                   "destination_service_namespace": svc.namespace}
    else:
        service = {}
    if ep is not None and ep.workload:
        snapshot = ctx.snapshot
        workload = snapshot.workload_by_ip(ep.address) if snapshot is not None else None
        dst = destination_workload_fields(workload, ep.workload, ep.namespace)
    elif backend is not None:
        dst = destination_workload_fields(None, UNKNOWN, backend.service.namespace)
    else:
        dst = {}
    lab = base._replace(**service, **dst)
    if protocol is not None:
        lab = lab._replace(request_protocol=protocol)
    if ep is not None and ctx.secure_labels is not None:
        lab = ctx.secure_labels(ctx, lab, ep)
    if len(cache) < 4096:  # per connection; backends and endpoints come from config
        cache[key] = lab
    return lab


class _Accept(asyncio.Protocol):
    """Accept side of ``listen``: hands each connection to ``serve(transport, b"", ctx, inputs)``."""

    __slots__ = ("serve", "inputs", "snapshot", "dst", "reporter", "on_done", "prepare")

    def __init__(self, serve, inputs, snapshot, dst: tuple[str, int], reporter: str, on_done, prepare=None) -> None:
        self.serve = serve
        self.inputs = inputs
        self.snapshot = snapshot
        self.dst = dst
        self.reporter = reporter
        self.on_done = on_done
        self.prepare = prepare

    def connection_made(self, transport) -> None:
        from nodeagent.proxy.l7.context import ConnContext
        peer = transport.get_extra_info("peername")
        ctx = ConnContext.for_connection(self.inputs, self.snapshot(), src_ip=peer[0] if peer else "",
                                         dst_ip=self.dst[0], dst_port=self.dst[1], reporter=self.reporter,
                                         on_done=self.on_done)
        if self.prepare is not None:
            self.prepare(ctx)
        self.serve(transport, b"", ctx, self.inputs)


async def listen(serve, inputs, snapshot, host: str, port: int, *, dst: tuple[str, int], reporter: str = "source",
                 on_done=lambda driver: None, backlog: int = 1024, prepare=None):
    """A plain listener whose every connection goes to ``serve`` (``serve_http1``/``serve_http2``
    signature) as if captured for ``dst`` (a Service VIP:port of ``snapshot()``): the drivers
    without capture, for tests and benchmarks. ``prepare(ctx)`` may change each connection's
    context first (a fixed endpoint, a request gate)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Accept(serve, inputs, snapshot, dst, reporter, on_done, prepare),
                                    host, port, backlog=backlog, reuse_address=True)
