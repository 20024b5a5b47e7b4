"""L7 routing decisions from Gateway API HTTPRoute / GRPCRoute (GAMMA): plain code, no I/O.

Build once per snapshot, match per request::

    table = RouteTable.from_snapshot(snapshot, rand=rng)      # O(routes x matches), once
    d = table.match(RequestInfo(b"GET", b"/api?x=1", headers, b"web.shop:80",
                                dst_ip=vip, dst_port=80, source_namespace="apps"))
    # RouteDecision -> forward to d.backend (pick an endpoint with lb.LbState.get(d.backend)),
    #                  apply d.rewrite_request(...) / d.rewrite_response_headers(...),
    #                  send copies to d.mirrors (fire and forget), honour d.timeouts
    # DirectResponse -> answer locally: a redirect (``location`` set) or an error
    #                  (status, flag, message; gRPC: grpc_status). NoRoute is one (404, NR).

A connection keeps the router of its destination: ``router = table.router_for(vip, port)``
once per connection, then ``router.match(request)`` per request.

Attachment (GEP-1294 "xRoutes Mesh Binding", Gateway API v1):

* A route attaches through a ``parentRef`` of ``kind: Service`` (``group`` "" or "core"); the
  parentRef ``namespace`` defaults to the route's. ``port`` restricts the attachment to that
  Service port, ``sectionName`` to the port of that name (both given: both must agree);
  neither: every port of the Service. Other parent kinds (Gateway, the default) are not
  for the mesh and are ignored. ``hostnames`` is ignored, as GEP-1294 says GAMMA
  implementations should.
* Producer routes (route namespace == Service namespace) apply to every client; consumer
  routes (another namespace) only to clients in the route's namespace, and for those
  clients they replace the producer routes (``RequestInfo.source_namespace`` selects).
* If GRPCRoutes and HTTPRoutes attach to the same Service port (and group), only the
  GRPCRoutes apply (GEP-1294 "Route types": GRPCRoute > HTTPRoute).
* No route attached: the **default route** — the Service itself, plain L7 proxying.
  Routes attached but none matches: ``NoRoute`` (404, flag ``NR``; gRPC UNIMPLEMENTED),
  per the spec ("requests that do not match at least one of the Routes will be rejected").

Matching (``HTTPRouteRule.matches``): a rule matches if any of its matches does; a match
ANDs its path, method, headers and query params. Defaults: no matches / no path ->
``PathPrefix /``; header and query matches default to ``Exact``. Header names are
case-insensitive (a repeated header is matched on its values joined with ``,``, RFC 9110
5.3); query param names are exact, the first value of a repeated param counts, values are
percent-decoded. Within one match only the first entry of a header/param name counts.
Paths are matched as received (the query and fragment removed, no percent-decoding or
dot-segment normalization — that belongs to the codec). ``RegularExpression`` uses
Python's ``re`` on bytes and must match the whole value (``fullmatch``, as Envoy's RE2
matchers do).

Precedence (compiled once into one sorted list per Service port, first match wins):

1. ``Exact`` path, then ``PathPrefix`` by number of characters (the trailing ``/`` does
   not count: ``/foo/`` and ``/foo`` match the same paths), then ``RegularExpression``
   (longer pattern first). Regex precedence is implementation-specific; this is Istio's
   order (Exact > Prefix > Regex).
2. a method match; 3. more header matches; 4. more query param matches;
5. across routes: the oldest (``ConfigObject.creation_timestamp`` when the control plane
   provides one), then ``{namespace}/{name}`` alphabetically; 6. within a route, the first
   rule in list order (then the first match).

GRPCRoute: the ``:path`` ``/pkg.Service/Method`` is split into service and method;
``method.type`` Exact (default) or RegularExpression on each given part; a match without
``method`` matches every request. Precedence: more characters of service, then of method,
then more header matches, then the route/rule order above.

Backends (``backendRefs``): ``weight`` defaults to 1; weight 0 is never chosen; the choice
is ``rand() * total`` on the cumulative weights (O(log backends)). A backendRef that is not
a Service, names a Service or port that does not exist gets its share of requests answered
with 500 (flag ``NC``; gRPC UNAVAILABLE), as the spec requires; so does a rule with no
(non-zero) backendRefs and no redirect. Cross-namespace backendRefs are allowed (mesh
routes need no ReferenceGrant, GEP-1294). A backendRef without ``port`` uses the parent's
Service port. Filters: see ``filters.py``; rule filters apply before backendRef filters.

Timeouts: ``rules[].timeouts.request`` / ``backendRequest`` (GEP-2257 durations, e.g.
``1h30m``, ``500ms``) in seconds; ``0.0`` means disabled (the spec's zero duration);
``None`` means unset. When a rule (or the default route) sets no request timeout, the
``timeout`` of the TrafficPolicy targeting the called Service is used.

Mirrors: ``RequestMirror`` targets resolve to ``Backend`` objects at compile time (an
unknown target is dropped, as the spec says); mirrors without ``percent``/``fraction``
are baked into the decision, sampled ones are drawn per request with ``rand``.

Cost per request: one dict lookup for the router, then the exact-path dict, then one
bucket of the precompiled entries (by first path element / gRPC service, see ``RouteSet``)
scanned in precedence order up to the first match: O(entries that could match), with
the path test inlined. Header and query maps are built lazily, once, and only if an entry
needs them. The common outcome (one backend, no sampled mirror) is a precomputed,
immutable ``RouteDecision``: matching allocates nothing else. Redirects build their
``Location`` per request.
"""

from __future__ import annotations

import bisect
import json
import random as _random
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

