"""nodeagent/otlp.py against a real OTLP/HTTP receiver on 127.0.0.1 that decodes with opentelemetry-proto:
batches, ids and attributes on the wire; a stalled, failing or dead collector costs spans (counted),
never time on the request path."""

from __future__ import annotations

import random
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client import generate_latest

from nodeagent.otlp import Backoff, OtlpExporter, TraceExportMetrics, export_request
from nodeagent.state import Workload
from nodeagent.telemetry import MetricsRegistry
from nodeagent.tracing import OtlpEndpoint, Sampler, SpanKind, Tracer, resource_for

pytestmark = pytest.mark.timeout(60)

APP = Workload("productpage-v1", "shop", "node1", "198.18.1.5", labels=(("app", "productpage"),))
REVIEWS = Workload("reviews-v2", "shop", "node2", "198.18.2.7", labels=(("app", "reviews"), ("version", "v2")))
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP collector: decodes every POST /v1/traces, answers as told."""

    def __init__(self, status: int = 200, retry_after: str | None = None, rejected: int = 0,
                 close_after_answer: bool = False) -> None:
        self.requests: list[tuple[float, dict, ExportTraceServiceRequest]] = []
        self.status, self.retry_after, self.rejected, self.close_after_answer = status, retry_after, rejected, \
            close_after_answer
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append((time.monotonic(), {"path": self.path, **dict(self.headers)}, request))
                answer = ExportTraceServiceResponse()
                if receiver.rejected:
                    answer.partial_success.CopyFrom(ExportTracePartialSuccess(
                        rejected_spans=receiver.rejected, error_message="too old"))
                payload = answer.SerializeToString()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                if receiver.retry_after:
                    self.send_header("Retry-After", receiver.retry_after)
                self.end_headers()
                self.wfile.write(payload)
                if receiver.close_after_answer:
                    self.close_connection = True   # without saying so: the client's connection goes stale

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> OtlpEndpoint:
        return OtlpEndpoint("127.0.0.1", self.server.server_address[1], "/v1/traces")

    def spans(self) -> list:
        return [s for _, _, r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class StalledReceiver:
    """Accepts connections and never answers (nor reads)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    @property
    def endpoint(self) -> OtlpEndpoint:
        return OtlpEndpoint("127.0.0.1", self.sock.getsockname()[1], "/v1/traces")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        for s in self.held:
            s.close()
        self.sock.close()


def dead_endpoint() -> OtlpEndpoint:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there: connections are refused
    return OtlpEndpoint("127.0.0.1", port, "/v1/traces")


@pytest.fixture
def exporters():
    made: list[OtlpExporter] = []

    def make(endpoint, **kw) -> OtlpExporter:
        registry = MetricsRegistry()
        kw.setdefault("rand", random.Random(1))
        exporter = OtlpExporter(endpoint, TraceExportMetrics(registry), **kw).start()
        exporter.registry = registry
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.close(0.5)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def two_proxy_spans(n: int, tracer_seed: int = 1):
    """``n`` requests, each through a source proxy (CLIENT span) and a destination proxy (SERVER span)."""
    source, destination = Tracer(Sampler(100), random.Random(tracer_seed)), Tracer(Sampler(100), random.Random(99))
    out = []
    for i in range(n):
        app_headers = [(b":authority", b"reviews.shop:9080"), (b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode())]
        client = source.start(SpanKind.CLIENT, app_headers, 1_000 + i, resource=resource_for(APP, "node1"),
                              method=b"GET", path=b"/reviews/%d?x=1" % i, authority=b"reviews.shop:9080")
        wire = client.edits.apply(app_headers)
        server = destination.start(SpanKind.SERVER, wire, 2_000 + i, resource=resource_for(REVIEWS, "node2"),
                                   method=b"GET", path=b"/reviews/%d?x=1" % i, authority=b"reviews.shop:9080")
        server.span.finish(3_000 + i, 200, upstream_cluster="inbound|9080||")
        client.span.finish(4_000 + i, 200, upstream_cluster="outbound|9080||reviews.shop.svc.cluster.local",
                           service_host="reviews.shop.svc.cluster.local", service_port=9080)
        out += [client.span, server.span]
    return out


