"""AuthorizationPolicy on connections at the destination node: Istio's semantics, no I/O.

The inbound side asks ``Authorizer.decide(snapshot, workload, conn)`` once per connection
(a tunnel stream or a plaintext connection) before one byte reaches the pod. ``conn``
carries what the destination node verified itself: the source principal proven by the
mTLS handshake (``None`` for plaintext), the source address, and the original destination
address and port (the pod's port).

Which policies apply to a workload (Istio): those in the workload's namespace with no
``selector`` (namespace-wide) or whose ``selector.matchLabels`` match its labels, plus
those in the root namespace — the namespace the MeshConfig lives in — which apply to
every workload (mesh-wide without a selector, to matching workloads in any namespace
with one). Evaluation (Istio's order):

1. an ``AUDIT`` policy that matches is recorded in the decision (log only, no effect);
2. any matching ``DENY`` policy denies;
3. no ``ALLOW`` policy applies -> allow;
4. some ``ALLOW`` policy matches -> allow; otherwise deny.

A policy matches when one of its ``rules`` matches; a policy without rules matches
nothing (an ALLOW without rules therefore denies everything), and the rule ``{}`` matches
everything. Within a rule ``from``, ``to`` and ``when`` are ANDed, the entries of each
ORed, the fields of one source/operation ANDed, the values of a field ORed, ``not*``
fields and ``notValues`` negated. Strings match exactly, by prefix (``abc*``), by suffix
(``*abc``) or by presence (``*``: any non-empty value). Principals are SPIFFE IDs without
``spiffe://`` (``cluster.local/ns/default/sa/web``); a plaintext source has no principal
and no namespace, so ``principals``/``namespaces`` never match it and their ``not*``
forms always do (as Envoy's RBAC ``authenticated`` matcher).

Request (L7) attributes — request principals, hosts, methods, paths, ``request.*``
conditions — cannot be evaluated on a connection. ``decide`` then bounds the answer: it
evaluates every policy twice, with each request attribute counted as matching in DENY
and not in ALLOW (the fail-closed answer), and the other way round. When both agree the
request cannot change the outcome and the decision is final; otherwise the decision has
``needs_request`` set, its ``allowed`` is the fail-closed answer (what a connection that
turns out not to be HTTP gets, as Istio does for TCP traffic under HTTP rules), and the
listener parses the connection's requests and asks ``decide_request`` for each, with a
``RequestAttrs`` (the normalized path, method, authority, headers, the verified JWT).
Rules are predicates over either attribute object: the connection fields read the same
names on both.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nodeagent.identity.manager import trust_domain_of
from nodeagent.state import NodeSnapshot, Workload
from nodeagent.proxy.peerauth import selector_labels, selector_matches

log = logging.getLogger(__name__)

ALLOW = "ALLOW"
DENY = "DENY"
AUDIT = "AUDIT"
_ACTIONS = (ALLOW, DENY, AUDIT)
_MAX_CACHED = 65536
_MAX_CACHED_PATH = 512  # longer request paths are evaluated, not remembered

# source/operation fields and `when` keys that need the request: never evaluable here
L7_SOURCE_FIELDS = frozenset({"requestPrincipals", "notRequestPrincipals"})
L7_OPERATION_FIELDS = frozenset({"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"})


def _ip_int(ip: str) -> int:
    """An IPv4 address as an int (-1 when it is not one: no network then contains it)."""
    try:
        return int.from_bytes(socket.inet_aton(ip), "big") if ip.count(".") == 3 else -1
    except OSError:
        return -1


@dataclass(frozen=True, slots=True)
class ConnectionAttrs:
    """What the destination node knows of a connection by itself (the derived fields are
    computed once here, not once per rule)."""

    principal: str | None      # "td/ns/<ns>/sa/<sa>" proven by mTLS; None for plaintext
    source_ip: str
    destination_ip: str
    destination_port: int
    namespace: str | None = field(init=False)
    source_int: int = field(init=False)
    destination_int: int = field(init=False)

    def __post_init__(self) -> None:
        parts = (self.principal or "").split("/")
        ns = parts[2] if len(parts) == 5 and parts[1] == "ns" else None
        object.__setattr__(self, "namespace", ns)
        object.__setattr__(self, "source_int", _ip_int(self.source_ip))
        object.__setattr__(self, "destination_int", _ip_int(self.destination_ip))


class RequestAttrs:
    """One HTTP request to a workload: its connection's attributes (same names as on
    ``ConnectionAttrs``, so connection rules read either) and what the request says.
    ``path`` is normalized (``l7.pathnorm``), without the query; ``host`` the authority
    lowercased; ``headers`` lowercase names to values (repeated fields joined with ","),
    only those the policies read; ``request_principal`` is ``iss/sub`` of a verified JWT
    (None without one). A plain slots class: one is made per request."""

    __slots__ = ("principal", "source_ip", "destination_ip", "destination_port", "namespace", "source_int",
                 "destination_int", "method", "host", "path", "headers", "request_principal", "claims", "audiences",
                 "presenter")

    def __init__(self, conn: ConnectionAttrs, method: str, host: str, path: str, headers: dict[str, str],
                 request_principal: str | None = None, claims: Any = None, audiences: tuple[str, ...] = (),
                 presenter: str = "") -> None:
        self.principal = conn.principal
        self.source_ip = conn.source_ip
        self.destination_ip = conn.destination_ip
        self.destination_port = conn.destination_port
        self.namespace = conn.namespace
        self.source_int = conn.source_int
        self.destination_int = conn.destination_int
        self.method = method
        self.host = host.lower()
        self.path = path
        self.headers = headers
        self.request_principal = request_principal
        self.claims = claims
        self.audiences = audiences
        self.presenter = presenter


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str = ""            # "ns/name" of the policy that decided ("" when no policy did)
    action: str = ""            # that policy's action
    audited: tuple[str, ...] = ()
    reason: str = ""
    needs_request: bool = False  # the answer depends on request attributes (see the module doc)

    @property
    def metric_result(self) -> str:
        return "allow" if self.allowed else "deny"


ALLOWED_BY_DEFAULT = AuthzDecision(True, reason="no ALLOW policy applies")

Predicate = Callable[[ConnectionAttrs], bool]


# ------------------------------------------------------------------ matchers

def string_matcher(pattern: str) -> Callable[[str | None], bool]:
    """Istio's string match: exact, ``x*`` prefix, ``*x`` suffix, ``*`` any non-empty."""
    return _strings_matcher([pattern])


