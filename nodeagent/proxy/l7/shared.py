"""Small pieces the HTTP drivers share (HTTP/1.1 and HTTP/2): plain functions, no I/O."""

from __future__ import annotations

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
