"""Distributed tracing decisions of the node proxy: propagation, sampling, span records. No I/O.

The HTTP drivers (not wired yet: ARCHITECTURE.md "Tracing (core, not wired yet)") call one
``Tracer`` per proxy process:

* at a request head, ``Tracer.start(kind, headers, now_ns, ...)`` reads the trace context the
  request carries, decides sampling and returns a ``Started``: the ``SpanContext`` of the new
  span (what the next hop sees as its parent), the ``HeaderEdits`` that make the forwarded
  request carry it, and a ``Span`` record when the trace is sampled (None otherwise: an
  unsampled request pays for the parse, two random draws and the header edits, nothing else);
* when the response is done, ``Span.finish(end_ns, status, ...)`` completes the record, which
  goes to ``nodeagent.otlp.OtlpExporter.record``. Attributes, the span name and the status
  are derived from the raw fields only when the exporter's thread encodes the span
  (``Span.attributes``, ``Span.name``, ``Span.status``), never on the request path.

Propagation formats (all parse functions take header values as bytes and return a value or
None: malformed input is treated as absent, never raised):

* **W3C Trace Context** (``traceparent``/``tracestate``, Level 1 §3.2-3.3): version ``00``
  is exactly 55 characters of lowercase hex; all-zero trace or parent ids and version ``ff``
  are invalid; a higher version is parsed forward-compatibly (§3.2.4: at least 55
  characters, the first three fields as in ``00``, the flags followed by the end or a
  dash) and re-emitted as ``00``. A repeated ``traceparent`` restarts the trace (the W3C
  test suite's ``test_traceparent_duplicated``). ``tracestate`` is read only with a valid
  ``traceparent`` (the processing model: "if the vendor failed to parse traceparent, it
  MUST NOT attempt to parse tracestate"); repeated headers are combined with commas; at
  most 32 list-members (empty ones skipped), unique keys, key and value grammar of §3.3.1,
  at most ``MAX_TRACESTATE`` (512) characters combined. A valid one is forwarded as
  received; an invalid one is dropped, never repaired.
* **B3** (openzipkin/b3-propagation): multi (``x-b3-traceid`` 16 or 32 lowercase hex,
  ``x-b3-spanid``, ``x-b3-parentspanid``, ``x-b3-sampled`` ``1``/``0`` (also the legacy
  ``true``/``false``), ``x-b3-flags: 1`` = debug) and single ``b3:
  {traceid}-{spanid}[-{1|0|d}[-{parentspanid}]]`` or a lone ``0``/``1``/``d``. The single
  header wins over the multi headers and an invalid single header falls back to them
  (the OpenTelemetry specification's B3 requirements). A sampling decision without ids
  (``b3: 0``, ``x-b3-sampled: 0`` alone) is honoured for a new trace. A 64-bit trace id is
  left-padded to 128 bits and written back to B3 at its width.
* **Precedence**: a valid ``traceparent`` wins over B3. There is no common rule to copy:
  OpenTelemetry's composite propagator runs its propagators in the configured order and a
  later one overrides an earlier one (opentelemetry-python ``propagators/composite.py``:
  "the propagator later in the list will override"), Envoy's OpenTelemetry tracer reads
  ``traceparent`` only (``tracers/opentelemetry/span_context_extractor.cc``), and its
  Zipkin tracer reads B3 first. The mesh exports OTLP, whose model is W3C's (tracestate,
  flags), so the W3C header is the one it trusts; an application that sends both normally
  sends the same ids in both.
* **Injection**: every propagation header is removed from the forwarded request and written
  afresh: ``traceparent`` always (also for an unsampled trace, with flags ``00``, so the
  next hop agrees), the valid ``tracestate`` as received, and the B3 format(s) the request
  came with (``x-b3-sampled`` omitted and ``x-b3-flags: 1`` written for a debug trace).

Sampling (``Sampler``): the parent's decision when the request carries one (W3C flags, B3
sampled or debug); otherwise MeshConfig ``tracing.samplingPercentage`` applied to the low 64
bits of the trace id, exactly as OpenTelemetry's ``TraceIdRatioBased`` (bound =
round(ratio × 2^64)): deterministic, so two proxies that see the same trace decide alike
even when B3 deferred the decision.

Spans (``Span``): kind CLIENT on the source proxy (the outbound listener), SERVER on the
destination proxy; the name is Istio's ``<service host>:<port>/*`` (Envoy's default route
decorator) for HTTP, ``<package.Service>/<Method>`` for gRPC (OpenTelemetry's RPC
convention); attributes with OpenTelemetry's HTTP/RPC semantic conventions
(``http.request.method``, ``url.path`` (never the query), ``server.address``,
``server.port``, ``http.response.status_code``, ``network.protocol.version``,
``rpc.system``/``rpc.service``/``rpc.method``/``rpc.grpc.status_code``) plus Envoy's and
Istio's (``upstream_cluster``, ``guid:x-request-id``, ``istio.canonical_service``,
``istio.canonical_revision``, ``istio.namespace`` of the proxy's own workload) and
hostmesh's (``hostmesh.node``, ``hostmesh.response_flags``, ``hostmesh.peer.*`` of the
other side's workload). Status ERROR on a 5xx, on no response at all (status 0) and on a
gRPC error (any non-OK code on a CLIENT span; on a SERVER span the codes OpenTelemetry
counts as server errors).

The resource (``SpanResource``) is the proxy's own workload, as an Istio sidecar reports
it: ``service.name`` = ``<canonical service>.<namespace>`` (Istio's canonical name and
namespace form; canonical service derived as the metrics do,
``telemetry.workload_labels``), ``service.version`` = canonical revision,
``k8s.namespace.name``, ``hostmesh.workload``, ``host.name`` = the node. A request with no
mesh workload on the proxy's side (a captured host process) gets ``service.name`` =
``hostmesh-agent``.
"""