def _strings_matcher(patterns: Iterable[Any]) -> Callable[[str | None], bool]:
    """Any of ``patterns``: exact values in one set lookup, then prefixes and suffixes."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    present = False
    for p in map(str, patterns):
        if p == "*":
            present = True
        elif p.endswith("*"):
            prefixes.append(p[:-1])
        elif p.startswith("*"):
            suffixes.append(p[1:])
        else:
            exact.add(p)
    if present:
        return lambda v: bool(v)
    pre, suf = tuple(prefixes), tuple(suffixes)
    if not pre and not suf:
        frozen = frozenset(exact)
        return lambda v: v in frozen
    frozen = frozenset(exact)
    return lambda v: v is not None and (v in frozen or (bool(pre) and v.startswith(pre))
                                        or (bool(suf) and v.endswith(suf)))


def _any_string(patterns: Iterable[Any], attr: Callable[[ConnectionAttrs], str | None]) -> Predicate:
    m = _strings_matcher(patterns)
    return lambda c: m(attr(c))


def _networks(values: Iterable[Any]) -> tuple[tuple[int, int], ...]:
    """(network, mask) pairs as ints."""
    nets = []
    for v in values:
        try:
            n = ipaddress.IPv4Network(str(v), strict=False)
        except ValueError:
            raise _Unusable(f"{v!r} is not an IPv4 address or CIDR") from None
        nets.append((int(n.network_address), int(n.netmask)))
    return tuple(nets)


def _in_networks(values: Iterable[Any], attr: Callable[[ConnectionAttrs], int]) -> Predicate:
    nets = _networks(values)
    if len(nets) == 1:
        (net, mask), = nets
        return lambda c: (attr(c) & mask) == net and attr(c) >= 0

    def match(c: ConnectionAttrs) -> bool:
        ip = attr(c)
        if ip < 0:
            return False
        for net, mask in nets:
            if ip & mask == net:
                return True
        return False
    return match


def _ports(values: Iterable[Any]) -> Predicate:
    try:
        ports = frozenset(int(v) for v in values)
    except (TypeError, ValueError):
        raise _Unusable(f"ports {list(values)!r} are not port numbers") from None
    return lambda c: c.destination_port in ports


def _principal(c: ConnectionAttrs) -> str | None:
    return c.principal


def _namespace(c: ConnectionAttrs) -> str | None:
    return c.namespace


def _source_ip(c: ConnectionAttrs) -> int:
    return c.source_int


def _destination_ip(c: ConnectionAttrs) -> int:
    return c.destination_int


class _Unusable(ValueError):
    """A part of a policy the agent cannot evaluate as written."""


# how compile_rule treats request attributes: constants bounding the connection's answer,
# or the real predicates over a RequestAttrs
FAIL_CLOSED = "fail_closed"   # matching in DENY, not matching in ALLOW/AUDIT
OPTIMISTIC = "optimistic"     # the other way round
REQUEST = "request"


def _request_principal(r: RequestAttrs) -> str | None:
    return r.request_principal


def _method(r: RequestAttrs) -> str:
    return r.method


def _path(r: RequestAttrs) -> str:
    return r.path


def _hosts(patterns: Iterable[Any]) -> Predicate:
    """Istio: hosts match case-insensitively, with or without the authority's port."""
    m = _strings_matcher(str(p).lower() for p in patterns)

    def match(r: RequestAttrs) -> bool:
        host = r.host
        if m(host):
            return True
        name, sep, port = host.rpartition(":")
        return bool(sep) and port.isdigit() and m(name)
    return match