from nodeagent.proxy.destinations import service_endpoints
from nodeagent.proxy.l7.filters import (EMPTY_CHAIN, REPLACE_PREFIX_MATCH, WELL_KNOWN_PORTS, DirectResponse,
                                        FilterChain, MirrorSpec, RequestRedirect, split_authority,
                                        split_target)
from nodeagent.proxy.l7.lb import DEFAULT_LB, LbConfig
from nodeagent.state import unhealthy_endpoints
from nodeagent.proxy.l7.resilience import FaultPolicy
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort

HTTP_ROUTE = "HTTPRoute"
GRPC_ROUTE = "GRPCRoute"
TRAFFIC_POLICY = "TrafficPolicy"
FAULT_INJECTION = "FaultInjection"

GRPC_UNIMPLEMENTED = 12
GRPC_UNAVAILABLE = 14

_CORE_GROUPS = ("", "core")

Headers = list[tuple[bytes, bytes]]


# ------------------------------------------------------------------ values

def parse_duration(value: Any) -> float:
    """Seconds of a Gateway API duration (GEP-2257: ``1h``, ``30m``, ``10s``, ``500ms``, ``1h30m``).

    Fractions (``1.5s``) are accepted too. Raises ``ValueError`` for anything else.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    s = str(value).strip()
    if not s or not _DURATION_FULL.fullmatch(s):
        raise ValueError(f"invalid duration {value!r}")
    return sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(s))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:h|ms|m|s))+")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; ``None`` = not configured, ``0.0`` = explicitly disabled."""

    request: float | None = None
    backend_request: float | None = None


NO_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True)
class RouteRef:
    """Which route rule decided: kind, namespace/name, rule index (and name, if any)."""

    kind: str
    namespace: str
    name: str
    rule: int
    rule_name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}#{self.rule_name or self.rule}"


@dataclass(frozen=True, slots=True, eq=False)
class Backend:
    """A resolved backendRef: a Service port, its endpoints (``service_endpoints``) and the
    load-balancing config of the TrafficPolicy targeting that Service. Shared per snapshot."""

    service: Service
    port: ServicePort
    endpoints: tuple[Endpoint, ...]
    lb: LbConfig = DEFAULT_LB
    # endpoint keys failing active health checks (the snapshot's EndpointHealth objects)
    failing: frozenset = frozenset()

    @property
    def key(self) -> tuple[str, str, int]:
        """The ``LbState`` key: (namespace, name, service port)."""
        return (self.service.namespace, self.service.name, self.port.port)

    @property
    def hostname(self) -> str:
        return self.service.hostname

    def __repr__(self) -> str:
        return f"Backend({self.service.namespace}/{self.service.name}:{self.port.port})"


@dataclass(frozen=True, slots=True, eq=False)
class RouteDecision:
    """Forward the request.

    ``service``/``port``: the Service port the client called (the parent).
    ``backend``: where to send it (pick the endpoint with ``LbState.get(backend)``).
    ``route``: the rule that matched (``None`` for the default route).
    ``filters``: apply with ``rewrite_request`` / ``rewrite_response_headers``.
    ``mirrors``: backends to send a copy to (fire and forget; one endpoint each).
    ``timeouts``: see ``Timeouts``. ``matched_prefix``: the PathPrefix that matched.
    """

    service: Service
    port: ServicePort
    backend: Backend
    route: RouteRef | None = None
    filters: FilterChain = EMPTY_CHAIN
    mirrors: tuple[Backend, ...] = ()
    timeouts: Timeouts = NO_TIMEOUTS
    matched_prefix: bytes | None = None
    # mirrors that fire for a share of requests: drawn per request by the router
    sampled_mirrors: tuple[tuple[Backend, float], ...] = field(default=(), repr=False)

    @property
    def is_default(self) -> bool:
        return self.route is None

    def rewrite_request(self, target: bytes, authority: bytes,
                        headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bytes, Headers]:
        """``(target, authority, headers)`` after RequestHeaderModifier/URLRewrite filters.

        Returns the inputs unchanged (the same list) when there is nothing to apply.
        """
        if not self.filters.request_ops:
            return target, authority, headers if isinstance(headers, list) else list(headers)
        return self.filters.apply_request(target, authority, headers, self.matched_prefix)

    def rewrite_response_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
        if not self.filters.response_ops:
            return headers if isinstance(headers, list) else list(headers)
        return self.filters.apply_response(headers)


@dataclass(frozen=True, slots=True)
class NoRoute(DirectResponse):
    """No route matched (or no Service is known for the destination): 404, flag NR."""


NO_ROUTE = NoRoute(404, "NR", "no route", GRPC_UNIMPLEMENTED)
UNKNOWN_SERVICE = NoRoute(404, "NR", "unknown service", GRPC_UNIMPLEMENTED)


def backend_error(message: str) -> DirectResponse:
    """The 500 a request gets when its share of traffic goes to an invalid backendRef."""
    return DirectResponse(500, "NC", message, GRPC_UNAVAILABLE)


