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
conditions — cannot be evaluated on a connection. The control plane refuses them today;
should a snapshot carry one anyway (an older or newer control plane), it fails closed
as ztunnel does: in a DENY policy such a field counts as matching (the rule then denies on
its connection attributes alone), in an ALLOW or AUDIT policy as not matching.
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

log = logging.getLogger(__name__)

ALLOW = "ALLOW"
DENY = "DENY"
AUDIT = "AUDIT"
_ACTIONS = (ALLOW, DENY, AUDIT)
_MAX_CACHED = 65536

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


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str = ""            # "ns/name" of the policy that decided ("" when no policy did)
    action: str = ""            # that policy's action
    audited: tuple[str, ...] = ()
    reason: str = ""

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


_SOURCE_FIELDS: dict[str, Callable[[list], Predicate]] = {
    "principals": lambda v: _any_string(v, _principal),
    "namespaces": lambda v: _any_string(v, _namespace),
    "ipBlocks": lambda v: _in_networks(v, _source_ip),
    "remoteIpBlocks": lambda v: _in_networks(v, _source_ip),  # no X-Forwarded-For at L4: remote = source
}
_OPERATION_FIELDS: dict[str, Callable[[list], Predicate]] = {"ports": _ports}
_CONDITIONS: dict[str, Callable[[list], Predicate]] = {
    "source.ip": lambda v: _in_networks(v, _source_ip),
    "remote.ip": lambda v: _in_networks(v, _source_ip),
    "source.namespace": lambda v: _any_string(v, _namespace),
    "source.principal": lambda v: _any_string(v, _principal),
    "destination.ip": lambda v: _in_networks(v, _destination_ip),
    "destination.port": _ports,
}


def _negated(p: Predicate) -> Predicate:
    return lambda c: not p(c)


def _constant(value: bool) -> Predicate:
    return (lambda c: True) if value else (lambda c: False)


def _fields(spec: Any, known: dict[str, Callable[[list], Predicate]], l7: frozenset[str],
            unenforceable: Predicate, where: str) -> list[Predicate]:
    """The ANDed predicates of one source or operation."""
    if not isinstance(spec, dict):
        raise _Unusable(f"{where} is not an object")
    out: list[Predicate] = []
    for name, values in spec.items():
        positive = name[3].lower() + name[4:] if name.startswith("not") and len(name) > 3 else name
        if name in l7:
            out.append(unenforceable)
            continue
        build = known.get(positive)
        if build is None or not isinstance(values, list):
            raise _Unusable(f"{where}.{name} is not understood")
        p = build(values)
        out.append(_negated(p) if positive != name else p)
    return out


def _condition(cond: Any, unenforceable: Predicate, where: str) -> Predicate:
    if not isinstance(cond, dict) or not isinstance(cond.get("key"), str):
        raise _Unusable(f"{where} is not a condition")
    key = cond["key"]
    build = _CONDITIONS.get(key)
    if build is None:
        if key.startswith("request."):
            return unenforceable
        raise _Unusable(f"{where}.key {key!r} is not understood")
    parts: list[Predicate] = []
    if cond.get("values"):
        parts.append(build(cond["values"]))
    if cond.get("notValues"):
        parts.append(_negated(build(cond["notValues"])))
    if not parts:
        raise _Unusable(f"{where} has neither values nor notValues")
    return _all(parts)


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


def compile_rule(rule: Any, action: str, where: str = "rule") -> Predicate:
    """One rule -> a predicate over the connection (raises _Unusable for what it cannot read)."""
    if not isinstance(rule, dict):
        raise _Unusable(f"{where} is not an object")
    unenforceable = _constant(action == DENY)
    parts: list[Predicate] = []
    if rule.get("from"):
        parts.append(_any([_all(_fields((f or {}).get("source"), _SOURCE_FIELDS, L7_SOURCE_FIELDS, unenforceable,
                                        f"{where}.from[{i}].source") or [_constant(True)])
                           for i, f in enumerate(rule["from"])]))
    if rule.get("to"):
        parts.append(_any([_all(_fields((t or {}).get("operation"), _OPERATION_FIELDS, L7_OPERATION_FIELDS,
                                        unenforceable, f"{where}.to[{i}].operation") or [_constant(True)])
                           for i, t in enumerate(rule["to"])]))
    for i, cond in enumerate(rule.get("when") or ()):
        parts.append(_condition(cond, unenforceable, f"{where}.when[{i}]"))
    return _all(parts) if parts else _constant(True)


# ------------------------------------------------------------------ policies

@dataclass(frozen=True, slots=True)
class Policy:
    namespace: str
    name: str
    action: str
    selector: tuple[tuple[str, str], ...] | None   # None: namespace-wide (mesh-wide in the root namespace)
    rules: tuple[Predicate, ...]

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: dict[str, str]) -> bool:
        return self.selector is None or all(labels.get(k) == v for k, v in self.selector)

    def matches(self, conn: ConnectionAttrs) -> bool:
        for rule in self.rules:
            if rule(conn):
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
        rules = tuple(compile_rule(r, action, f"rules[{i}]") for i, r in enumerate(spec.get("rules") or ()))
        return Policy(namespace, name, action, selector, rules)
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
    if "selector" not in spec:
        return None
    labels = spec["selector"].get("matchLabels") if isinstance(spec["selector"], dict) else None
    if not isinstance(labels, dict) or not labels:
        raise _Unusable("selector has no matchLabels")
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