def _header(name: str) -> Callable[[list], Predicate]:
    name = name.lower()
    return lambda values: _any_string(values, lambda r: r.headers.get(name))


def _claim_value(claims: Any, path: tuple[str, ...]) -> Any:
    value = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _claim(path: tuple[str, ...]) -> Callable[[list], Predicate]:
    """``request.auth.claims[a][b]``: a string claim, or any string of a list claim."""
    def build(values: list) -> Predicate:
        m = _strings_matcher(values)

        def match(r: RequestAttrs) -> bool:
            v = _claim_value(r.claims, path)
            if isinstance(v, str):
                return m(v)
            if isinstance(v, list):
                return any(isinstance(x, str) and m(x) for x in v)
            return False
        return match
    return build


def _audiences(values: list) -> Predicate:
    m = _strings_matcher(values)
    return lambda r: any(m(a) for a in r.audiences)


_SOURCE_FIELDS: dict[str, Callable[[list], Predicate]] = {
    "principals": lambda v: _any_string(v, _principal),
    "namespaces": lambda v: _any_string(v, _namespace),
    "ipBlocks": lambda v: _in_networks(v, _source_ip),
    "remoteIpBlocks": lambda v: _in_networks(v, _source_ip),  # no X-Forwarded-For trust: remote = source
}
_OPERATION_FIELDS: dict[str, Callable[[list], Predicate]] = {"ports": _ports}
_REQUEST_SOURCE_FIELDS: dict[str, Callable[[list], Predicate]] = {
    "requestPrincipals": lambda v: _any_string(v, _request_principal),
}
_REQUEST_OPERATION_FIELDS: dict[str, Callable[[list], Predicate]] = {
    "hosts": _hosts,
    "methods": lambda v: _any_string(v, _method),
    "paths": lambda v: _any_string(v, _path),
}
_CONDITIONS: dict[str, Callable[[list], Predicate]] = {
    "source.ip": lambda v: _in_networks(v, _source_ip),
    "remote.ip": lambda v: _in_networks(v, _source_ip),
    "source.namespace": lambda v: _any_string(v, _namespace),
    "source.principal": lambda v: _any_string(v, _principal),
    "destination.ip": lambda v: _in_networks(v, _destination_ip),
    "destination.port": _ports,
}
_REQUEST_CONDITIONS: dict[str, Callable[[list], Predicate]] = {
    "request.auth.principal": lambda v: _any_string(v, _request_principal),
    "request.auth.presenter": lambda v: _any_string(v, lambda r: r.presenter or None),
    "request.auth.audiences": _audiences,
}


def _bracketed(key: str, prefix: str) -> tuple[str, ...] | None:
    """``prefix[a][b]`` -> ("a", "b"); None when ``key`` is not of that form."""
    if not key.startswith(prefix + "[") or not key.endswith("]"):
        return None
    parts = key[len(prefix) + 1:-1].split("][")
    if any(not p or "[" in p or "]" in p for p in parts):
        return None
    return tuple(parts)