def test_spans_arrive_batched_with_their_ids_and_attributes(exporters):
    with Receiver() as receiver:
        exporter = exporters(receiver.endpoint, max_batch=100, max_delay_s=0.2)
        spans = two_proxy_spans(125)
        for span in spans:
            exporter.record(span)
        assert wait_for(lambda: len(receiver.spans()) == 250)
        assert 3 <= len(receiver.requests) <= 5                  # batched, not one request per span
        _, headers, request = receiver.requests[0]
        assert headers["path"] == "/v1/traces" and headers["Content-Type"] == "application/x-protobuf"
        got = receiver.spans()
        client = next(s for s in got if s.kind == SpanKind.CLIENT)
        server = next(s for s in got if s.kind == SpanKind.SERVER and s.parent_span_id == client.span_id)
        assert client.trace_id == server.trace_id == bytes.fromhex(TRACE)
        assert client.parent_span_id == bytes.fromhex(APP_SPAN)
        assert server.parent_span_id == client.span_id
        assert (client.kind, server.kind) == (SpanKind.CLIENT, SpanKind.SERVER)
        assert client.name == "reviews.shop.svc.cluster.local:9080/*"
        assert (client.start_time_unix_nano, client.end_time_unix_nano) == (1_000, 4_000)
        assert client.flags & 0x301 == 0x301                    # sampled, parent is remote
        attrs = {kv.key: kv.value for kv in client.attributes}
        assert attrs["http.request.method"].string_value == "GET"
        assert attrs["url.path"].string_value == "/reviews/0"
        assert attrs["http.response.status_code"].int_value == 200
        assert attrs["upstream_cluster"].string_value == "outbound|9080||reviews.shop.svc.cluster.local"
        # one ResourceSpans per workload: the source's and the destination's
        resources = {kv.value.string_value for rs in request.resource_spans for kv in rs.resource.attributes
                     if kv.key == "service.name"}
        assert resources == {"productpage.shop", "reviews.shop"}
        assert request.resource_spans[0].scope_spans[0].scope.name == "hostmesh"
        assert wait_for(lambda: exporter.metrics.exported == 250)   # counted once the answer is read
        text = generate_latest(exporter.registry).decode()
        assert "hostmesh_agent_trace_spans_exported_total 250.0" in text
        assert 'hostmesh_agent_trace_spans_dropped_total{reason="queue_full"} 0.0' in text


def test_a_partial_success_counts_the_rejected_spans(exporters):
    with Receiver(rejected=3) as receiver:
        exporter = exporters(receiver.endpoint, max_delay_s=0.05)
        for span in two_proxy_spans(5):
            exporter.record(span)
        assert wait_for(lambda: exporter.metrics.exported + exporter.metrics.dropped["rejected"] == 10)
        assert exporter.metrics.dropped["rejected"] == 3


def test_a_keep_alive_connection_the_collector_closed_is_redialled(exporters):
    with Receiver(close_after_answer=True) as receiver:
        exporter = exporters(receiver.endpoint, max_delay_s=0.05)
        for round_ in range(3):
            for span in two_proxy_spans(2):
                exporter.record(span)
            assert wait_for(lambda: exporter.metrics.exported == 4 * (round_ + 1))
            time.sleep(0.1)
        assert sum(exporter.metrics.failures.values()) == 0


def test_close_flushes_what_is_queued():
    with Receiver() as receiver:
        exporter = OtlpExporter(receiver.endpoint, TraceExportMetrics(MetricsRegistry()), max_delay_s=30).start()
        for span in two_proxy_spans(5):
            exporter.record(span)
        exporter.close(2.0)
        assert len(receiver.spans()) == 10 and exporter.metrics.dropped["shutdown"] == 0
        exporter.record(two_proxy_spans(1)[0])
        assert exporter.metrics.dropped["shutdown"] == 1


def test_a_stalled_collector_drops_and_counts_and_record_stays_fast(exporters):
    spans = two_proxy_spans(5000)        # 10k spans, built before the clock starts
    with StalledReceiver() as stalled:
        exporter = exporters(stalled.endpoint, timeout_s=0.3, max_delay_s=0.05, backoff_base_s=0.2,
                             backoff_max_s=0.4)
        exporter.record(spans[0])
        time.sleep(0.1)                   # the first batch is on its way into the stalled connection
        began = time.perf_counter()
        for span in spans:
            exporter.record(span)
        took = time.perf_counter() - began
        assert took < 0.2, f"10k records took {took * 1000:.1f} ms"
        assert wait_for(lambda: exporter.metrics.failures["timeout"] >= 1)
        assert exporter.metrics.dropped["queue_full"] >= 10_000 - 2048
        assert wait_for(lambda: exporter.metrics.dropped["export_failed"] >= 1)
        assert exporter.metrics.exported == 0
        assert len(exporter._queue) <= exporter.max_queue


