"""Small pieces the HTTP drivers share (HTTP/1.1 and HTTP/2): plain functions, no I/O."""

from __future__ import annotations

import asyncio

from nodeagent.proxy.l7.metrics import UNKNOWN, HttpLabels


def labels_for(cache: dict, base: HttpLabels, backend, ep, protocol: str | None = None) -> HttpLabels:
    """The metric labels of a request to ``ep`` of ``backend`` (either may be None), cached
    in the connection's ``cache``; ``protocol`` overrides ``request_protocol``."""
    key = (id(backend), id(ep), protocol)
    lab = cache.get(key)
    if lab is not None:
        return lab
    service = backend.hostname if backend is not None else base.destination_service
    if ep is not None and ep.workload:
        wl, ns = ep.workload, ep.namespace
    elif backend is not None:
        wl, ns = UNKNOWN, backend.service.namespace
    else:
        wl, ns = base.destination_workload, base.destination_namespace
    lab = base._replace(destination_service=service, destination_workload=wl, destination_namespace=ns)
    if protocol is not None:
        lab = lab._replace(request_protocol=protocol)
    if len(cache) < 4096:  # per connection; backends and endpoints come from config
        cache[key] = lab
    return lab


class _Accept(asyncio.Protocol):
    """Accept side of ``listen``: hands each connection to ``serve(transport, b"", ctx, inputs)``."""

    __slots__ = ("serve", "inputs", "snapshot", "dst", "reporter", "on_done")

    def __init__(self, serve, inputs, snapshot, dst: tuple[str, int], reporter: str, on_done) -> None:
        self.serve = serve
        self.inputs = inputs
        self.snapshot = snapshot
        self.dst = dst
        self.reporter = reporter
        self.on_done = on_done

    def connection_made(self, transport) -> None:
        from nodeagent.proxy.l7.context import ConnContext
        peer = transport.get_extra_info("peername")
        ctx = ConnContext.for_connection(self.inputs, self.snapshot(), src_ip=peer[0] if peer else "",
                                         dst_ip=self.dst[0], dst_port=self.dst[1], reporter=self.reporter,
                                         on_done=self.on_done)
        self.serve(transport, b"", ctx, self.inputs)


async def listen(serve, inputs, snapshot, host: str, port: int, *, dst: tuple[str, int], reporter: str = "source",
                 on_done=lambda driver: None, backlog: int = 1024):
    """A plain listener whose every connection goes to ``serve`` (``serve_http1``/``serve_http2``
    signature) as if captured for ``dst`` (a Service VIP:port of ``snapshot()``): the drivers
    without capture, for tests and benchmarks."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Accept(serve, inputs, snapshot, dst, reporter, on_done), host, port,
                                    backlog=backlog, reuse_address=True)