from __future__ import annotations

import json
import random as _random
import re
from binascii import unhexlify
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from nodeagent.telemetry import workload_labels

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.state import NodeSnapshot, Workload

Headers = list[tuple[bytes, bytes]]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3_SINGLE = b"b3"
X_B3_TRACEID = b"x-b3-traceid"
X_B3_SPANID = b"x-b3-spanid"
X_B3_PARENTSPANID = b"x-b3-parentspanid"
X_B3_SAMPLED = b"x-b3-sampled"
X_B3_FLAGS = b"x-b3-flags"
_B3_MULTI_NAMES = (X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_FLAGS)
# every header the tracer reads and rewrites (removed from a forwarded request, then written afresh)
PROPAGATION_HEADERS = frozenset((TRACEPARENT, TRACESTATE, B3_SINGLE) + _B3_MULTI_NAMES)
_W3C_NAMES = frozenset((TRACEPARENT, TRACESTATE))

MAX_TRACESTATE = 512           # characters of the combined tracestate the mesh forwards
MAX_TRACESTATE_MEMBERS = 32
MAX_PATH_ATTRIBUTE = 1024      # url.path is cut there (bytes)
MAX_NAME = 256                 # span names are cut there
DEFAULT_SERVICE_NAME = "hostmesh-agent"
DEFAULT_OTLP_PORT = 4318       # OTLP/HTTP's registered default
DEFAULT_OTLP_PATH = "/v1/traces"
DEFAULT_SAMPLING_PERCENTAGE = 1.0
DEFAULT_EXPORT_TIMEOUT_S = 2.0

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)

# -- W3C traceparent: version-trace-parent-flags; a higher version may carry more after a dash
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?\Z", re.S)
# -- W3C tracestate list-member (§3.3.1.3): simple-key or tenant@system, "=", value
_TS_KEY = rb"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_TS_VALUE = rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TS_MEMBER = re.compile(rb"(" + _TS_KEY + rb")=" + _TS_VALUE + rb"\Z")
# -- B3
_B3_TRACE_ID = re.compile(rb"[0-9a-f]{32}\Z|[0-9a-f]{16}\Z")
_B3_SPAN_ID = re.compile(rb"[0-9a-f]{16}\Z")
_B3_SINGLE = re.compile(
    rb"(?:([0-9a-f]{32}|[0-9a-f]{16})-([0-9a-f]{16})(?:-([01d])(?:-([0-9a-f]{16}))?)?|([01d]))\Z")