class RequestInfo:
    """What routing needs of a request. Bytes as the codec delivers them (``str`` is accepted
    and encoded; header names are then lowercased).

    ``path`` is the raw request-target (with query); ``headers`` a list of (name, value)
    pairs with lowercase names; ``authority`` the Host / :authority. ``dst_ip``/``dst_port``:
    the original destination (the Service VIP), preferred over ``authority`` to find the
    Service. ``source_namespace``: the client's namespace (consumer routes).
    ``source_ip``: for ring-hash on source IP. ``scheme``: for redirects. ``is_grpc`` is for
    the driver (render a ``DirectResponse`` in its gRPC form); matching does not depend on
    it — which route kind applies is decided per Service port (GRPCRoute > HTTPRoute).
    Derived values (path without query, header map, query map) are computed lazily, once.
    """

    __slots__ = ("method", "path", "headers", "authority", "is_grpc", "scheme", "source_namespace",
                 "source_ip", "dst_ip", "dst_port", "_split", "_hmap", "_qmap", "_grpc")

    def __init__(self, method: bytes | str, path: bytes | str,
                 headers: Sequence[tuple[bytes, bytes]] | Sequence[tuple[str, str]] = (),
                 authority: bytes | str = b"", is_grpc: bool = False, *, scheme: bytes | str = b"http",
                 source_namespace: str = "", source_ip: str = "", dst_ip: str = "", dst_port: int = 0) -> None:
        self.method = method if type(method) is bytes else method.encode()
        self.path = path if type(path) is bytes else path.encode()
        if headers and type(headers[0][0]) is str:
            headers = [(n.lower().encode(), v.encode() if type(v) is str else v) for n, v in headers]
        self.headers = headers
        self.authority = authority if type(authority) is bytes else authority.encode()
        self.is_grpc = is_grpc
        self.scheme = scheme if type(scheme) is bytes else scheme.encode()
        self.source_namespace = source_namespace
        self.source_ip = source_ip
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self._split: tuple[bytes, bytes] | None = None
        self._hmap: dict[bytes, bytes] | None = None
        self._qmap: dict[bytes, bytes] | None = None
        self._grpc: tuple[bytes, bytes] | None = None

    @property
    def path_only(self) -> bytes:
        s = self._split
        if s is None:
            s = self._split = split_target(self.path)
        return s[0]

    @property
    def query(self) -> bytes:
        s = self._split
        if s is None:
            s = self._split = split_target(self.path)
        return s[1]

    def header(self, name: bytes) -> bytes | None:
        """All values of header ``name`` (lowercase) joined with ``,``; ``None`` if absent."""
        m = self._hmap
        if m is None:
            m = {}
            for n, v in self.headers:
                old = m.get(n)
                m[n] = v if old is None else old + b"," + v
            self._hmap = m
        return m.get(name)

    def query_param(self, name: bytes) -> bytes | None:
        """The first value of query parameter ``name`` (percent-decoded); ``None`` if absent."""
        m = self._qmap
        if m is None:
            m = {}
            q = self.query
            if q:
                for part in q.split(b"&"):
                    if not part:
                        continue
                    k, _, v = part.partition(b"=")
                    if b"%" in k:
                        k = unquote_to_bytes(k)
                    if k not in m:
                        m[k] = unquote_to_bytes(v) if b"%" in v else v
            self._qmap = m
        return m.get(name)

    def grpc_method(self) -> tuple[bytes, bytes]:
        """``(service, method)`` of a ``/pkg.Service/Method`` path; ``(b"", b"")`` otherwise."""
        g = self._grpc
        if g is None:
            p = self.path_only
            svc, sep, meth = p[1:].partition(b"/")
            if p[:1] == b"/" and sep and svc and meth and b"/" not in meth:
                g = (svc, meth)
            else:
                g = (b"", b"")
            self._grpc = g
        return g

    def __repr__(self) -> str:
        return f"RequestInfo({self.method!r}, {self.path!r}, authority={self.authority!r})"


# ------------------------------------------------------------------ compiled matches

_EXACT, _PREFIX, _REGEX = 0, 1, 2
_PATH_KINDS = {"Exact": _EXACT, "PathPrefix": _PREFIX, "RegularExpression": _REGEX}


class _Redirect:
    """An outcome that answers with a redirect (the Location depends on the request)."""

    __slots__ = ("redirect", "prefix")

    def __init__(self, redirect: RequestRedirect, prefix: bytes | None) -> None:
        self.redirect = redirect
        self.prefix = prefix


class _Outcomes:
    """The weighted outcomes of one (rule, match): RouteDecision | DirectResponse | _Redirect."""

    __slots__ = ("items", "cum", "total")

    def __init__(self, items: list[tuple[int, Any]]) -> None:
        self.items = tuple(o for _, o in items)
        cum, t = [], 0
        for w, _ in items:
            t += w
            cum.append(t)
        self.cum = tuple(cum)
        self.total = t

    def choose(self, rand: Callable[[], float]) -> Any:
        items = self.items
        if len(items) == 1:
            return items[0]
        i = bisect.bisect_right(self.cum, rand() * self.total)
        return items[i if i < len(items) else -1]


def _value_matchers(entries: Any, *, lower: bool, where: str) -> tuple[tuple[bytes, bytes | None, Any], ...]:
    """Header / query-param matchers: (name, exact value or None, compiled regex or None)."""
    out = []
    seen: set[bytes] = set()
    for e in entries or ():
        name = str(e["name"])
        nb = (name.lower() if lower else name).encode()
        if nb in seen:  # only the first entry of a name counts
            continue
        seen.add(nb)
        value = str(e.get("value", "")).encode()
        kind = e.get("type", "Exact")
        if kind == "Exact":
            out.append((nb, value, None))
        elif kind == "RegularExpression":
            out.append((nb, None, _compile_regex(value, where)))
        else:
            raise ValueError(f"{where}: unsupported match type {kind!r}")
    return tuple(out)


