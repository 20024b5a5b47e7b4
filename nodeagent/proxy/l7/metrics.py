"""Prometheus metrics of proxied HTTP requests, on an injected registry.

One request = one observation of each (Istio's standard metrics with the ``hostmesh_``
prefix, ARCHITECTURE.md labels):

``hostmesh_requests_total`` (counter), ``hostmesh_request_duration_seconds`` (histogram,
from the request head to the end of the response), ``hostmesh_request_bytes`` and
``hostmesh_response_bytes`` (histograms of body bytes, as Istio's ``istio_request_bytes``),
labels ``reporter, source_workload, source_namespace, source_principal,
destination_service, destination_workload, destination_namespace, destination_principal,
request_protocol, response_code, response_flags, connection_security_policy``.

* ``request_protocol`` is ``http`` for HTTP/1.x (``grpc``/``http2`` for the other codecs).
* ``response_code`` is the status sent to the client; ``0`` when none was (the client went
  away first, flag ``DC``, or the connection had to be reset mid-response).
* ``response_flags``: ``-`` or the Envoy flag (``UH``, ``UF``, ``UT``, ``UO``, ``UC``,
  ``UPE``, ``DPE``, ``NR``, ``DC``, ...).

The label children of a combination are cached (one dict lookup per request): the
per-request cost is the lookup plus four ``inc``/``observe`` calls.
"""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram

UNKNOWN = "unknown"
NO_FLAGS = "-"

# Istio's default duration buckets (ms) in seconds
DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 600.0, 1800.0, 3600.0)
# 1 B .. 1 GiB, x8 per bucket
BYTE_BUCKETS = tuple(float(8 ** i) for i in range(11))


class HttpLabels(NamedTuple):
    """Label values known per connection/request, everything but code and flags."""

    reporter: str
    source_workload: str = UNKNOWN
    source_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    request_protocol: str = "http"
    connection_security_policy: str = "none"


HTTP_LABEL_NAMES: tuple[str, ...] = HttpLabels._fields + ("response_code", "response_flags")


class RequestSeries:
    __slots__ = ("requests", "duration", "request_bytes", "response_bytes")

    def __init__(self, requests, duration, request_bytes, response_bytes) -> None:
        self.requests = requests
        self.duration = duration
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes


class HttpMetrics:
    """The request metrics, registered on ``registry`` (never the global one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        names = HTTP_LABEL_NAMES
        self.requests = Counter("hostmesh_requests", "HTTP requests proxied.", names, registry=registry)
        self.duration = Histogram("hostmesh_request_duration_seconds",
                                  "Time from the request head to the end of the response.", names,
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.request_bytes = Histogram("hostmesh_request_bytes", "Request body bytes received from the client.",
                                       names, buckets=BYTE_BUCKETS, registry=registry)
        self.response_bytes = Histogram("hostmesh_response_bytes", "Response body bytes sent to the client.",
                                        names, buckets=BYTE_BUCKETS, registry=registry)
        self._series: dict[tuple[HttpLabels, int, str], RequestSeries] = {}

    def series(self, labels: HttpLabels, code: int, flags: str = NO_FLAGS) -> RequestSeries:
        key = (labels, code, flags)
        s = self._series.get(key)
        if s is None:
            values = (*labels, str(code), flags)
            s = RequestSeries(self.requests.labels(*values), self.duration.labels(*values),
                              self.request_bytes.labels(*values), self.response_bytes.labels(*values))
            if len(self._series) < 100_000:  # bounded: label sets come from config, codes from peers
                self._series[key] = s
        return s

    def observe(self, labels: HttpLabels, code: int, flags: str, seconds: float, req_bytes: int,
                resp_bytes: int) -> None:
        s = self.series(labels, code, flags)
        s.requests.inc()
        s.duration.observe(seconds)
        s.request_bytes.observe(req_bytes)
        s.response_bytes.observe(resp_bytes)