_B3_SAMPLED = {b"1": True, b"0": False, b"true": True, b"false": False}


class SpanKind(IntEnum):
    """OTLP's ``Span.SpanKind`` values."""

    SERVER = 2
    CLIENT = 3


class B3Format(IntEnum):
    """Which B3 encodings a request carried (a bit set): the ones written downstream."""

    NONE = 0
    MULTI = 1
    SINGLE = 2


class Incoming(NamedTuple):
    """What a request's propagation headers say.

    ``trace_id``/``span_id`` are None when only a B3 sampling decision came (``b3: 0``);
    ``sampled`` is None when no decision came (B3 deferred it); ``debug`` is B3's debug flag
    (it implies sampled); ``tracestate`` the valid W3C tracestate as received (b"" when none);
    ``b3`` the B3 encodings to write downstream; ``b3_narrow`` a 64-bit B3 trace id."""

    trace_id: bytes | None
    span_id: bytes | None
    sampled: bool | None
    debug: bool = False
    tracestate: bytes = b""
    b3: int = B3Format.NONE
    b3_narrow: bool = False


class SpanContext(NamedTuple):
    """The context a span hands to the next hop: its trace and own span id and the decision."""

    trace_id: bytes
    span_id: bytes
    sampled: bool
    debug: bool = False
    tracestate: bytes = b""

    @property
    def traceparent(self) -> bytes:
        return ("00-%s-%s-%s" % (self.trace_id.hex(), self.span_id.hex(), "01" if self.sampled else "00")).encode()


# ---------------------------------------------------------------- W3C