def _compile_regex(pattern: bytes, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regular expression {pattern!r}: {exc}") from None


def _values_match(matchers, get) -> bool:
    for name, exact, rx in matchers:
        v = get(name)
        if v is None:
            return False
        if rx is None:
            if v != exact:
                return False
        elif rx.fullmatch(v) is None:
            return False
    return True


class _HttpEntry:
    """One HTTPRouteMatch of one rule, compiled."""

    __slots__ = ("key", "kind", "path", "path_slash", "path_re", "method", "headers", "query",
                 "prefix", "outcomes", "ref")

    def __init__(self, m: Mapping[str, Any], where: str) -> None:
        pm = m.get("path") or {}
        self.kind = _PATH_KINDS.get(pm.get("type", "PathPrefix"))
        if self.kind is None:
            raise ValueError(f"{where}: unsupported path match type {pm.get('type')!r}")
        value = str(pm.get("value", "/")).encode()
        self.path_re = None
        self.prefix = None
        if self.kind == _PREFIX:
            self.path = value.rstrip(b"/")
            self.path_slash = self.path + b"/"
            self.prefix = value
        else:
            self.path = value
            self.path_slash = b""
            if self.kind == _REGEX:
                self.path_re = _compile_regex(value, where)
        method = m.get("method")
        self.method = str(method).upper().encode() if method else None
        self.headers = _value_matchers(m.get("headers"), lower=True, where=where)
        self.query = _value_matchers(m.get("queryParams"), lower=False, where=where)
        self.outcomes: _Outcomes | None = None
        self.ref: RouteRef | None = None

    def precedence(self) -> tuple:
        plen = len(self.path) if self.kind != _EXACT else 0
        return (self.kind, -plen, 0 if self.method else 1, -len(self.headers), -len(self.query))

    def matches_rest(self, req: RequestInfo) -> bool:
        if self.method is not None and req.method != self.method:
            return False
        if self.headers and not _values_match(self.headers, req.header):
            return False
        if self.query and not _values_match(self.query, req.query_param):
            return False
        return True

    def describe(self) -> dict[str, Any]:
        kind = {v: k for k, v in _PATH_KINDS.items()}[self.kind]
        out: dict[str, Any] = {"path": {"type": kind, "value": (self.prefix if self.kind == _PREFIX
                                                                 else self.path).decode()}}
        if self.method:
            out["method"] = self.method.decode()
        if self.headers:
            out["headers"] = [n.decode() for n, _, _ in self.headers]
        if self.query:
            out["queryParams"] = [n.decode() for n, _, _ in self.query]
        return out


class _GrpcEntry:
    """One GRPCRouteMatch of one rule, compiled."""

    __slots__ = ("key", "service", "service_re", "method", "method_re", "headers", "prefix", "outcomes", "ref")

    def __init__(self, m: Mapping[str, Any], where: str) -> None:
        mm = m.get("method") or {}
        kind = mm.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            raise ValueError(f"{where}: unsupported method match type {kind!r}")
        svc = mm.get("service") or None
        meth = mm.get("method") or None
        self.service = str(svc).encode() if svc else None
        self.method = str(meth).encode() if meth else None
        rx = kind == "RegularExpression"
        self.service_re = _compile_regex(self.service, where) if rx and self.service else None
        self.method_re = _compile_regex(self.method, where) if rx and self.method else None
        self.headers = _value_matchers(m.get("headers"), lower=True, where=where)
        self.prefix = None
        self.outcomes: _Outcomes | None = None
        self.ref: RouteRef | None = None

    def precedence(self) -> tuple:
        return (-len(self.service or b""), -len(self.method or b""), -len(self.headers))

    def matches(self, req: RequestInfo) -> bool:
        if self.service is not None or self.method is not None:
            svc, meth = req.grpc_method()
            if not svc:
                return False
            if self.service is not None:
                if self.service_re is None:
                    if svc != self.service:
                        return False
                elif self.service_re.fullmatch(svc) is None:
                    return False
            if self.method is not None:
                if self.method_re is None:
                    if meth != self.method:
                        return False
                elif self.method_re.fullmatch(meth) is None:
                    return False
        if self.headers and not _values_match(self.headers, req.header):
            return False
        return True

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.service or self.method:
            out["method"] = {"type": "RegularExpression" if (self.service_re or self.method_re) else "Exact",
                             **({"service": self.service.decode()} if self.service else {}),
                             **({"method": self.method.decode()} if self.method else {})}
        if self.headers:
            out["headers"] = [n.decode() for n, _, _ in self.headers]
        return out


def _first_segment(path: bytes) -> bytes:
    i = path.find(b"/", 1)
    return path[1:i] if i > 0 else path[1:]


class RouteSet:
    """The merged, precedence-sorted matches of the routes of one kind attached to one
    Service port for one group (producer, or the consumers of one namespace).

    Index: HTTP ``Exact`` entries by path; the other HTTP entries by the first path element
    of their ``PathPrefix`` (element-wise matching means ``/a/b`` can only match paths whose
    first element is ``a``), GRPC entries by their ``Exact`` service; entries that can match
    anything (``PathPrefix /``, regexes, no service) are in every bucket. Each bucket keeps the
    global precedence order, so ``find`` scans one short list and stops at the first hit.
    """

    __slots__ = ("kind", "entries", "exact", "buckets", "wild", "routes")

    def __init__(self, kind: str, entries: list, routes: Sequence[str]) -> None:
        entries.sort(key=lambda e: e.key)
        self.kind = kind
        self.entries = tuple(entries)
        self.routes = tuple(routes)
        exact: dict[bytes, list] = {}
        keyed: list[tuple[bytes | None, Any]] = []
        for e in entries:
            if kind == HTTP_ROUTE and e.kind == _EXACT:
                exact.setdefault(e.path, []).append(e)
            elif kind == HTTP_ROUTE:
                keyed.append((_first_segment(e.path) if e.kind == _PREFIX and e.path else None, e))
            else:
                keyed.append((e.service if e.service is not None and e.service_re is None else None, e))
        self.exact = {k: tuple(v) for k, v in exact.items()}
        names = {k for k, _ in keyed if k is not None}
        self.buckets = {n: tuple(e for k, e in keyed if k is None or k == n) for n in names}
        self.wild = tuple(e for k, e in keyed if k is None)

    def find(self, req: RequestInfo):
        """The first entry matching ``req`` in precedence order, or ``None``.

        O(entries of one bucket); the path test is inlined (no call per skipped entry).
        """
        if self.kind == GRPC_ROUTE:
            for e in self.buckets.get(req.grpc_method()[0], self.wild) if self.buckets else self.wild:
                if e.matches(req):
                    return e
            return None
        p = req.path_only
        if self.exact:
            cand = self.exact.get(p)
            if cand:
                for e in cand:
                    if e.matches_rest(req):
                        return e
        for e in self.buckets.get(_first_segment(p), self.wild) if self.buckets else self.wild:
            k = e.kind
            if k == _PREFIX:
                ep = e.path
                if ep and p != ep and not p.startswith(e.path_slash):
                    continue
            elif e.path_re.fullmatch(p) is None:
                continue
            if e.method is None and not e.headers and not e.query:
                return e
            if e.matches_rest(req):
                return e
        return None


class ServiceRouter:
    """Routing for one Service port: ``match(request)`` is the per-request call."""

    __slots__ = ("service", "port", "default", "producer", "consumers", "_rand", "_authority")

    def __init__(self, service: Service, port: ServicePort, default: RouteDecision,
                 producer: RouteSet | None, consumers: dict[str, RouteSet], rand: Callable[[], float]) -> None:
        self.service = service
        self.port = port
        self.default = default
        self.producer = producer
        self.consumers = consumers
        self._rand = rand
        self._authority = service.hostname.encode() + (b"" if port.port == 80 else b":%d" % port.port)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.service.namespace, self.service.name, self.port.port)

    def routes_for(self, source_namespace: str = "") -> RouteSet | None:
        """The routes that apply to a client in ``source_namespace`` (None: default route)."""
        if self.consumers:
            rs = self.consumers.get(source_namespace)
            if rs is not None:
                return rs
        return self.producer

    def match(self, req: RequestInfo) -> RouteDecision | DirectResponse:
        rs = self.producer
        if self.consumers:
            rs = self.consumers.get(req.source_namespace, rs)
        if rs is None:
            return self.default
        entry = rs.find(req)
        if entry is None:
            return NO_ROUTE
        out = entry.outcomes.choose(self._rand)
        t = type(out)
        if t is RouteDecision:
            if out.sampled_mirrors:
                rand = self._rand
                fired = tuple(b for b, p in out.sampled_mirrors if rand() < p)
                if fired:
                    return replace(out, mirrors=out.mirrors + fired)
            return out
        if t is _Redirect:
            return out.redirect.response(scheme=req.scheme, authority=req.authority or self._authority,
                                         target=req.path, listener_port=self.port.port,
                                         matched_prefix=out.prefix)
        return out

    def describe(self) -> dict[str, Any]:
        def rs_desc(rs: RouteSet | None):
            if rs is None:
                return None
            return {"kind": rs.kind, "routes": list(rs.routes),
                    "matches": [{"route": str(e.ref), **e.describe()} for e in rs.entries]}
        return {
            "service": self.service.hostname, "port": self.port.port,
            "default_backend": None if (self.producer or self.consumers) else repr(self.default.backend),
            "producer": rs_desc(self.producer),
            "consumers": {ns: rs_desc(rs) for ns, rs in sorted(self.consumers.items())},
        }


