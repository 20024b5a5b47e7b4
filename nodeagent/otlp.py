"""OTLP/HTTP export of finished spans: a bounded queue filled by the request path, drained
by one background thread in batches. A slow or dead collector costs spans, never requests.

* **Request path** (``OtlpExporter.record``, called on the proxy's event loop): one length
  check and a ``deque.append``; when the queue holds ``max_queue`` spans the span is dropped
  and counted (``queue_full``). Nothing on that path waits for the collector, encodes
  protobuf or takes a lock (``deque.append`` is atomic; the thread is woken through an
  ``Event`` only when a batch fills up).
* **Why a thread, not an asyncio task.** Encoding a batch of 512 spans into protobuf is a few
  milliseconds of Python: on the event loop it would stall every connection of the process
  in one piece, in a thread the interpreter's switch interval (5 ms) slices it. The socket
  work is blocking with deadlines in that thread, so no timer or task of the request path's
  loop depends on the collector. One thread per proxy process (workers are separate
  processes, each with its own exporter); it is a daemon and ``close`` stops it.
* **Batches**: up to ``max_batch`` (512) spans per request, sent when a batch is full or every
  ``max_delay_s`` (1 s). Wire format: OTLP/HTTP binary protobuf (``POST /v1/traces``,
  ``Content-Type: application/x-protobuf``, an ``ExportTraceServiceRequest`` of the
  ``opentelemetry-proto`` package), one ``ResourceSpans`` per ``SpanResource`` (the proxy's
  workload, see ``nodeagent.tracing``), scope ``hostmesh``. OTLP/gRPC is not offered:
  OTLP/HTTP is accepted by every collector and backend that takes OTLP, needs no HTTP/2 client
  in this thread, and grpcio's channel would bring its own threads and retry policy.
* **Failures**: one attempt per batch, bounded by ``timeout_s`` overall (connect, send and
  the whole answer). A failed batch (refused, timeout, a non-2xx answer, an unreadable
  answer) is dropped and counted (``export_failed``), and the next attempt waits for an
  exponential backoff with full jitter (``backoff_base_s`` 1 s doubling to ``backoff_max_s``
  30 s, at least the collector's ``Retry-After`` up to that cap); spans arriving meanwhile
  queue up to ``max_queue`` and are dropped past it (``queue_full``). So a dead collector
  sees at most one connection attempt per backoff step, never a retry storm. A partial
  success (the collector ``rejected_spans``) counts those as ``rejected``. A keep-alive
  connection found closed before any answer byte is redialled once (a stale connection,
  not a retry). ``close`` flushes what is queued within its timeout; what is left is dropped
  (``shutdown``).

Metrics (``TraceExportMetrics``, registered once per process on an injected registry; read
at scrape time from plain counters, each written by one thread):
``hostmesh_agent_trace_spans_exported_total``,
``hostmesh_agent_trace_spans_dropped_total{reason}`` (``queue_full``, ``export_failed``,
``rejected``, ``shutdown``), ``hostmesh_agent_trace_export_failures_total{reason}``
(``network_error``, ``timeout``, ``http_error``, ``bad_response``) and the gauge
``hostmesh_agent_trace_queue_spans``.
"""

from __future__ import annotations

import logging
import random as _random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import httptools
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodeagent.tracing import OtlpEndpoint, Span, SpanResource

log = logging.getLogger(__name__)

SCOPE_NAME = "hostmesh"
DROP_REASONS = ("queue_full", "export_failed", "rejected", "shutdown")
FAILURE_REASONS = ("network_error", "timeout", "http_error", "bad_response")
MAX_RESPONSE_BODY = 64 * 1024
# OTLP/HTTP's retryable statuses: the backoff honours their Retry-After
_RETRYABLE = frozenset({429, 502, 503, 504})
# OTLP span flags: bits 0-7 the W3C trace flags, 0x100 "is-remote known", 0x200 "parent is remote"
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_LOG_EVERY_S = 30.0