def parse_traceparent(value: bytes) -> Incoming | None:
    """A ``traceparent`` value, or None when it is not valid (never raises)."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex = m.group(1, 2, 3, 4)
    if version == b"ff" or (version == b"00" and len(value) != 55):
        return None
    trace_id, span_id = unhexlify(trace_hex), unhexlify(span_hex)
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Incoming(trace_id, span_id, bool(int(flags_hex, 16) & 1))


def parse_tracestate(values: list[bytes]) -> bytes | None:
    """The combined ``tracestate`` of one or more header values when valid, else None."""
    combined = b",".join(values)
    if len(combined) > MAX_TRACESTATE:
        return None
    keys = set()
    for member in combined.split(b","):
        member = member.strip(b" \t")
        if not member:
            continue
        m = _TS_MEMBER.match(member)
        if m is None or m.group(1) in keys:
            return None
        keys.add(m.group(1))
        if len(keys) > MAX_TRACESTATE_MEMBERS:
            return None
    return combined


# ---------------------------------------------------------------- B3

def _b3_ids(trace_hex: bytes, span_hex: bytes, parent_hex: bytes | None) -> tuple[bytes, bytes, bool] | None:
    trace_id = unhexlify(trace_hex).rjust(16, b"\0")
    span_id = unhexlify(span_hex)
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if parent_hex is not None and unhexlify(parent_hex) == _ZERO_SPAN:
        return None
    return trace_id, span_id, len(trace_hex) == 16


def parse_b3_single(value: bytes) -> Incoming | None:
    """A ``b3`` single-header value, or None when it is not valid (never raises)."""
    m = _B3_SINGLE.match(value)
    if m is None:
        return None
    trace_hex, span_hex, state, parent_hex, alone = m.groups()
    if alone is not None:
        return Incoming(None, None, alone != b"0", debug=alone == b"d", b3=B3Format.SINGLE)
    ids = _b3_ids(trace_hex, span_hex, parent_hex)
    if ids is None:
        return None
    sampled = None if state is None else state != b"0"
    return Incoming(ids[0], ids[1], sampled, debug=state == b"d", b3=B3Format.SINGLE, b3_narrow=ids[2])


def parse_b3_multi(trace_hex: bytes | None, span_hex: bytes | None, parent_hex: bytes | None,
                   sampled: bytes | None, flags: bytes | None) -> Incoming | None:
    """The ``x-b3-*`` values (None = absent), or None when they are absent or not valid."""
    debug = flags == b"1"   # "absent or any other value can be ignored"
    decision = None
    if sampled is not None:
        decision = _B3_SAMPLED.get(sampled.lower())
        if decision is None:
            return None
    if debug:
        decision = True
    if trace_hex is None and span_hex is None and parent_hex is None:
        if decision is None:
            return None
        return Incoming(None, None, decision, debug=debug, b3=B3Format.MULTI)
    if trace_hex is None or span_hex is None or not _B3_TRACE_ID.match(trace_hex) \
            or not _B3_SPAN_ID.match(span_hex) or (parent_hex is not None and not _B3_SPAN_ID.match(parent_hex)):
        return None
    ids = _b3_ids(trace_hex, span_hex, parent_hex)
    if ids is None:
        return None
    return Incoming(ids[0], ids[1], decision, debug=debug, b3=B3Format.MULTI, b3_narrow=ids[2])


# ---------------------------------------------------------------- extraction

def extract(headers: Headers) -> Incoming | None:
    """The trace context of a request's headers (lowercase names), or None when it carries
    none that is valid. Never raises."""
    found: dict[bytes, list[bytes]] | None = None
    for name, value in headers:
        if name in PROPAGATION_HEADERS:
            if found is None:
                found = {name: [value]}
            elif name in found:
                found[name].append(value)
            else:
                found[name] = [value]
    if found is None:
        return None
    b3 = None if found.keys() <= _W3C_NAMES else _extract_b3(found)
    tp = found.get(TRACEPARENT)
    w3c = parse_traceparent(tp[0]) if tp is not None and len(tp) == 1 else None
    if w3c is None:
        return b3
    states = found.get(TRACESTATE)
    if states is None and b3 is None:
        return w3c
    tracestate = (parse_tracestate(states) or b"") if states else b""
    return Incoming(w3c.trace_id, w3c.span_id, w3c.sampled, tracestate=tracestate,
                    b3=b3.b3 if b3 is not None else B3Format.NONE,
                    b3_narrow=b3 is not None and b3.b3_narrow and b3.trace_id == w3c.trace_id)


def _one(found: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    """The value of a header that must appear once (repeated = None, like invalid)."""
    values = found.get(name)
    return values[0] if values is not None and len(values) == 1 else None


def _extract_b3(found: dict[bytes, list[bytes]]) -> Incoming | None:
    single_values = found.get(B3_SINGLE)
    single = parse_b3_single(single_values[0]) if single_values and len(single_values) == 1 else None
    if not any(n in found for n in _B3_MULTI_NAMES):
        return single
    if any(len(found.get(n, ())) > 1 for n in _B3_MULTI_NAMES):
        multi = None
    else:
        multi = parse_b3_multi(*(_one(found, n) for n in _B3_MULTI_NAMES))
    if single is None:
        return multi
    if multi is None:
        return single
    # both valid: the single header's context, both encodings written downstream
    return Incoming(single.trace_id, single.span_id, single.sampled, debug=single.debug,
                    b3=B3Format.SINGLE | B3Format.MULTI, b3_narrow=single.b3_narrow)


# ---------------------------------------------------------------- injection

class HeaderEdits(NamedTuple):
    """What to change in a forwarded request's headers: drop ``remove``, append ``add``."""

    remove: frozenset[bytes]
    add: tuple[tuple[bytes, bytes], ...]

    def apply(self, headers: Headers) -> Headers:
        remove = self.remove
        out = [h for h in headers if h[0] not in remove]
        out.extend(self.add)
        return out