# ------------------------------------------------------------------ the table

def _rand_fn(rand: Any) -> Callable[[], float]:
    if rand is None:
        return _random.Random().random
    return rand.random if hasattr(rand, "random") else rand


def _age_key(obj: ConfigObject) -> tuple:
    ts = getattr(obj, "creation_timestamp", "") or ""
    return (0, ts) if ts else (1, "")


def traffic_policy_specs(snapshot: NodeSnapshot | None) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(namespace, service) -> the spec of the TrafficPolicy the proxies apply to that Service:
    the oldest, then by namespace/name, as ``_Compiler._load_policies`` picks (which also
    reports the objects skipped). For the users outside the route table (health checks, the
    L4 connection rate limit); an object that does not parse is skipped here."""
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    if snapshot is None:
        return out
    for c in sorted((c for c in snapshot.config if c.kind == TRAFFIC_POLICY),
                    key=lambda o: (_age_key(o), o.namespace, o.name)):
        try:
            spec = json.loads(c.spec)
            ref = spec["targetRef"]
            if ref.get("kind", "Service") != "Service":
                continue
            out.setdefault((ref.get("namespace") or c.namespace, ref["name"]), spec)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


class _Compiler:
    """Compiles one snapshot; collects per-object problems instead of failing the snapshot."""

    def __init__(self, snapshot: NodeSnapshot) -> None:
        self.snapshot = snapshot
        self.services = {(s.namespace, s.name): s for s in snapshot.services}
        self.errors: list[str] = []
        self.policies: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.lb: dict[tuple[str, str], LbConfig] = {}
        self.backends: dict[tuple[str, str, int], Backend] = {}
        self.faults: dict[tuple[str, str, str], FaultPolicy] = {}
        self.unhealthy = unhealthy_endpoints(snapshot.config)
        self._load_policies()
        self._load_faults()

    # -- policies: TrafficPolicy and FaultInjection, the oldest of each per target
    def _targeted(self, kind: str, key_of: Callable[[ConfigObject, Mapping[str, Any]], tuple | None],
                  what: Callable[[tuple], str]) -> Iterable[tuple[tuple, Mapping[str, Any], ConfigObject]]:
        """(target key, spec, object) of every ``kind`` object, oldest first; a later object
        for a target already taken is reported and skipped (``key_of`` None: not ours)."""
        seen: set[tuple] = set()
        objs = sorted((o for o in self.snapshot.config if o.kind == kind),
                      key=lambda o: (_age_key(o), o.namespace, o.name))
        for o in objs:
            try:
                spec = json.loads(o.spec)
                key = key_of(o, spec)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.errors.append(f"{kind} {o.namespace}/{o.name}: {exc}")
                continue
            if key is None:
                continue
            if key in seen:
                self.errors.append(f"{kind} {o.namespace}/{o.name}: {what(key)} already has a {kind}; ignored")
                continue
            seen.add(key)
            yield key, spec, o

    def _load_policies(self) -> None:
        def key_of(o, spec):
            ref = spec.get("targetRef") or {}
            return None if ref.get("kind", "Service") != "Service" else (ref.get("namespace") or o.namespace,
                                                                         ref["name"])
        for key, spec, o in self._targeted(TRAFFIC_POLICY, key_of, lambda k: f"Service {k[0]}/{k[1]}"):
            self.policies[key] = spec
            try:
                self.lb[key] = LbConfig.from_policy(spec)
            except (AttributeError, TypeError, ValueError) as exc:
                self.errors.append(f"{TRAFFIC_POLICY} {o.namespace}/{o.name}: loadBalancer: {exc}")

    def _load_faults(self) -> None:
        """FaultInjections by target: ("Service"|"HTTPRoute"|"GRPCRoute", namespace, name)."""
        def key_of(o, spec):
            ref = spec["targetRef"]
            return (ref.get("kind", "Service"), o.namespace, ref["name"])
        for key, spec, o in self._targeted(FAULT_INJECTION, key_of, lambda k: f"{k[0]} {k[1]}/{k[2]}"):
            try:
                self.faults[key] = FaultPolicy.from_spec(spec, f"{o.namespace}/{o.name}")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.errors.append(f"{FAULT_INJECTION} {o.namespace}/{o.name}: {exc}")

    def policy_timeout(self, service: Service) -> float | None:
        spec = self.policies.get((service.namespace, service.name))
        if not spec or spec.get("timeout") is None:
            return None
        try:
            return parse_duration(spec["timeout"])
        except ValueError as exc:
            self.errors.append(f"{TRAFFIC_POLICY} for {service.namespace}/{service.name}: timeout: {exc}")
            return None

    def backend(self, service: Service, port: ServicePort) -> Backend:
        key = (service.namespace, service.name, port.port)
        b = self.backends.get(key)
        if b is None:
            eps = service_endpoints(service, port)
            ref = f"{service.namespace}/{service.name}"
            failing = frozenset(k for k in ((e.address, e.port) for e in eps) if (*k, ref) in self.unhealthy) \
                if self.unhealthy else frozenset()
            b = self.backends[key] = Backend(service, port, eps,
                                             self.lb.get((service.namespace, service.name), DEFAULT_LB), failing)
        return b

    def resolve_ref(self, ref: Mapping[str, Any], route_ns: str, default_port: int) -> Backend | str:
        """A Backend, or the reason the backendRef is invalid."""
        kind = ref.get("kind", "Service")
        group = ref.get("group", "")
        name = ref.get("name", "")
        if kind != "Service" or group not in _CORE_GROUPS:
            return f"backendRef {group or 'core'}/{kind} {name}: unsupported kind"
        ns = ref.get("namespace") or route_ns
        svc = self.services.get((ns, name))
        if svc is None:
            return f"backendRef Service {ns}/{name} not found"
        port_no = ref.get("port") or default_port
        for p in svc.ports:
            if p.port == port_no:
                return self.backend(svc, p)
        return f"backendRef Service {ns}/{name} has no port {port_no}"

    # -- attachment
    def parents(self, obj: ConfigObject, spec: Mapping[str, Any]) -> list[tuple[Service, ServicePort]]:
        out: list[tuple[Service, ServicePort]] = []
        for pr in spec.get("parentRefs") or ():
            if pr.get("kind", "Gateway") != "Service" or pr.get("group", "gateway.networking.k8s.io") \
                    not in _CORE_GROUPS:
                continue
            svc = self.services.get((pr.get("namespace") or obj.namespace, pr.get("name", "")))
            if svc is None:
                continue
            port, section = pr.get("port"), pr.get("sectionName")
            for p in svc.ports:
                if (port is None or p.port == port) and (section is None or p.name == section):
                    if (svc, p) not in out:
                        out.append((svc, p))
        return out

    # -- rules
    def compile_route(self, obj: ConfigObject, spec: Mapping[str, Any], svc: Service, port: ServicePort,
                      tiebreak: tuple) -> list:
        grpc = obj.kind == GRPC_ROUTE
        where_route = f"{obj.kind} {obj.namespace}/{obj.name}"
        entries = []
        policy_timeout = self.policy_timeout(svc)
        rules = spec.get("rules") or [{}]
        for ri, rule in enumerate(rules):
            where = f"{where_route}: rules[{ri}]"
            ref = RouteRef(obj.kind, obj.namespace, obj.name, ri, str(rule.get("name") or ""))
            try:
                chain = FilterChain.compile(rule.get("filters"))
                timeouts = self._timeouts(rule, policy_timeout, where)
                matches = rule.get("matches") or [{}]
                compiled = [(_GrpcEntry if grpc else _HttpEntry)(m, f"{where}.matches[{mi}]")
                            for mi, m in enumerate(matches)]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.errors.append(f"{where}: {exc}")
                continue
            mirrors = self._mirrors(chain.mirrors, obj.namespace, port.port, where)
            needs_prefix = self._needs_prefix(chain, rule)
            for mi, e in enumerate(compiled):
                if e.prefix is None and needs_prefix:
                    self.errors.append(f"{where}: ReplacePrefixMatch needs a PathPrefix match; path left unchanged")
                e.ref = ref
                e.key = e.precedence() + tiebreak + (ri, mi)
                e.outcomes = self._outcomes(rule, chain, mirrors, svc, port, ref, timeouts, e.prefix,
                                            obj.namespace, where)
                entries.append(e)
        return entries

    @staticmethod
    def _needs_prefix(chain: FilterChain, rule: Mapping[str, Any]) -> bool:
        chains = [chain] + [FilterChain.compile(b.get("filters")) for b in rule.get("backendRefs") or ()]
        for c in chains:
            rw = c.url_rewrite
            if rw is not None and rw.path is not None and rw.path.type == REPLACE_PREFIX_MATCH:
                return True
            if c.redirect is not None and c.redirect.path is not None and c.redirect.path.type == REPLACE_PREFIX_MATCH:
                return True
        return False

    def _timeouts(self, rule: Mapping[str, Any], policy_timeout: float | None, where: str) -> Timeouts:
        t = rule.get("timeouts") or {}
        req = parse_duration(t["request"]) if t.get("request") is not None else policy_timeout
        be = parse_duration(t["backendRequest"]) if t.get("backendRequest") is not None else None
        if req is None and be is None:
            return NO_TIMEOUTS
        return Timeouts(req, be)

    def _mirrors(self, specs: Sequence[MirrorSpec], route_ns: str, default_port: int,
                 where: str) -> tuple[tuple[Backend, ...], tuple[tuple[Backend, float], ...]]:
        always: list[Backend] = []
        sampled: list[tuple[Backend, float]] = []
        for m in specs:
            b = self.resolve_ref(m.backend_ref, route_ns, default_port)
            if isinstance(b, str):
                self.errors.append(f"{where}: RequestMirror {b}; mirror dropped")
                continue
            p = m.probability
            if p >= 1.0:
                always.append(b)
            elif p > 0.0:
                sampled.append((b, p))
        return tuple(always), tuple(sampled)

    def _outcomes(self, rule, chain: FilterChain, mirrors, svc: Service, port: ServicePort, ref: RouteRef,
                  timeouts: Timeouts, prefix: bytes | None, route_ns: str, where: str) -> _Outcomes:
        if chain.unsupported:
            return _Outcomes([(1, backend_error(f"unsupported filter {', '.join(chain.unsupported)}"))])
        if chain.redirect is not None:
            return _Outcomes([(1, _Redirect(chain.redirect, prefix))])
        items: list[tuple[int, Any]] = []
        for bi, br in enumerate(rule.get("backendRefs") or ()):
            weight = int(br.get("weight", 1))
            if weight <= 0:
                continue
            bwhere = f"{where}.backendRefs[{bi}]"
            try:
                bchain = chain.then(FilterChain.compile(br.get("filters")))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.errors.append(f"{bwhere}: {exc}")
                items.append((weight, backend_error(f"invalid filters: {exc}")))
                continue
            if bchain.unsupported:
                items.append((weight, backend_error(f"unsupported filter {', '.join(bchain.unsupported)}")))
                continue
            if bchain.redirect is not None:
                items.append((weight, _Redirect(bchain.redirect, prefix)))
                continue
            target = self.resolve_ref(br, route_ns, port.port)
            if isinstance(target, str):
                self.errors.append(f"{bwhere}: {target}")
                items.append((weight, backend_error(target)))
                continue
            always, sampled = mirrors
            if bchain is not chain:
                extra = self._mirrors(bchain.mirrors[len(chain.mirrors):], route_ns, port.port, bwhere)
                always, sampled = always + extra[0], sampled + extra[1]
            items.append((weight, RouteDecision(svc, port, target, ref, bchain, always, timeouts, prefix, sampled)))
        if not items:
            return _Outcomes([(1, backend_error("no backend"))])
        return _Outcomes(items)


class RouteTable:
    """The compiled routing of one snapshot: immutable, built once by ``from_snapshot``.

    ``router_for(vip, port)`` / ``router_for_authority(authority, source_namespace)`` find the
    Service port; ``match(request)`` does both steps. ``errors`` lists the objects (or parts)
    that could not be used, for the admin endpoint and logs.
    """

    __slots__ = ("node", "version", "routers", "errors", "_by_vip", "_by_host", "_short", "_policies",
                 "_lb", "_backend_keys", "faults")

    def __init__(self) -> None:
        self.node = ""
        self.version = ""
        self.routers: dict[tuple[str, str, int], ServiceRouter] = {}
        self.errors: tuple[str, ...] = ()
        self._by_vip: dict[tuple[str, int], ServiceRouter] = {}
        self._by_host: dict[tuple[bytes, int], ServiceRouter] = {}
        self._short: dict[tuple[bytes, str, int], ServiceRouter] = {}
        self._policies: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._lb: dict[tuple[str, str], LbConfig] = {}
        self._backend_keys: frozenset = frozenset()
        # FaultInjections by target ("Service"|"HTTPRoute"|"GRPCRoute", namespace, name); empty
        # when there are none, so the drivers skip ``fault_for`` with one truth test
        self.faults: dict[tuple[str, str, str], FaultPolicy] = {}

    @classmethod
    def from_snapshot(cls, snapshot: NodeSnapshot, *, rand: Any = None) -> "RouteTable":
        """Compile ``snapshot``; ``rand`` (a ``random.Random`` or a ``() -> float`` in [0, 1))
        drives weighted backend choice and sampled mirrors."""
        rnd = _rand_fn(rand)
        c = _Compiler(snapshot)
        # attachments: (ns, name, port) -> group (None = producer, else consumer namespace) -> routes
        attached: dict[tuple[str, str, int], dict[str | None, list]] = {}
        route_objs = sorted((o for o in snapshot.config if o.kind in (HTTP_ROUTE, GRPC_ROUTE)),
                            key=lambda o: (_age_key(o), f"{o.namespace}/{o.name}", o.kind))
        for order, obj in enumerate(route_objs):
            try:
                spec = json.loads(obj.spec)
                if not isinstance(spec, dict):
                    raise ValueError("spec is not a mapping")
                parents = c.parents(obj, spec)
            except (ValueError, TypeError, AttributeError) as exc:
                c.errors.append(f"{obj.kind} {obj.namespace}/{obj.name}: {exc}")
                continue
            for svc, port in parents:
                group = None if obj.namespace == svc.namespace else obj.namespace
                attached.setdefault((svc.namespace, svc.name, port.port), {}).setdefault(group, []).append(
                    (order, obj, spec, svc, port))
        t = cls()
        t.node = snapshot.node
        t.version = snapshot.version
        keys = set()
        for svc in snapshot.services:
            for port in svc.ports:
                key = (svc.namespace, svc.name, port.port)
                keys.add(key)
                groups = attached.get(key, {})
                sets: dict[str | None, RouteSet] = {}
                for group, items in groups.items():
                    kinds = {obj.kind for _, obj, _, _, _ in items}
                    if GRPC_ROUTE in kinds and HTTP_ROUTE in kinds:
                        for _, obj, _, _, _ in items:
                            if obj.kind == HTTP_ROUTE:
                                c.errors.append(f"{HTTP_ROUTE} {obj.namespace}/{obj.name}: not applied to "
                                                f"{svc.namespace}/{svc.name}:{port.port}, GRPCRoutes take precedence")
                        items = [it for it in items if it[1].kind == GRPC_ROUTE]
                    kind = items[0][1].kind
                    entries = []
                    for order, obj, spec, _, _ in items:
                        tiebreak = (_age_key(obj), f"{obj.namespace}/{obj.name}", order)
                        entries.extend(c.compile_route(obj, spec, svc, port, tiebreak))
                    sets[group] = RouteSet(kind, entries, [f"{o.namespace}/{o.name}" for _, o, _, _, _ in items])
                policy_timeout = c.policy_timeout(svc)
                default = RouteDecision(svc, port, c.backend(svc, port), None, EMPTY_CHAIN, (),
                                        Timeouts(policy_timeout) if policy_timeout is not None else NO_TIMEOUTS)
                producer = sets.pop(None, None)
                router = ServiceRouter(svc, port, default, producer, sets, rnd)
                t.routers[key] = router
                t._by_vip[(svc.cluster_ip, port.port)] = router
                name, ns = svc.name.encode(), svc.namespace
                for host in (svc.hostname.encode(), b"%s.%s.svc" % (name, ns.encode()),
                             b"%s.%s" % (name, ns.encode()), svc.cluster_ip.encode()):
                    t._by_host[(host, port.port)] = router
                t._short[(name, ns, port.port)] = router
        t.errors = tuple(dict.fromkeys(c.errors))
        t._policies = c.policies
        t._lb = c.lb
        t._backend_keys = frozenset(keys)
        t.faults = c.faults
        return t

    # ------------------------------------------------------------------ lookups
    def router_for(self, ip: str, port: int) -> ServiceRouter | None:
        """The router of a Service VIP:port (the connection's original destination). O(1)."""
        return self._by_vip.get((ip, port))

    def router_for_authority(self, authority: bytes | str, source_namespace: str = "",
                             scheme: bytes = b"http") -> ServiceRouter | None:
        """The router for a Host/:authority naming a Service (FQDN, ``name.ns.svc``, ``name.ns``,
        the VIP, or the short ``name`` for a client in the Service's namespace)."""
        if isinstance(authority, str):
            authority = authority.encode()
        host, port = split_authority(authority)
        host = host.lower().rstrip(b".")
        if port is None:
            port = WELL_KNOWN_PORTS.get(scheme, 80)
        r = self._by_host.get((host, port))
        if r is None and source_namespace and b"." not in host:
            r = self._short.get((host, source_namespace, port))
        return r

    def router(self, request: RequestInfo) -> ServiceRouter | None:
        r = None
        if request.dst_ip:
            r = self._by_vip.get((request.dst_ip, request.dst_port))
        if r is None and request.authority:
            r = self.router_for_authority(request.authority, request.source_namespace, request.scheme)
        return r

    def match(self, request: RequestInfo) -> RouteDecision | DirectResponse:
        """Route one request: ``RouteDecision``, a ``DirectResponse`` (redirect or 500), or
        ``NoRoute`` (no route matched, or the destination is not a known Service)."""
        r = self.router(request)
        if r is None:
            return UNKNOWN_SERVICE
        return r.match(request)

    # ------------------------------------------------------------------ policies & state
    def traffic_policy(self, service: Service) -> Mapping[str, Any] | None:
        """The TrafficPolicy spec targeting ``service`` (the oldest / first by name), or None."""
        return self._policies.get((service.namespace, service.name))

    def fault_for(self, d: "RouteDecision") -> FaultPolicy | None:
        """The FaultInjection of the route rule that matched, else of the Service called."""
        faults = self.faults
        r = d.route
        if r is not None:
            f = faults.get((r.kind, r.namespace, r.name))
            if f is not None:
                return f
        return faults.get(("Service", d.service.namespace, d.service.name))

    def lb_config(self, service: Service) -> LbConfig:
        return self._lb.get((service.namespace, service.name), DEFAULT_LB)

    def backend_keys(self) -> frozenset:
        """Every (namespace, name, port) of the snapshot: what ``LbState.retain`` keeps."""
        return self._backend_keys

    def describe(self) -> list[dict[str, Any]]:
        """A JSON-able view for the admin ``/routes`` endpoint."""
        return [self.routers[k].describe() for k in sorted(self.routers)]