class TraceExportMetrics:
    """The exporter's counters, as a collector on ``registry`` (one per process: exporters
    come and go with the config, the series stay)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.exported = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.failures = dict.fromkeys(FAILURE_REASONS, 0)
        self.queue_length: Callable[[], int] = lambda: 0
        registry.register(self)

    def describe(self):
        return []

    def collect(self):
        exported = CounterMetricFamily("hostmesh_agent_trace_spans_exported",
                                       "Spans accepted by the OTLP collector")
        exported.add_metric([], self.exported)
        dropped = CounterMetricFamily("hostmesh_agent_trace_spans_dropped",
                                      "Sampled spans not delivered to the OTLP collector", labels=["reason"])
        for reason, n in self.dropped.items():
            dropped.add_metric([reason], n)
        failures = CounterMetricFamily("hostmesh_agent_trace_export_failures",
                                       "OTLP export requests that failed (their spans are dropped)",
                                       labels=["reason"])
        for reason, n in self.failures.items():
            failures.add_metric([reason], n)
        queued = GaugeMetricFamily("hostmesh_agent_trace_queue_spans", "Spans waiting for export")
        queued.add_metric([], self.queue_length())
        return [exported, dropped, failures, queued]


# ---------------------------------------------------------------- encoding

def _set_attributes(target, pairs: Iterable[tuple[str, str | int]]) -> None:
    """Append ``pairs`` to a repeated KeyValue field. (Filling messages in place with ``add()``
    costs a third of building them from keyword arguments: a batch of 512 spans encodes in
    about 5 ms instead of 19.)"""
    for key, value in pairs:
        kv = target.add()
        kv.key = key
        if isinstance(value, str):
            kv.value.string_value = value
        elif isinstance(value, bool):
            kv.value.bool_value = value
        else:
            kv.value.int_value = value


def fill_span(message: trace_pb2.Span, span: Span) -> None:
    """Write one ``Span`` into an (empty) OTLP ``Span`` message."""
    message.trace_id = span.trace_id
    message.span_id = span.span_id
    if span.parent_span_id:
        message.parent_span_id = span.parent_span_id
        message.flags = span.sampled_flags | _FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE
    else:
        message.flags = span.sampled_flags | _FLAGS_HAS_IS_REMOTE
    if span.tracestate:
        message.trace_state = span.tracestate.decode("ascii", "replace")
    message.name = span.name()
    message.kind = int(span.kind)
    message.start_time_unix_nano = span.start_ns
    message.end_time_unix_nano = span.end_ns
    _set_attributes(message.attributes, span.attributes())
    code, text = span.status()
    if code:
        message.status.code = code
        message.status.message = text


def export_request(spans: Iterable[Span], scope_version: str = "") -> ExportTraceServiceRequest:
    """An ``ExportTraceServiceRequest``: the spans grouped by resource, in arrival order."""
    request = ExportTraceServiceRequest()
    groups: dict[SpanResource, trace_pb2.ScopeSpans] = {}
    for span in spans:
        scope_spans = groups.get(span.resource)
        if scope_spans is None:
            resource_spans = request.resource_spans.add()
            _set_attributes(resource_spans.resource.attributes, span.resource.attributes())
            scope_spans = groups[span.resource] = resource_spans.scope_spans.add()
            scope_spans.scope.name = SCOPE_NAME
            if scope_version:
                scope_spans.scope.version = scope_version
        fill_span(scope_spans.spans.add(), span)
    return request


# ---------------------------------------------------------------- backoff (pure)

class Backoff:
    """Exponential backoff with full jitter between failed exports."""

    __slots__ = ("base_s", "max_s", "failures", "_rand")

    def __init__(self, base_s: float, max_s: float, rand: _random.Random) -> None:
        self.base_s, self.max_s, self.failures, self._rand = base_s, max(max_s, base_s), 0, rand

    def failed(self, retry_after_s: float | None = None) -> float:
        """Seconds to wait before the next attempt."""
        self.failures += 1
        ceiling = min(self.max_s, self.base_s * (2 ** min(self.failures - 1, 30)))
        delay = self._rand.uniform(ceiling / 2, ceiling)   # half fixed, half jitter: never 0
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_s))
        return delay

    def succeeded(self) -> None:
        self.failures = 0


# ---------------------------------------------------------------- HTTP

class ExportFailed(Exception):
    """An export request that did not succeed: ``reason`` (a FAILURE_REASONS value)."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