def inject(ctx: SpanContext, *, parent_span_id: bytes = b"", b3: int = B3Format.NONE,
           b3_narrow: bool = False) -> HeaderEdits:
    """The headers that hand ``ctx`` to the next hop (``parent_span_id``: the parent of
    ``ctx``'s span, which B3 carries too)."""
    add = [(TRACEPARENT, ctx.traceparent)]
    if ctx.tracestate:
        add.append((TRACESTATE, ctx.tracestate))
    if b3:
        trace_hex = (ctx.trace_id[8:] if b3_narrow else ctx.trace_id).hex().encode()
        span_hex = ctx.span_id.hex().encode()
        parent_hex = parent_span_id.hex().encode() if parent_span_id else b""
        if b3 & B3Format.MULTI:
            add += [(X_B3_TRACEID, trace_hex), (X_B3_SPANID, span_hex)]
            if parent_hex:
                add.append((X_B3_PARENTSPANID, parent_hex))
            # "debug implies an accept decision, so don't also send the X-B3-Sampled header"
            add.append((X_B3_FLAGS, b"1") if ctx.debug else (X_B3_SAMPLED, b"1" if ctx.sampled else b"0"))
        if b3 & B3Format.SINGLE:
            state = b"d" if ctx.debug else b"1" if ctx.sampled else b"0"
            value = b"%s-%s-%s" % (trace_hex, span_hex, state)
            add.append((B3_SINGLE, value + b"-" + parent_hex if parent_hex else value))
    return HeaderEdits(PROPAGATION_HEADERS, tuple(add))


# ---------------------------------------------------------------- sampling

class Sampler:
    """Parent-based, else trace-id ratio (OpenTelemetry's ``ParentBased(TraceIdRatioBased)``)."""

    __slots__ = ("percentage", "_bound")

    def __init__(self, percentage: float) -> None:
        if not 0.0 <= percentage <= 100.0:
            raise ValueError(f"sampling percentage {percentage} is not between 0 and 100")
        self.percentage = percentage
        self._bound = round(percentage / 100.0 * (1 << 64))

    def should_sample(self, parent_sampled: bool | None, trace_id: bytes) -> bool:
        if parent_sampled is not None:
            return parent_sampled
        return int.from_bytes(trace_id[8:16], "big") < self._bound


# ---------------------------------------------------------------- spans

class SpanResource(NamedTuple):
    """Who a span is reported as (the OTLP resource): the proxy's own workload, or the agent."""

    service_name: str = DEFAULT_SERVICE_NAME
    namespace: str = ""
    workload: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    node: str = ""

    def attributes(self) -> list[tuple[str, str]]:
        out = [("service.name", self.service_name)]
        if self.workload:
            out += [("service.version", self.canonical_revision), ("k8s.namespace.name", self.namespace),
                    ("hostmesh.workload", self.workload)]
        if self.node:
            out.append(("host.name", self.node))
        return out


_RESOURCE_ATTR = "_tracing_resource"


def resource_for(workload: "Workload | None", node: str) -> SpanResource:
    """The resource of spans a proxy reports for ``workload`` (None: not a mesh workload),
    memoized on the immutable Workload as ``telemetry.workload_labels`` is."""
    if workload is None:
        return SpanResource(node=node)
    memo = workload.__dict__.get(_RESOURCE_ATTR)
    if memo is None or memo.node != node:
        w = workload_labels(workload)
        memo = SpanResource(f"{w.canonical_service}.{workload.namespace}", workload.namespace, workload.name,
                            w.canonical_service, w.canonical_revision, node)
        object.__setattr__(workload, _RESOURCE_ATTR, memo)
    return memo


class Peer(NamedTuple):
    """The other side's workload, as span attributes (``hostmesh.peer.*``)."""

    workload: str
    namespace: str
    canonical_service: str

    @classmethod
    def of(cls, workload: "Workload") -> "Peer":
        return cls(workload.name, workload.namespace, workload_labels(workload).canonical_service)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# gRPC codes OpenTelemetry counts as errors of the server (rpc semantic conventions)
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})

STATUS_UNSET = 0
STATUS_ERROR = 2