def test_a_stalled_collector_does_not_move_request_latency(exporters):
    """The same request-side work (start, header edits, finish, record) with tracing off, with a
    healthy collector and with a stalled one, interleaved in one run."""
    with Receiver() as healthy, StalledReceiver() as stalled:
        to_healthy = exporters(healthy.endpoint, max_delay_s=0.05)
        to_stalled = exporters(stalled.endpoint, timeout_s=0.5, max_delay_s=0.05, backoff_base_s=0.1,
                               backoff_max_s=0.2)
        tracer = Tracer(Sampler(100), random.Random(4))
        headers = [(b":method", b"GET"), (b":path", b"/reviews/1"), (b":authority", b"reviews.shop:9080"),
                   (b"user-agent", b"curl/8"), (b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode())]
        resource = resource_for(APP, "node1")

        def request(exporter) -> int:
            began = time.perf_counter_ns()
            if exporter is None:
                list(headers)
            else:
                started = tracer.start(SpanKind.CLIENT, headers, began, resource=resource, method=b"GET",
                                       path=b"/reviews/1", authority=b"reviews.shop:9080")
                started.edits.apply(headers)
                exporter.record(started.span.finish(began + 1, 200))
            return time.perf_counter_ns() - began

        times: dict[str, list[int]] = {"off": [], "healthy": [], "stalled": []}
        for _ in range(3000):
            for name, exporter in (("off", None), ("healthy", to_healthy), ("stalled", to_stalled)):
                times[name].append(request(exporter))
        median = {k: statistics.median(v) for k, v in times.items()}
        p99 = {k: sorted(v)[int(len(v) * 0.99)] for k, v in times.items()}
        assert wait_for(lambda: to_healthy.metrics.exported > 0) and to_stalled.metrics.exported == 0
        # a stalled collector costs the request path nothing over a healthy one
        assert median["stalled"] <= median["healthy"] * 1.5 + 2_000, (median, p99)
        assert p99["stalled"] <= p99["healthy"] * 3 + 20_000, (median, p99)
        assert median["stalled"] < 100_000, median          # tracing itself: well under 0.1 ms a request


def test_a_dead_collector_is_retried_with_backoff_not_hammered(exporters):
    attempts: list[float] = []

    def counting_connect(address, timeout):
        attempts.append(time.monotonic())
        return socket.create_connection(address, timeout=timeout)

    exporter = exporters(dead_endpoint(), max_delay_s=0.02, backoff_base_s=0.2, backoff_max_s=0.4,
                         connect=counting_connect)
    spans = two_proxy_spans(200)
    began = time.monotonic()
    for span in spans:                     # spans keep coming for 1.5 s
        exporter.record(span)
        time.sleep(1.5 / len(spans))
    elapsed = time.monotonic() - began
    assert exporter.metrics.failures["network_error"] == len(attempts) >= 2
    # backoff 0.1-0.2 s, then 0.2-0.4 s: at most ~8 attempts in 1.5 s (without it: one per 20 ms)
    assert len(attempts) <= 2 + elapsed / 0.2, attempts
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert min(gaps) >= 0.09, gaps
    assert exporter.metrics.dropped["export_failed"] >= 1 and exporter.metrics.exported == 0


def test_retry_after_is_honoured(exporters):
    with Receiver(status=503, retry_after="1") as receiver:
        exporter = exporters(receiver.endpoint, max_delay_s=0.02, backoff_base_s=0.05, backoff_max_s=5)
        for span in two_proxy_spans(50):
            exporter.record(span)
            time.sleep(0.03)
        assert wait_for(lambda: len(receiver.requests) >= 2, timeout=5)
        first, second = receiver.requests[0][0], receiver.requests[1][0]
        assert second - first >= 0.95
        assert exporter.metrics.failures["http_error"] >= 1
        assert exporter.metrics.dropped["export_failed"] >= 1


def test_backoff_steps():
    backoff = Backoff(1.0, 30.0, random.Random(3))
    delays = [backoff.failed() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings)), delays
    assert 20 <= backoff.failed(retry_after_s=20) <= 30
    assert backoff.failed(retry_after_s=3600) == 30       # Retry-After is capped
    backoff.succeeded()
    assert backoff.failed() <= 1


def test_export_request_groups_by_resource():
    spans = two_proxy_spans(3)
    request = export_request(spans, "0.1.0")
    assert [len(rs.scope_spans[0].spans) for rs in request.resource_spans] == [3, 3]
    assert request.resource_spans[0].scope_spans[0].scope.version == "0.1.0"
    assert ExportTraceServiceRequest.FromString(request.SerializeToString()) == request


def test_status_and_flags_on_the_wire():
    tracer = Tracer(Sampler(100), random.Random(8))
    root = tracer.start(SpanKind.CLIENT, [], 10, resource=resource_for(None, "node1"), authority=b"x:80").span
    root.finish(20, 503, response_flags="UH")
    message = export_request([root]).resource_spans[0].scope_spans[0].spans[0]
    assert (message.status.code, message.status.message) == (2, "HTTP 503 (UH)")
    assert message.flags == 0x101 and message.parent_span_id == b""      # a local root: not remote
    resource = export_request([root]).resource_spans[0].resource
    assert {kv.key: kv.value.string_value for kv in resource.attributes} == {"service.name": "hostmesh-agent",
                                                                          "host.name": "node1"}