def _request_condition(key: str) -> Callable[[list], Predicate] | None:
    build = _REQUEST_CONDITIONS.get(key)
    if build is not None:
        return build
    header = _bracketed(key, "request.headers")
    if header is not None and len(header) == 1:
        return _header(header[0])
    claim = _bracketed(key, "request.auth.claims")
    if claim is not None:
        return _claim(claim)
    return None


def _negated(p: Predicate) -> Predicate:
    return lambda c: not p(c)


def _constant(value: bool) -> Predicate:
    return (lambda c: True) if value else (lambda c: False)


def _l7_constant(mode: str, action: str) -> Predicate | None:
    """What a request attribute is on a connection in ``mode`` (None: evaluated for real)."""
    if mode == REQUEST:
        return None
    return _constant((action == DENY) == (mode == FAIL_CLOSED))


def _fields(spec: Any, known: dict[str, Callable[[list], Predicate]], l7: dict[str, Callable[[list], Predicate]],
            l7_constant: Predicate | None, where: str) -> list[Predicate]:
    """The ANDed predicates of one source or operation."""
    if not isinstance(spec, dict):
        raise _Unusable(f"{where} is not an object")
    out: list[Predicate] = []
    for name, values in spec.items():
        positive = name[3].lower() + name[4:] if name.startswith("not") and len(name) > 3 else name
        build = known.get(positive)
        if build is None:
            build = l7.get(positive)
            if build is not None and l7_constant is not None:
                if not isinstance(values, list):
                    raise _Unusable(f"{where}.{name} is not understood")
                out.append(l7_constant)  # the whole field, negation included: monotone bounds
                continue
        if build is None or not isinstance(values, list):
            raise _Unusable(f"{where}.{name} is not understood")
        p = build(values)
        out.append(_negated(p) if positive != name else p)
    return out


def _condition(cond: Any, l7_constant: Predicate | None, where: str) -> Predicate:
    if not isinstance(cond, dict) or not isinstance(cond.get("key"), str):
        raise _Unusable(f"{where} is not a condition")
    key = cond["key"]
    build = _CONDITIONS.get(key)
    if build is None:
        build = _request_condition(key)
        if build is None:
            raise _Unusable(f"{where}.key {key!r} is not understood")
        if l7_constant is not None:
            return l7_constant
    parts: list[Predicate] = []
    if cond.get("values"):
        parts.append(build(cond["values"]))
    if cond.get("notValues"):
        parts.append(_negated(build(cond["notValues"])))
    if not parts:
        raise _Unusable(f"{where} has neither values nor notValues")
    return _all(parts)


def request_inputs(rule: Any) -> tuple[frozenset[str], bool]:
    """What of a request a (well-formed) rule reads besides method, host, path and request
    principal: the header names, and whether JWT claims/audiences/presenter."""
    names: set[str] = set()
    token = False
    for c in (rule.get("when") or ()) if isinstance(rule, dict) else ():
        key = str(c.get("key", "")) if isinstance(c, dict) else ""
        header = _bracketed(key, "request.headers")
        if header is not None and len(header) == 1:
            names.add(header[0].lower())
        elif key.startswith("request.auth.") and key != "request.auth.principal":
            token = True
    return frozenset(names), token


def uses_request(rule: Any) -> bool:
    """Whether a (well-formed) rule reads request attributes."""
    if not isinstance(rule, dict):
        return False
    for f in rule.get("from") or ():
        source = (f or {}).get("source") or {}
        if isinstance(source, dict) and any(n in L7_SOURCE_FIELDS for n in source):
            return True
    for t in rule.get("to") or ():
        operation = (t or {}).get("operation") or {}
        if isinstance(operation, dict) and any(n in L7_OPERATION_FIELDS for n in operation):
            return True
    return any(isinstance(c, dict) and str(c.get("key", "")).startswith("request.") for c in rule.get("when") or ())


def _all(parts: list[Predicate]) -> Predicate:
    # unrolled for the common sizes: a generator per call costs more than the checks
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda c: a(c) and b(c)
    if len(parts) == 3:
        a, b, d = parts
        return lambda c: a(c) and b(c) and d(c)
    ps = tuple(parts)

    def every(c: ConnectionAttrs) -> bool:
        for p in ps:
            if not p(c):
                return False
        return True
    return every