def _text(raw: bytes, limit: int) -> str:
    return raw[:limit].decode("utf-8", "replace")


class Span:
    """One proxied request as seen by one proxy: raw fields set on the request path, turned
    into OTLP's name/attributes/status by the exporter (``name``, ``attributes``, ``status``)."""

    __slots__ = ("trace_id", "span_id", "parent_span_id", "kind", "sampled_flags", "tracestate", "start_ns",
                 "end_ns", "resource", "method", "path", "authority", "protocol", "grpc", "request_id",
                 "status_code", "grpc_status", "response_flags", "upstream_cluster", "service_host",
                 "service_port", "peer")

    def __init__(self, trace_id: bytes, span_id: bytes, parent_span_id: bytes, kind: SpanKind, start_ns: int, *,
                 resource: SpanResource, tracestate: bytes = b"", method: bytes = b"", path: bytes = b"",
                 authority: bytes = b"", protocol: str = "1.1", grpc: bool = False, request_id: bytes = b"") -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.kind = kind
        self.sampled_flags = 1
        self.tracestate = tracestate
        self.start_ns = start_ns
        self.end_ns = start_ns
        self.resource = resource
        self.method = method
        self.path = path
        self.authority = authority
        self.protocol = protocol
        self.grpc = grpc
        self.request_id = request_id
        self.status_code = 0
        self.grpc_status: int | None = None
        self.response_flags = "-"
        self.upstream_cluster = ""
        self.service_host = ""
        self.service_port = 0
        self.peer: Peer | None = None

    def finish(self, end_ns: int, status_code: int, *, response_flags: str = "-", grpc_status: int | None = None,
               upstream_cluster: str = "", service_host: str = "", service_port: int = 0,
               peer: Peer | None = None) -> "Span":
        """Complete the record when the response is done (``status_code`` 0: none was sent);
        ``service_host``/``service_port``: the destination Service (the span name)."""
        self.end_ns = max(end_ns, self.start_ns)
        self.status_code = status_code
        self.response_flags = response_flags
        self.grpc_status = grpc_status
        self.upstream_cluster = upstream_cluster
        self.service_host = service_host
        self.service_port = service_port
        self.peer = peer
        return self

    # -- derived, off the request path

    def _path_only(self) -> bytes:
        path = self.path
        cut = path.find(b"?")
        return path if cut < 0 else path[:cut]

    def _host_port(self) -> tuple[str, int]:
        """The authority's host and port (0 when it has none)."""
        authority = self.authority
        if authority.startswith(b"["):   # an IPv6 literal: [::1]:8080
            end = authority.find(b"]")
            host, rest = (authority, b"") if end < 0 else (authority[:end + 1], authority[end + 1:])
            port = rest[1:] if rest.startswith(b":") else b""
        else:
            host, _, port = authority.partition(b":")
        if port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535:
            return _text(host, 255), int(port)
        return _text(host, 255), 0

    def name(self) -> str:
        if self.grpc:
            path = self._path_only()
            if path.startswith(b"/") and path.count(b"/") == 2:
                return _text(path[1:], MAX_NAME)
        if self.service_host:
            return f"{self.service_host}:{self.service_port}/*"[:MAX_NAME]
        host, port = self._host_port()
        return (f"{host}:{port}/*" if port else f"{host}/*")[:MAX_NAME]

    def attributes(self) -> list[tuple[str, str | int]]:
        method = self.method.decode("latin-1")
        out: list[tuple[str, str | int]] = []
        if method in _METHODS:
            out.append(("http.request.method", method))
        elif method:
            out += [("http.request.method", "_OTHER"), ("http.request.method_original", method[:64])]
        out.append(("url.path", _text(self._path_only(), MAX_PATH_ATTRIBUTE)))
        host, port = self._host_port()
        if host:
            out.append(("server.address", host))
        if port:
            out.append(("server.port", port))
        out.append(("network.protocol.version", self.protocol))
        if self.status_code:
            out.append(("http.response.status_code", self.status_code))
        if self.grpc:
            out.append(("rpc.system", "grpc"))
            path = self._path_only()
            if path.startswith(b"/") and path.count(b"/") == 2:
                service, _, rpc_method = path[1:].partition(b"/")
                out += [("rpc.service", _text(service, MAX_NAME)), ("rpc.method", _text(rpc_method, MAX_NAME))]
            if self.grpc_status is not None:
                out.append(("rpc.grpc.status_code", self.grpc_status))
        if self.upstream_cluster:
            out.append(("upstream_cluster", self.upstream_cluster))
        if self.request_id:
            out.append(("guid:x-request-id", _text(self.request_id, 128)))
        out.append(("hostmesh.response_flags", self.response_flags))
        r = self.resource
        if r.node:
            out.append(("hostmesh.node", r.node))
        if r.workload:
            out += [("istio.canonical_service", r.canonical_service),
                    ("istio.canonical_revision", r.canonical_revision), ("istio.namespace", r.namespace)]
        if self.peer is not None:
            out += [("hostmesh.peer.workload", self.peer.workload), ("hostmesh.peer.namespace", self.peer.namespace),
                    ("hostmesh.peer.canonical_service", self.peer.canonical_service)]
        return out

    def status(self) -> tuple[int, str]:
        """(OTLP status code, message): ERROR on 5xx, no response, or a gRPC error."""
        code = self.status_code
        if code == 0 or code >= 500:
            flags = "" if self.response_flags == "-" else f" ({self.response_flags})"
            return STATUS_ERROR, (f"HTTP {code}{flags}" if code else f"no response{flags}")
        g = self.grpc_status
        if g is not None and g != 0 and (self.kind == SpanKind.CLIENT or g in _GRPC_SERVER_ERRORS):
            return STATUS_ERROR, f"gRPC status {g}"
        return STATUS_UNSET, ""


