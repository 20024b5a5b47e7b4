"""Prometheus metrics of proxied HTTP requests, on an injected registry.

One request = one observation of each (Istio's standard metrics with the ``hostmesh_``
prefix, ARCHITECTURE.md labels):

``hostmesh_requests_total`` (counter), ``hostmesh_request_duration_seconds`` (histogram,
from the request head to the end of the response), ``hostmesh_request_bytes`` and
``hostmesh_response_bytes`` (histograms of body bytes, as Istio's ``istio_request_bytes``),
labels ``HTTP_LABEL_NAMES``: the connection's (``nodeagent.telemetry.TcpLabels``, Istio's
standard names) + ``response_code``, ``grpc_response_status``, ``response_flags``.
``observability/prometheus/recording-rules.yaml`` turns them into Istio's ``istio_*``
series (the duration in milliseconds).

* ``request_protocol`` is ``http`` for HTTP/1.x (``grpc``/``http2`` for the other codecs).
* ``response_code`` is the status sent to the client; ``0`` when none was (the client went
  away first, flag ``DC``, or the connection had to be reset mid-response).
* ``grpc_response_status``: the gRPC status code of a gRPC request as the driver reports
  it (``observe(..., grpc_status=)``), empty otherwise (as Istio's).
* ``response_flags``: ``-`` or the Envoy flag (``UH``, ``UF``, ``UT``, ``UO``, ``UC``,
  ``UPE``, ``DPE``, ``NR``, ``DC``, ...).
* Duration buckets start at 100 µs: a proxied request on one node takes a few hundred.

``hostmesh_agent_upstream_retries_total`` (counter, label ``reason``): requests the
proxy sent upstream a second time; ``stale_keepalive``: a reused HTTP/1.1 connection
closed or reset before any response byte (``retry()``). The request is still one
observation of the families above, with its final outcome.

Per request: one dict lookup for the series of the label combination, then plain
additions (see ``HttpMetrics``); the Prometheus families are built at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from nodeagent.telemetry import NO_FLAGS, UNKNOWN, TcpLabels, source_fields

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.state import Workload


# Istio's default duration buckets (ms) in seconds, plus 0.1, 0.25 and 2.5 ms: a request
# through the proxy on one node takes well under a millisecond, and p99 of fast services
# sits between 1 and 5 ms. (The recording rules map each bound to milliseconds.)
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
# 1 B .. 1 GiB, x8 per bucket
BYTE_BUCKETS = tuple(float(8 ** i) for i in range(11))


# The connection's labels are the L4 ones (ARCHITECTURE.md names); HTTP sets
# ``request_protocol="http"`` and fills ``destination_*`` per request from the chosen backend.
HttpLabels = TcpLabels


def http_labels(reporter: str, source_workload: str = UNKNOWN, source_workload_namespace: str = UNKNOWN, *,
                source: "Workload | None" = None) -> TcpLabels:
    """The labels of an HTTP connection before any request picks a destination: from the
    client ``source`` Workload (app, version, canonical labels), or only its name and namespace."""
    return TcpLabels(reporter, request_protocol="http")._replace(
        **source_fields(source, source_workload, source_workload_namespace))


HTTP_LABEL_NAMES: tuple[str, ...] = TcpLabels._fields + ("response_code", "grpc_response_status", "response_flags")


class RequestSeries:
    """The accumulated observations of one label combination (plain ints and floats)."""

    __slots__ = ("values", "count", "dur_buckets", "dur_sum", "req_buckets", "req_sum", "resp_buckets",
                 "resp_sum")

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.count = 0
        self.dur_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.dur_sum = 0.0
        self.req_buckets = [0] * (len(BYTE_BUCKETS) + 1)
        self.req_sum = 0
        self.resp_buckets = [0] * (len(BYTE_BUCKETS) + 1)
        self.resp_sum = 0


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out, acc = [], 0
    for bound, n in zip(bounds, counts):
        acc += n
        out.append((floatToGoString(bound), acc))
    out.append(("+Inf", acc + counts[-1]))
    return out


class HttpMetrics:
    """The request metrics, exposed on ``registry`` (never the global one).

    Observations are plain additions into per-series lists (one ``bisect`` per histogram);
    a collector turns them into the Prometheus families at scrape time. That is about 5x
    cheaper per request than four ``prometheus_client`` children, each taking a lock.
    One event loop owns an instance (no locking; a scrape from another thread may see a
    request counted in one family and not yet in the next, as with any scrape).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._series: dict[tuple[HttpLabels, int, str, str], RequestSeries] = {}
        self.retries: dict[str, int] = {}  # reason -> upstream retries
        # resilience.ResilienceState objects (one per L7 side) whose destinations are exported
        self.destinations: list = []
        registry.register(self)

    def retry(self, reason: str) -> None:
        """A request was sent upstream once more (``reason``: why)."""
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def series(self, labels: HttpLabels, code: int, flags: str = NO_FLAGS, grpc_status: str = "") -> RequestSeries:
        key = (labels, code, flags, grpc_status)
        s = self._series.get(key)
        if s is None:
            s = RequestSeries((*labels, str(code), grpc_status, flags))
            if len(self._series) < 100_000:  # bounded: label sets come from config, codes from peers
                self._series[key] = s
        return s

    def observe(self, labels: HttpLabels, code: int, flags: str, seconds: float, req_bytes: int,
                resp_bytes: int, grpc_status: str = "") -> None:
        """One request; ``grpc_status``: its gRPC status code as text (gRPC requests only)."""
        s = self._series.get((labels, code, flags, grpc_status)) or self.series(labels, code, flags, grpc_status)
        self.record(s, seconds, req_bytes, resp_bytes)

    @staticmethod
    def record(s: RequestSeries, seconds: float, req_bytes: int, resp_bytes: int) -> None:
        """One observation into a series from ``series()`` (a driver may keep the series of its
        last label combination: that skips hashing the labels per request)."""
        s.count += 1
        s.dur_buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        s.dur_sum += seconds
        s.req_buckets[bisect_left(BYTE_BUCKETS, req_bytes)] += 1
        s.req_sum += req_bytes
        s.resp_buckets[bisect_left(BYTE_BUCKETS, resp_bytes)] += 1
        s.resp_sum += resp_bytes

    # ------------------------------------------------------------------ collector protocol
    def describe(self):
        return [CounterMetricFamily("hostmesh_requests", _HELP_REQUESTS, labels=HTTP_LABEL_NAMES),
                HistogramMetricFamily("hostmesh_request_duration_seconds", _HELP_DURATION, labels=HTTP_LABEL_NAMES),
                HistogramMetricFamily("hostmesh_request_bytes", _HELP_REQ_BYTES, labels=HTTP_LABEL_NAMES),
                HistogramMetricFamily("hostmesh_response_bytes", _HELP_RESP_BYTES, labels=HTTP_LABEL_NAMES),
                CounterMetricFamily("hostmesh_agent_upstream_retries", _HELP_RETRIES, labels=("reason",)),
                *_destination_families()]

    def collect(self):
        requests, duration, req_bytes, resp_bytes, retries, *dest = self.describe()
        for s in list(self._series.values()):
            v = list(s.values)
            requests.add_metric(v, s.count)
            duration.add_metric(v, _cumulative(DURATION_BUCKETS, s.dur_buckets), s.dur_sum)
            req_bytes.add_metric(v, _cumulative(BYTE_BUCKETS, s.req_buckets), s.req_sum)
            resp_bytes.add_metric(v, _cumulative(BYTE_BUCKETS, s.resp_buckets), s.resp_sum)
        for reason, n in list(self.retries.items()):
            retries.add_metric([reason], n)
        d_retries, d_overflow, d_limited, d_breaker, d_faults, d_eject, d_ejected, d_active = dest
        for state in self.destinations:
            for (ns, name, port), st in list(state.items()):
                v = [name, ns, str(port)]
                for reason, n in list(st.retries_total.items()):
                    d_retries.add_metric(v + [reason], n)
                d_overflow.add_metric(v, st.retry_overflow_total)
                d_limited.add_metric(v, st.rate_limited_total)
                d_breaker.add_metric(v, st.overflow_total)
                d_faults.add_metric(v + ["abort"], st.faults_aborted_total)
                d_faults.add_metric(v + ["delay"], st.faults_delayed_total)
                d_active.add_metric(v, st.active)
                if st.outlier is not None:
                    d_eject.add_metric(v, st.outlier.ejections_total)
                    d_ejected.add_metric(v, len(st.outlier.ejected))
        return [requests, duration, req_bytes, resp_bytes, retries, *dest]