def _any(parts: list[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda c: a(c) or b(c)
    ps = tuple(parts)

    def some(c: ConnectionAttrs) -> bool:
        for p in ps:
            if p(c):
                return True
        return False
    return some


def compile_rule(rule: Any, action: str, where: str = "rule", mode: str = FAIL_CLOSED) -> Predicate:
    """One rule -> a predicate (raises _Unusable for what it cannot read). ``mode`` says how
    request attributes are treated: FAIL_CLOSED / OPTIMISTIC constants for a connection, or
    REQUEST: real predicates over a ``RequestAttrs``."""
    if not isinstance(rule, dict):
        raise _Unusable(f"{where} is not an object")
    l7 = _l7_constant(mode, action)
    parts: list[Predicate] = []
    if rule.get("from"):
        parts.append(_any([_all(_fields((f or {}).get("source"), _SOURCE_FIELDS, _REQUEST_SOURCE_FIELDS, l7,
                                        f"{where}.from[{i}].source") or [_constant(True)])
                           for i, f in enumerate(rule["from"])]))
    if rule.get("to"):
        parts.append(_any([_all(_fields((t or {}).get("operation"), _OPERATION_FIELDS, _REQUEST_OPERATION_FIELDS,
                                        l7, f"{where}.to[{i}].operation") or [_constant(True)])
                           for i, t in enumerate(rule["to"])]))
    for i, cond in enumerate(rule.get("when") or ()):
        parts.append(_condition(cond, l7, f"{where}.when[{i}]"))
    return _all(parts) if parts else _constant(True)


# ------------------------------------------------------------------ policies

@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled AuthorizationPolicy. ``rules`` are the fail-closed connection predicates;
    with ``uses_request``, ``bounds`` are the optimistic ones and ``request_rules`` the real
    ones over a RequestAttrs (both equal to ``rules`` otherwise)."""

    namespace: str
    name: str
    action: str
    selector: tuple[tuple[str, str], ...] | None   # None: namespace-wide (mesh-wide in the root namespace)
    rules: tuple[Predicate, ...]
    bounds: tuple[Predicate, ...] = ()
    request_rules: tuple[Predicate, ...] = ()
    uses_request: bool = False
    headers: frozenset[str] = frozenset()  # request header names its conditions read
    token_details: bool = False            # conditions on JWT claims, audiences or presenter

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: dict[str, str]) -> bool:
        return self.selector is None or selector_matches(self.selector, labels)

    def matches(self, conn: ConnectionAttrs) -> bool:
        for rule in self.rules:
            if rule(conn):
                return True
        return False

    def may_match(self, conn: ConnectionAttrs) -> bool:
        """Whether some request on ``conn`` could match (the optimistic bound)."""
        for rule in self.bounds or self.rules:
            if rule(conn):
                return True
        return False

    def matches_request(self, req: RequestAttrs) -> bool:
        for rule in self.request_rules or self.rules:
            if rule(req):
                return True
        return False


def parse_policy(namespace: str, name: str, spec_json: str) -> Policy:
    """One AuthorizationPolicy -> Policy. A part the agent cannot read fails closed: the
    policy becomes one that denies every connection of the workloads it selects."""
    try:
        spec = json.loads(spec_json)
        if not isinstance(spec, dict):
            raise _Unusable("spec is not an object")
        action = spec.get("action", ALLOW)
        if action not in _ACTIONS:
            raise _Unusable(f"action {action!r} is not understood")
        selector = _selector(spec)
        raw = list(spec.get("rules") or ())

        def compiled(mode: str) -> tuple[Predicate, ...]:
            return tuple(compile_rule(r, action, f"rules[{i}]", mode) for i, r in enumerate(raw))
        rules = compiled(FAIL_CLOSED)
        if not any(uses_request(r) for r in raw):
            return Policy(namespace, name, action, selector, rules)
        inputs = [request_inputs(r) for r in raw]
        return Policy(namespace, name, action, selector, rules, compiled(OPTIMISTIC), compiled(REQUEST), True,
                      frozenset().union(*(h for h, _ in inputs)), any(t for _, t in inputs))
    except (_Unusable, ValueError, TypeError, AttributeError) as exc:
        log.warning("AuthorizationPolicy %s/%s: %s; denying every connection it could apply to",
                    namespace, name, exc)
        selector = None
        try:
            selector = _selector(json.loads(spec_json))
        except (_Unusable, ValueError, TypeError, AttributeError):
            pass
        return Policy(namespace, name, DENY, selector, (_constant(True),))


def _selector(spec: dict) -> tuple[tuple[str, str], ...] | None:
    try:
        return selector_labels(spec)
    except ValueError as exc:
        raise _Unusable(str(exc)) from None


class Authorizer:
    """The policies of the current snapshot, compiled once per snapshot object, and the
    applicable policies per workload, computed once per (snapshot, workload)."""

    def __init__(self) -> None:
        self._snapshot: NodeSnapshot | None = None
        self._by_namespace: dict[str, list[Policy]] = {}
        self._root = ""
        self._applicable: dict[tuple[str, str], tuple[tuple[Policy, ...], ...]] = {}
        self._decisions: dict[tuple, AuthzDecision] = {}
        self._request_decisions: dict[tuple, AuthzDecision] = {}
        self._inputs: dict[tuple[str, str], tuple[frozenset[str], bool]] = {}
        self._uses_request = False

    def policies(self, snapshot: NodeSnapshot, workload: Workload) -> tuple[Policy, ...]:
        """Every policy that applies to ``workload`` (for /config_dump and the CLI)."""
        audit, deny, allow = self._for(snapshot, workload)
        return audit + deny + allow

    def decide(self, snapshot: NodeSnapshot, workload: Workload, conn: ConnectionAttrs) -> AuthzDecision:
        """The connection's decision, from a bounded cache of recent (workload, connection)
        answers: clients open many connections with the same attributes, and a decision is a
        pure function of them and the snapshot (the cache is dropped with the snapshot).
        ``needs_request`` when only the requests can tell (see the module doc)."""
        audit, deny, allow = self._for(snapshot, workload)
        if not (audit or deny or allow):
            return ALLOWED_BY_DEFAULT
        key = (workload.namespace, workload.name, conn.principal, conn.source_ip, conn.destination_ip,
               conn.destination_port)
        found = self._decisions.get(key)
        if found is None:
            if len(self._decisions) >= _MAX_CACHED:
                self._decisions.clear()
            found = self._decisions[key] = self._bounded(audit, deny, allow, conn)
        return found

    def request_headers(self, snapshot: NodeSnapshot, workload: Workload) -> frozenset[str]:
        """The request header names the policies of ``workload`` read (what RequestAttrs
        must carry; the rest of the headers are not looked at)."""
        self._for(snapshot, workload)
        return self._inputs[(workload.namespace, workload.name)][0]

    def decide_request(self, snapshot: NodeSnapshot, workload: Workload, req: RequestAttrs) -> AuthzDecision:
        """The decision for one request, from a bounded cache keyed by everything the
        workload's policies read of it (a keep-alive client repeats its requests); requests
        whose JWT claims the policies read, and long paths, are evaluated every time."""
        audit, deny, allow = self._for(snapshot, workload)
        if not (audit or deny or allow):
            return ALLOWED_BY_DEFAULT
        names, token_details = self._inputs[(workload.namespace, workload.name)]
        if (token_details and req.request_principal is not None) or len(req.path) > _MAX_CACHED_PATH:
            return self._evaluate(audit, deny, allow, req, Policy.matches_request)
        headers = req.headers
        key = (workload.namespace, workload.name, req.principal, req.source_ip, req.destination_ip,
               req.destination_port, req.method, req.host, req.path, req.request_principal,
               tuple(headers.get(n) for n in sorted(names)) if names else ())
        found = self._request_decisions.get(key)
        if found is None:
            if len(self._request_decisions) >= _MAX_CACHED:
                self._request_decisions.clear()
            found = self._request_decisions[key] = self._evaluate(audit, deny, allow, req, Policy.matches_request)
        return found

    @classmethod
    def _bounded(cls, audit, deny, allow, conn: ConnectionAttrs) -> AuthzDecision:
        closed = cls._evaluate(audit, deny, allow, conn, Policy.matches)
        if closed.allowed or not any(p.uses_request for group in (deny, allow) for p in group):
            return closed  # no request can make an allowed connection denied, or matters at all
        hopeful = cls._evaluate(audit, deny, allow, conn, Policy.may_match)
        if not hopeful.allowed:
            return closed  # no request can be allowed: denied on the connection
        return AuthzDecision(False, closed.policy, closed.action, closed.audited,
                             "depends on the request", needs_request=True)

    @staticmethod
    def _evaluate(audit, deny, allow, attrs, matches) -> AuthzDecision:
        audited = tuple(p.label for p in audit if matches(p, attrs))
        for p in deny:
            if matches(p, attrs):
                return AuthzDecision(False, p.label, DENY, audited, "matched a DENY policy")
        if not allow:
            return AuthzDecision(True, "", "", audited, ALLOWED_BY_DEFAULT.reason) if audited else ALLOWED_BY_DEFAULT
        for p in allow:
            if matches(p, attrs):
                return AuthzDecision(True, p.label, ALLOW, audited, "matched an ALLOW policy")
        return AuthzDecision(False, allow[0].label if len(allow) == 1 else "", ALLOW, audited,
                             "no ALLOW policy matched")

    def _for(self, snapshot: NodeSnapshot, workload: Workload) -> tuple[tuple[Policy, ...], ...]:
        if snapshot is not self._snapshot:
            self._load(snapshot)
        key = (workload.namespace, workload.name)
        found = self._applicable.get(key)
        if found is None:
            if len(self._applicable) >= _MAX_CACHED:
                self._applicable.clear()
            found = self._applicable[key] = self._select(workload)
            chosen = [p for group in found for p in group]
            self._inputs[key] = (frozenset().union(*(p.headers for p in chosen)),
                                 any(p.token_details for p in chosen))
        return found

    def _select(self, workload: Workload) -> tuple[tuple[Policy, ...], ...]:
        labels = dict(workload.labels)
        namespaces = [workload.namespace]
        if self._root and self._root != workload.namespace:
            namespaces.append(self._root)
        chosen = [p for ns in namespaces for p in self._by_namespace.get(ns, ()) if p.selects(labels)]
        return tuple(tuple(p for p in chosen if p.action == a) for a in (AUDIT, DENY, ALLOW))

    def _load(self, snapshot: NodeSnapshot) -> None:
        by_namespace: dict[str, list[Policy]] = {}
        root = ""
        for obj in snapshot.config:
            if obj.kind == "MeshConfig":
                root = obj.namespace
            elif obj.kind == "AuthorizationPolicy":
                by_namespace.setdefault(obj.namespace, []).append(parse_policy(obj.namespace, obj.name, obj.spec))
        for policies in by_namespace.values():
            policies.sort(key=lambda p: p.name)
        self._snapshot, self._by_namespace, self._root, self._applicable = snapshot, by_namespace, root, {}
        self._decisions, self._request_decisions, self._inputs = {}, {}, {}
        self._uses_request = any(p.uses_request for ps in by_namespace.values() for p in ps)

    def uses_request(self, snapshot: NodeSnapshot) -> bool:
        """Whether any policy of ``snapshot`` reads request attributes."""
        if snapshot is not self._snapshot:
            self._load(snapshot)
        return self._uses_request

    def summary(self, snapshot: NodeSnapshot, workloads: Iterable[Workload]) -> list[dict]:
        """The policies in force per workload: what /config_dump and `proxy-config policies` show."""
        out = []
        for w in workloads:
            policies = self.policies(snapshot, w)
            out.append({"workload": f"{w.namespace}/{w.name}",
                        "policies": [{"policy": p.label, "action": p.action,
                                      "scope": "workload" if p.selector else
                                      ("namespace" if p.namespace == w.namespace else "mesh"),
                                      "rules": len(p.rules),
                                      # where it is decided: on the connection, or per HTTP request
                                      "checks": "request" if p.uses_request else "connection"}
                                     for p in policies]})
        return out


# ------------------------------------------------------------------ for pooled connections

def authz_epoch(snapshot: NodeSnapshot | None) -> int:
    """A fingerprint of what authorization decisions depend on in ``snapshot``: the
    AuthorizationPolicies, the MeshConfig (root namespace, trust domain) and the workloads'
    identities and labels. Equal fingerprints: every decision made under one holds under
    the other. O(config + workloads): callers memoize it per snapshot object."""
    if snapshot is None:
        return 0
    return hash((
        tuple((c.kind, c.namespace, c.name, c.spec) for c in snapshot.config
              if c.kind in ("AuthorizationPolicy", "MeshConfig")),
        tuple((w.namespace, w.name, w.address, w.service_account, w.labels) for w in snapshot.workloads)))


# ------------------------------------------------------------------ the listeners' gate

def principal_of(identity: Any) -> str | None:
    """A SpiffeId (or None) -> Istio's principal form, ``td/ns/<ns>/sa/<sa>``."""
    if identity is None:
        return None
    return f"{identity.trust_domain}/ns/{identity.namespace}/sa/{identity.service_account}"


class AuthzGate:
    """How a listener uses the Authorizer: decide, count the decision, log denials.

    Decisions where no policy applies are not counted (that is every connection of a mesh
    without policies). Denials are logged with the policy's name, at most
    ``log_per_second`` lines a second so that a flood of denied connections cannot flood
    the log; the count of lines left out is logged with the next one."""

    def __init__(self, metrics: Any, direction: str, *, log_per_second: int = 10,
                 clock: Callable[[], float] | None = None) -> None:
        import time
        self.authorizer = Authorizer()
        self.metrics = metrics
        self.direction = direction
        self.log_per_second = log_per_second
        self.clock = clock or time.monotonic
        self._window = -1.0
        self._logged = 0
        self._suppressed = 0
        self._td_snapshot: NodeSnapshot | None = None
        self._trust_domain = ""

    def check(self, snapshot: NodeSnapshot, workload: Workload, principal: str | None, src_ip: str,
              dst_ip: str, dst_port: int) -> AuthzDecision:
        """The connection's decision; one that ``needs_request`` is counted per request
        (``check_request``), or by ``count`` when the connection turns out not to be HTTP."""
        d = self.authorizer.decide(snapshot, workload, ConnectionAttrs(principal, src_ip, dst_ip, dst_port))
        if d is ALLOWED_BY_DEFAULT or d.needs_request:
            return d
        self.count(d, workload, principal, src_ip, dst_port)
        return d

    def check_request(self, snapshot: NodeSnapshot, workload: Workload, req: RequestAttrs) -> AuthzDecision:
        d = self.authorizer.decide_request(snapshot, workload, req)
        if d is not ALLOWED_BY_DEFAULT:
            self.count(d, workload, req.principal, req.source_ip, req.destination_port,
                       (req.method.encode("latin-1"), req.path))
        return d

    def count(self, d: AuthzDecision, workload: Workload, principal: str | None, src_ip: str, dst_port: int,
              request: tuple[bytes, str] | None = None) -> None:
        """Count a decision and log it when it denies (or audits); ``request``: (method, path)."""
        self.metrics.authz_decision(self.direction, d)
        if d.allowed and not d.audited:
            return
        request = f" {request[0].decode('latin-1')} {request[1][:128]}" if request else ""
        if not d.allowed:
            self._log_denial(d, workload, principal, src_ip, dst_port, request)
        elif d.audited:
            log.info("authz: AUDIT %s: %s -> %s/%s:%d%s allowed", ",".join(d.audited), principal or src_ip,
                     workload.namespace, workload.name, dst_port, request)

    def check_local_source(self, snapshot: NodeSnapshot, workload: Workload, src_ip: str, dst_ip: str,
                           dst_port: int) -> AuthzDecision:
        """A connection between two workloads of this node: the source's identity is the one
        the snapshot gives the pod at ``src_ip`` (the node owns both ends)."""
        return self.check(snapshot, workload, self.local_principal(snapshot, src_ip), src_ip, dst_ip, dst_port)

    def local_principal(self, snapshot: NodeSnapshot, src_ip: str) -> str | None:
        """The principal of the pod at ``src_ip`` as the snapshot names it (None: not a workload)."""
        src = snapshot.workload_by_ip(src_ip)
        if src is None:
            return None
        if snapshot is not self._td_snapshot:
            self._td_snapshot, self._trust_domain = snapshot, trust_domain_of(snapshot)
        return f"{self._trust_domain}/ns/{src.namespace}/sa/{src.service_account}"

    def _log_denial(self, d: AuthzDecision, workload: Workload, principal: str | None, src_ip: str,
                    port: int, request: str = "") -> None:
        now = self.clock()
        if now - self._window >= 1.0:
            self._window, self._logged = now, 0
        if self._logged >= self.log_per_second:
            self._suppressed += 1
            return
        self._logged += 1
        more = f" ({self._suppressed} more denials not logged)" if self._suppressed else ""
        self._suppressed = 0
        log.info("authz: denied %s (%s) -> %s/%s:%d%s by %s: %s%s", principal or "plaintext", src_ip,
                 workload.namespace, workload.name, port, request, d.policy or "the ALLOW policies", d.reason, more)