# ---------------------------------------------------------------- the tracer

class Started(NamedTuple):
    """A request's tracing decision: ``context`` (the new span's, sent to the next hop),
    ``edits`` (apply them to the forwarded headers), ``span`` (None when not sampled),
    ``parent_span_id`` (b"" at the root of a trace)."""

    context: SpanContext
    edits: HeaderEdits
    span: Span | None
    parent_span_id: bytes


class Tracer:
    """One per proxy process: the sampler and the id source (an injected ``random.Random``;
    ids need to be unique, not secret, and ``getrandbits`` costs a fraction of a syscall)."""

    __slots__ = ("sampler", "_rand")

    def __init__(self, sampler: Sampler, rand: _random.Random | None = None) -> None:
        self.sampler = sampler
        self._rand = rand if rand is not None else _random.Random()

    def _id(self, bits: int) -> bytes:
        while True:
            value = self._rand.getrandbits(bits)
            if value:
                return value.to_bytes(bits // 8, "big")

    def start(self, kind: SpanKind, headers: Headers, start_ns: int, *, resource: SpanResource,
              method: bytes = b"", path: bytes = b"", authority: bytes = b"", protocol: str = "1.1",
              grpc: bool = False, request_id: bytes = b"") -> Started:
        """The decision for a request arriving with ``headers``: its span is a child of the
        context they carry, or the root of a new trace."""
        inc = extract(headers)
        if inc is None:
            trace_id, parent, sampled = self._id(128), b"", None
            debug, tracestate, b3, narrow = False, b"", B3Format.NONE, False
        else:
            trace_id, parent, sampled = inc.trace_id, inc.span_id or b"", inc.sampled
            debug, tracestate, b3, narrow = inc.debug, inc.tracestate, inc.b3, inc.b3_narrow
            if trace_id is None:   # a B3 sampling decision without ids: a new trace that keeps it
                trace_id = self._id(128)
        sampled = True if debug else self.sampler.should_sample(sampled, trace_id)
        ctx = SpanContext(trace_id, self._id(64), sampled, debug, tracestate)
        edits = inject(ctx, parent_span_id=parent, b3=b3, b3_narrow=narrow)
        span = None
        if sampled:
            span = Span(trace_id, ctx.span_id, parent, kind, start_ns, resource=resource, tracestate=tracestate,
                        method=method, path=path, authority=authority, protocol=protocol, grpc=grpc,
                        request_id=request_id)
        return Started(ctx, edits, span, parent)


# ---------------------------------------------------------------- configuration

class OtlpEndpoint(NamedTuple):
    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_IPV4 = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}\Z")