_DEST_LABELS = ("destination_service_name", "destination_service_namespace", "destination_port")


def _destination_families():
    """Per destination Service port with a resilience policy (resilience.DestinationState)."""
    return [
        CounterMetricFamily("hostmesh_destination_retries", "Retries sent to the destination, by reason.",
                            labels=_DEST_LABELS + ("reason",)),
        CounterMetricFamily("hostmesh_destination_retry_overflow",
                            "Retries refused by the retry budget or connectionPool.maxRetries.", labels=_DEST_LABELS),
        CounterMetricFamily("hostmesh_destination_rate_limited", "Requests answered 429 by the local rate limit.",
                            labels=_DEST_LABELS),
        CounterMetricFamily("hostmesh_destination_overflow",
                            "Requests answered 503 UO by connectionPool.maxRequests.", labels=_DEST_LABELS),
        CounterMetricFamily("hostmesh_destination_faults", "Requests a FaultInjection aborted or delayed.",
                            labels=_DEST_LABELS + ("fault",)),
        CounterMetricFamily("hostmesh_destination_ejections", "Endpoints ejected by outlier detection.",
                            labels=_DEST_LABELS),
        GaugeMetricFamily("hostmesh_destination_ejected_endpoints",
                          "Endpoints ejected now (summed over worker processes).", labels=_DEST_LABELS),
        GaugeMetricFamily("hostmesh_destination_requests_active", "Requests in flight to the destination.",
                          labels=_DEST_LABELS),
    ]


_HELP_REQUESTS = "HTTP requests proxied."
_HELP_DURATION = "Time from the request head to the end of the response."
_HELP_REQ_BYTES = "Request body bytes received from the client."
_HELP_RESP_BYTES = "Response body bytes sent to the client."
_HELP_RETRIES = "Requests sent upstream again, by reason (stale_keepalive: a reused connection died first)."