class Authorizer:
    """The policies of the current snapshot, compiled once per snapshot object, and the
    applicable policies per workload, computed once per (snapshot, workload)."""

    def __init__(self) -> None:
        self._snapshot: NodeSnapshot | None = None
        self._by_namespace: dict[str, list[Policy]] = {}
        self._root = ""
        self._applicable: dict[tuple[str, str], tuple[tuple[Policy, ...], ...]] = {}
        self._decisions: dict[tuple, AuthzDecision] = {}

    def policies(self, snapshot: NodeSnapshot, workload: Workload) -> tuple[Policy, ...]:
        """Every policy that applies to ``workload`` (for /config_dump and the CLI)."""
        audit, deny, allow = self._for(snapshot, workload)
        return audit + deny + allow

    def decide(self, snapshot: NodeSnapshot, workload: Workload, conn: ConnectionAttrs) -> AuthzDecision:
        """The decision, from a bounded cache of recent (workload, connection) answers: clients
        open many connections with the same attributes, and a decision is a pure function of
        them and the snapshot (the cache is dropped with the snapshot)."""
        audit, deny, allow = self._for(snapshot, workload)
        if not (audit or deny or allow):
            return ALLOWED_BY_DEFAULT
        key = (workload.namespace, workload.name, conn.principal, conn.source_ip, conn.destination_ip,
               conn.destination_port)
        found = self._decisions.get(key)
        if found is None:
            if len(self._decisions) >= _MAX_CACHED:
                self._decisions.clear()
            found = self._decisions[key] = self._evaluate(audit, deny, allow, conn)
        return found

    @staticmethod
    def _evaluate(audit, deny, allow, conn: ConnectionAttrs) -> AuthzDecision:
        audited = tuple(p.label for p in audit if p.matches(conn))
        for p in deny:
            if p.matches(conn):
                return AuthzDecision(False, p.label, DENY, audited, "matched a DENY policy")
        if not allow:
            return AuthzDecision(True, "", "", audited, ALLOWED_BY_DEFAULT.reason) if audited else ALLOWED_BY_DEFAULT
        for p in allow:
            if p.matches(conn):
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
        self._decisions = {}

    def summary(self, snapshot: NodeSnapshot, workloads: Iterable[Workload]) -> list[dict]:
        """The policies in force per workload: what /config_dump and `proxy-config policies` show."""
        out = []
        for w in workloads:
            policies = self.policies(snapshot, w)
            out.append({"workload": f"{w.namespace}/{w.name}",
                        "policies": [{"policy": p.label, "action": p.action,
                                      "scope": "workload" if p.selector else
                                      ("namespace" if p.namespace == w.namespace else "mesh"),
                                      "rules": len(p.rules)} for p in policies]})
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
        d = self.authorizer.decide(snapshot, workload, ConnectionAttrs(principal, src_ip, dst_ip, dst_port))
        if d is ALLOWED_BY_DEFAULT:
            return d
        self.metrics.authz_decision(self.direction, d)
        if not d.allowed:
            self._log_denial(d, workload, principal, src_ip, dst_port)
        elif d.audited:
            log.info("authz: AUDIT %s: %s -> %s/%s:%d allowed", ",".join(d.audited), principal or src_ip,
                     workload.namespace, workload.name, dst_port)
        return d

    def check_local_source(self, snapshot: NodeSnapshot, workload: Workload, src_ip: str, dst_ip: str,
                           dst_port: int) -> AuthzDecision:
        """A connection between two workloads of this node: the source's identity is the one
        the snapshot gives the pod at ``src_ip`` (the node owns both ends)."""
        src = snapshot.workload_by_ip(src_ip)
        principal = None
        if src is not None:
            if snapshot is not self._td_snapshot:
                self._td_snapshot, self._trust_domain = snapshot, trust_domain_of(snapshot)
            principal = f"{self._trust_domain}/ns/{src.namespace}/sa/{src.service_account}"
        return self.check(snapshot, workload, principal, src_ip, dst_ip, dst_port)

    def _log_denial(self, d: AuthzDecision, workload: Workload, principal: str | None, src_ip: str,
                    port: int) -> None:
        now = self.clock()
        if now - self._window >= 1.0:
            self._window, self._logged = now, 0
        if self._logged >= self.log_per_second:
            self._suppressed += 1
            return
        self._logged += 1
        more = f" ({self._suppressed} more denials not logged)" if self._suppressed else ""
        self._suppressed = 0
        log.info("authz: denied %s (%s) -> %s/%s:%d by %s: %s%s", principal or "plaintext", src_ip,
                 workload.namespace, workload.name, port, d.policy or "the ALLOW policies", d.reason, more)