_URL_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]*)+\Z")


def parse_otlp_endpoint(text: str) -> OtlpEndpoint:
    """``http://<host>[:<port>][<path>]``: an IPv4 address or a DNS name, port 4318 and path
    ``/v1/traces`` by default (as OTEL_EXPORTER_OTLP_ENDPOINT). ValueError says what is wrong
    (worded to follow the field's path: the control plane reports it as is)."""
    if not isinstance(text, str):
        raise ValueError("must be a string")
    shown = json.dumps(text)
    if text.startswith("https://"):
        raise ValueError("https:// is not supported yet: the exporter speaks plain HTTP (http://host:port)")
    if not text.startswith("http://"):
        raise ValueError(f"{shown} is not an http:// URL (like http://otel-collector.observability:4318)")
    rest = text[len("http://"):]
    slash = rest.find("/")
    hostport, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if any(c in text for c in "?#"):
        raise ValueError(f"{shown} must not have a query or a fragment")
    if "@" in hostport:
        raise ValueError(f"{shown} must not carry user information")
    if hostport.startswith("["):
        raise ValueError(f"{shown}: IPv6 addresses are not supported (IPv4 only)")
    host, sep, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"{shown} has no host")
    port = DEFAULT_OTLP_PORT
    if sep:
        if not port_text.isdigit() or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{shown}: the port {json.dumps(port_text)} is not a valid port (1-65535)")
        port = int(port_text)
    if _IPV4.match(host):
        if any(int(part) > 255 for part in host.split(".")):
            raise ValueError(f"{shown}: {json.dumps(host)} is not an IPv4 address")
    elif len(host) > 253 or not all(_DNS_LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"{shown}: {json.dumps(host)} is not an IPv4 address or a lowercase DNS name")
    if path in ("", "/"):
        path = DEFAULT_OTLP_PATH
    elif len(path) > 1024 or not _URL_PATH.match(path):
        raise ValueError(f"{shown}: the path {json.dumps(path)} is not a valid URL path")
    return OtlpEndpoint(host, port, path)


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """MeshConfig ``tracing``: the sampling percentage and where spans go."""

    sampling_percentage: float
    endpoint: OtlpEndpoint
    timeout_s: float = DEFAULT_EXPORT_TIMEOUT_S


def tracing_config(spec: dict) -> TracingConfig | None:
    """A MeshConfig spec's ``tracing`` (None: absent, tracing off). ValueError when malformed
    (the control plane refuses such config; an agent keeps tracing off)."""
    from nodeagent.proxy.l7.routing import parse_duration
    section = spec.get("tracing")
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("otlp"), dict):
        raise ValueError("tracing.otlp is missing")
    pct = section.get("samplingPercentage", DEFAULT_SAMPLING_PERCENTAGE)
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100:
        raise ValueError(f"tracing.samplingPercentage {pct!r} is not between 0 and 100")
    otlp = section["otlp"]
    timeout = otlp.get("timeout")
    return TracingConfig(float(pct), parse_otlp_endpoint(otlp.get("endpoint")),
                         parse_duration(timeout) if timeout is not None else DEFAULT_EXPORT_TIMEOUT_S)


def tracing_config_of(snapshot: "NodeSnapshot") -> TracingConfig | None:
    """The snapshot's MeshConfig ``tracing`` (None: absent or unreadable, tracing off)."""
    for obj in snapshot.config:
        if obj.kind == "MeshConfig":
            try:
                return tracing_config(json.loads(obj.spec) or {})
            except (ValueError, AttributeError, TypeError):
                return None
    return None