class _Answer:
    """httptools callbacks: status, the headers the exporter reads, a bounded body."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.retry_after: bytes | None = None
        self.content_type = b""
        self.complete = False
        self.started = False

    def on_message_begin(self) -> None:
        self.started = True

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"retry-after":
            self.retry_after = value
        elif name == b"content-type":
            self.content_type = value

    def on_body(self, data: bytes) -> None:
        if len(self.body) < MAX_RESPONSE_BODY:
            self.body += data[:MAX_RESPONSE_BODY - len(self.body)]

    def on_message_complete(self) -> None:
        self.complete = True


def _retry_after_seconds(value: bytes | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None   # an HTTP date is not worth a clock comparison here: the backoff covers it
    return float(value.strip())


class _StaleConnection(Exception):
    """The connection ended before any answer byte (a keep-alive connection the collector closed)."""


class _Http:
    """One keep-alive HTTP/1.1 connection to the collector, driven by the export thread."""

    def __init__(self, endpoint: OtlpEndpoint, connect: Callable[..., socket.socket]) -> None:
        self.endpoint = endpoint
        self._connect = connect
        self._sock: socket.socket | None = None
        host = endpoint.host if endpoint.port == 80 else f"{endpoint.host}:{endpoint.port}"
        self._head = (f"POST {endpoint.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: hostmesh-agent\r\n"
                      f"Content-Type: application/x-protobuf\r\n").encode()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def post(self, body: bytes, deadline: float, clock: Callable[[], float]) -> tuple[int, _Answer]:
        """(status, answer) of one POST, all of it before ``deadline``; ExportFailed otherwise."""
        for attempt in (0, 1):
            reused = self._sock is not None
            try:
                return self._exchange(body, deadline, clock)
            except _StaleConnection:
                self.close()
                if not reused or attempt:
                    break
        raise ExportFailed("network_error", "the collector closed the connection before answering")

    def _remaining(self, deadline: float, clock: Callable[[], float]) -> float:
        left = deadline - clock()
        if left <= 0:
            self.close()
            raise ExportFailed("timeout", "the collector did not answer in time")
        return left

    def _exchange(self, body: bytes, deadline: float, clock: Callable[[], float]) -> tuple[int, _Answer]:
        answer = _Answer()
        try:
            if self._sock is None:
                self._sock = self._connect((self.endpoint.host, self.endpoint.port),
                                           timeout=self._remaining(deadline, clock))
            sock = self._sock
            sock.settimeout(self._remaining(deadline, clock))
            # sendall's timeout bounds the whole call (Python >= 3.5), not each chunk
            sock.sendall(self._head + b"Content-Length: %d\r\n\r\n" % len(body))
            sock.sendall(body)
            parser = httptools.HttpResponseParser(answer)
            while not answer.complete:
                sock.settimeout(self._remaining(deadline, clock))
                data = sock.recv(65536)
                if not data:
                    if not answer.started:
                        raise _StaleConnection()
                    raise ExportFailed("bad_response", "the collector closed the connection mid-answer")
                parser.feed_data(data)
            status = parser.get_status_code()
            if not parser.should_keep_alive():
                self.close()
            return status, answer
        except (socket.timeout, TimeoutError):
            self.close()
            raise ExportFailed("timeout", "the collector did not answer in time") from None
        except httptools.HttpParserError as exc:
            self.close()
            raise ExportFailed("bad_response", f"the collector's answer is not HTTP/1.1: {exc}") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not answer.started:
                raise _StaleConnection() from None
            self.close()
            raise ExportFailed("network_error", f"{exc.__class__.__name__}: {exc}") from None
        except OSError as exc:
            self.close()
            raise ExportFailed("network_error", f"{exc.strerror or exc}") from None


# ---------------------------------------------------------------- the exporter

class OtlpExporter:
    """Spans in (``record``, from the proxy's event loop), OTLP/HTTP batches out (a thread)."""

    def __init__(self, endpoint: OtlpEndpoint, metrics: TraceExportMetrics, *, timeout_s: float = 2.0,
                 max_queue: int = 2048, max_batch: int = 512, max_delay_s: float = 1.0,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 30.0, scope_version: str = "",
                 rand: _random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 connect: Callable[..., socket.socket] = socket.create_connection) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_queue = max_queue
        self.max_batch = min(max_batch, max_queue)
        self.max_delay_s = max_delay_s
        self.scope_version = scope_version
        self._clock = clock
        self._backoff = Backoff(backoff_base_s, backoff_max_s, rand if rand is not None else _random.Random())
        self._http = _Http(endpoint, connect)
        self._queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._close_deadline = 0.0
        self._resume_at = 0.0
        self._last_log = -_LOG_EVERY_S
        self._thread: threading.Thread | None = None
        metrics.queue_length = self._queue.__len__

    # -- request path

    def record(self, span: Span) -> None:
        """Queue a finished span for export; never blocks (full queue: dropped, counted)."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.metrics.dropped["queue_full"] += 1
            return
        if self._closing:
            self.metrics.dropped["shutdown"] += 1
            return
        queue.append(span)
        if len(queue) == self.max_batch:
            self._wake.set()

    # -- lifecycle

    def start(self) -> "OtlpExporter":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hostmesh-otlp-export", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 2.0) -> None:
        """Export what is queued within ``timeout_s``, drop the rest, stop the thread. Blocks
        the caller until then (at most ``timeout_s`` + the export timeout): call it off the
        event loop (an executor, or at process exit)."""
        self._close_deadline = self._clock() + timeout_s
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s + self.timeout_s + 1.0)
        else:
            self._drop_queued("shutdown")
        self._http.close()

    # -- the export thread

    def _run(self) -> None:
        try:
            while True:
                now = self._clock()
                if self._closing:
                    self._flush_at_close()
                    return
                if now < self._resume_at:
                    self._wake.wait(self._resume_at - now)
                    self._wake.clear()
                    continue
                if len(self._queue) < self.max_batch:
                    self._wake.wait(self.max_delay_s)
                    self._wake.clear()
                if self._closing:
                    continue
                # everything queued now, a batch at a time, until a failure starts a backoff
                while self._queue and not self._closing and self._clock() >= self._resume_at:
                    self._export(self._take(), self._clock() + self.timeout_s)
        except Exception:   # never let the thread die silently: spans would pile up unseen
            log.exception("the OTLP export thread stopped")
            self._drop_queued("shutdown")

    def _take(self) -> list[Span]:
        queue, batch = self._queue, []
        popleft = queue.popleft
        for _ in range(min(self.max_batch, len(queue))):
            batch.append(popleft())
        return batch

    def _drop_queued(self, reason: str) -> None:
        n = len(self._queue)
        self._queue.clear()
        self.metrics.dropped[reason] += n

    def _flush_at_close(self) -> None:
        # while backing off the collector has just failed: the stop does not wait for it
        while self._queue and self._clock() >= self._resume_at:
            left = self._close_deadline - self._clock()
            if left <= 0:
                break
            self._export(self._take(), self._clock() + min(self.timeout_s, left))
        self._drop_queued("shutdown")

    def _export(self, batch: list[Span], deadline: float) -> None:
        metrics = self.metrics
        try:
            body = export_request(batch, self.scope_version).SerializeToString()
            status, answer = self._http.post(body, deadline, self._clock)
            if not 200 <= status < 300:
                retry_after = _retry_after_seconds(answer.retry_after) if status in _RETRYABLE else None
                detail = bytes(answer.body[:200]).decode("utf-8", "replace") if answer.body else ""
                raise ExportFailed("http_error", f"the collector answered {status}" + (f": {detail}" if detail else ""),
                                   retry_after)
        except ExportFailed as exc:
            metrics.failures[exc.reason] += 1
            metrics.dropped["export_failed"] += len(batch)
            delay = self._backoff.failed(exc.retry_after_s)
            self._resume_at = self._clock() + delay
            self._log_failure(f"OTLP export to {self.endpoint.url} failed ({exc}); {len(batch)} spans dropped, "
                              f"next attempt in {delay:.1f}s")
            return
        self._backoff.succeeded()
        rejected = self._rejected(answer)
        metrics.exported += len(batch) - rejected
        metrics.dropped["rejected"] += rejected

    def _rejected(self, answer: _Answer) -> int:
        """Spans a partial success says the collector rejected (0 for an empty or JSON answer)."""
        if not answer.body or b"protobuf" not in answer.content_type:
            return 0
        response = ExportTraceServiceResponse()
        try:
            response.ParseFromString(bytes(answer.body))
        except Exception:   # protobuf's DecodeError: the spans were accepted, the answer is noise
            return 0
        partial = response.partial_success
        if partial.rejected_spans or partial.error_message:
            self._log_failure(f"the OTLP collector rejected {partial.rejected_spans} spans: "
                              f"{partial.error_message[:200]}")
        return max(0, partial.rejected_spans)

    def _log_failure(self, message: str) -> None:
        now = self._clock()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning(message)
