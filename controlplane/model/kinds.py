"""One schema per config kind, built from the validators in `fields.py`.

Each `KindSpec` says which apiVersion serves the kind, how its metadata.name is checked
and the schema of its spec. Every kind is namespaced (MeshConfig is a singleton: one in
the whole mesh, in any namespace). Gateway API route schemas live in `routes.py`.

Schemas fill in the defaults the APIs define (Service type/protocol/targetPort/selector,
Workload serviceAccount/ports, MeshConfig values, loadBalancer.type and preferSameNode,
retries.retryNonIdempotent, rateLimit and connectionRateLimit burst and perSourceWorkload, FaultInjection and
TrafficPolicy targetRef.group, AuthorizationPolicy action, forwardOriginalToken, MeshConfig
accessLog.samplingPercentage, Telemetry accessLogging.disabled), so the
canonical spec an agent receives is complete where a default exists. Fields whose
behaviour has no default (timeouts, retries, limits) stay absent when not written, and so
do the settings whose defaults are the agents' (outlierDetection's, documented there).

Cross-object rules (references, duplicates, clusterIP allocation) live in `references.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from controlplane.model import routes
from controlplane.model.fields import (
    CIDR,
    DNS1035_LABEL,
    DNS1035_TEXT,
    DNS1123_SUBDOMAIN,
    INVALID,
    SUBDOMAIN_TEXT,
    Bool,
    Const,
    Duration,
    Either,
    Enum,
    Field,
    Int,
    IPv4,
    List,
    Map,
    NotSupportedYet,
    Number,
    Obj,
    Problems,
    Str,
    at_least_one,
    describe,
    dns1035_label,
    dns_label,
    dns_subdomain,
    exactly_one,
    header_name,
    header_value,
    label_key,
    label_value,
    labels_map,
    name_problem,
    not_supported_yet_message,
    optional,
    parse_duration,
    port_field,
    port_name,
    render_path,
    required,
    show,
    token,
)

SERVICE_API = "v1"
HOSTMESH_API = "hostmesh.io/v1alpha1"
GATEWAY_API = "gateway.networking.k8s.io/v1"

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_CIDR = "198.19.0.0/16"
DEFAULT_CERTIFICATE_TTL = "24h"
MAX_INT32 = 2**31 - 1


def _ns_default(problems: Problems) -> str:
    return problems.namespace


def _lower(s: str) -> str:
    return s.lower()


def _same(s):
    return s


# ---------------------------------------------------------------- shared pieces

def selector_obj() -> Obj:
    """Istio-style workload selector: {matchLabels: {k: v}}."""
    return Obj({"matchLabels": required(Map(label_key(), label_value(), max_items=64))},
               checks=[_non_empty("matchLabels")])


def _non_empty(name: str):
    def check(out, raw, path, problems):
        if name in out and not out[name]:
            problems.add(path + (name,), "must not be empty")
    return check


def target_ref() -> Obj:
    """A policy's target: a Service in the policy's namespace."""
    return Obj({
        "group": optional(Enum("", unsupported={"core": 'the core group is written ""'}), default=""),
        "kind": required(Enum("Service")),
        "name": required(dns1035_label()),
    })


# ---------------------------------------------------------------- v1 Service

APP_PROTOCOLS = ("tcp", "http", "http2", "grpc", "tls", "https", "kubernetes.io/h2c")
# the ones the agents parse as HTTP (the others are relayed as TCP; see nodeagent/proxy/l7/detect.py)
L7_APP_PROTOCOLS = frozenset({"http", "http2", "grpc", "kubernetes.io/h2c"})


def _service_port_defaults(out, raw, path, problems):
    if "targetPort" not in raw and "port" in out:
        out["targetPort"] = out["port"]


SERVICE_PORT = Obj({
    "name": optional(dns_label()),
    "port": required(port_field()),
    "targetPort": optional(Either(port_field(), port_name())),
    "protocol": optional(Enum("TCP", unsupported={"UDP": "only TCP is supported",
                                                  "SCTP": "only TCP is supported"}), default="TCP"),
    "appProtocol": optional(Enum(*APP_PROTOCOLS)),
}, checks=[_service_port_defaults])


def _cluster_ip_problem(value: str) -> str | None:
    if value == "None":
        return 'headless Services (clusterIP: None) are not supported; omit clusterIP to allocate one'
    if value == "":
        return None
    import ipaddress
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return f"{show(value)} is not an IPv4 address"
    return None


def _service_checks(out, raw, path, problems):
    ports = out.get("ports")
    if not isinstance(ports, list):
        return
    if len(ports) > 1:
        for i, p in enumerate(ports):
            if "name" not in p:
                problems.add(path + ("ports", i, "name"),
                             "required field is missing (every port of a multi-port Service needs a name)")
    seen_names: dict[str, int] = {}
    seen_ports: dict[int, int] = {}
    for i, p in enumerate(ports):
        name = p.get("name")
        if name is not None:
            if name in seen_names:
                problems.add(path + ("ports", i, "name"),
                             f"duplicate port name {show(name)} (also at spec.ports[{seen_names[name]}])")
            seen_names.setdefault(name, i)
        if p["port"] in seen_ports:
            problems.add(path + ("ports", i, "port"),
                         f"duplicate port {p['port']} (also at spec.ports[{seen_ports[p['port']]}])")
        seen_ports.setdefault(p["port"], i)
    if out.get("clusterIP") == "":
        del out["clusterIP"]


SERVICE_SPEC = Obj({
    "clusterIP": optional(Str(min_len=0, check_fn=_cluster_ip_problem)),
    "type": optional(Enum("ClusterIP", unsupported={t: "only ClusterIP Services are supported"
                                                    for t in ("NodePort", "LoadBalancer", "ExternalName")}),
                     default="ClusterIP"),
    "selector": optional(labels_map(), default={}),
    "ports": required(List(SERVICE_PORT, min_items=1, max_items=100)),
}, checks=[_service_checks])


# ---------------------------------------------------------------- hostmesh.io Workload

WORKLOAD_PORT = Obj({
    "name": required(port_name()),
    "port": required(port_field()),
    "protocol": optional(Enum("TCP", unsupported={"UDP": "only TCP is supported",
                                                  "SCTP": "only TCP is supported"}), default="TCP"),
})

WORKLOAD_SPEC = Obj({
    "node": required(dns_subdomain()),
    "address": required(IPv4()),
    "serviceAccount": optional(dns_subdomain(), default="default"),
    "ports": optional(List(WORKLOAD_PORT, max_items=100, unique=("name", _same, "port name")), default=[]),
}, checks=[lambda out, raw, path, problems: _unique_ports(out, path, problems)])


def _unique_ports(out, path, problems):
    seen: dict[int, int] = {}
    for i, p in enumerate(out.get("ports") or []):
        if p["port"] in seen:
            problems.add(path + ("ports", i, "port"),
                         f"duplicate port {p['port']} (also at spec.ports[{seen[p['port']]}])")
        seen.setdefault(p["port"], i)


# ---------------------------------------------------------------- TrafficPolicy

RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
            "retriable-status-codes", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
            "unavailable")


def _lb_checks(out, raw, path, problems):
    t = out.get("type")
    if t == "RING_HASH" and "ringHash" not in raw:
        problems.add(path + ("ringHash",), "required when type is RING_HASH")
    elif "ringHash" in raw and t is not None and t != "RING_HASH":
        problems.add(path + ("ringHash",), f"must not be set when type is {t}")


LOAD_BALANCER = Obj({
    "type": optional(Enum("ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "RANDOM"), default="ROUND_ROBIN"),
    "ringHash": Obj({
        "header": header_name(),
        "cookie": token("a valid cookie name"),
        "sourceIP": Const(True, "hash on the client address"),
    }, checks=[exactly_one("header", "cookie", "sourceIP")]),
    "preferSameNode": optional(Bool(), default=False),
}, checks=[_lb_checks])

CONNECTION_POOL = Obj({
    "maxConnections": Int(1, MAX_INT32),
    "maxPendingRequests": Int(1, MAX_INT32),
    "maxRequestsPerConnection": Int(1, MAX_INT32),
    # concurrent requests (and retries) in flight to the destination Service, per proxy
    "maxRequests": Int(1, MAX_INT32),
    "maxRetries": Int(1, MAX_INT32),
    "connectTimeout": Duration(positive=True),
}, checks=[at_least_one("maxConnections", "maxPendingRequests", "maxRequestsPerConnection", "maxRequests",
                        "maxRetries", "connectTimeout")])


def _outlier_checks(out, raw, path, problems):
    if out.get("consecutive5xxErrors") == 0 and out.get("consecutiveGatewayErrors") == 0:
        problems.add(path, "sets no ejection trigger: consecutive5xxErrors and consecutiveGatewayErrors are both 0")


# Defaults are the agents' (not filled in here): consecutive5xxErrors 5, consecutiveGatewayErrors
# 0 (0 disables a trigger), interval 10s, baseEjectionTime 30s, maxEjectionPercent 10; as in
# Envoy, at least one endpoint may always be ejected, whatever maxEjectionPercent allows.
OUTLIER_DETECTION = Obj({
    "consecutive5xxErrors": Int(0, MAX_INT32),
    "consecutiveGatewayErrors": Int(0, MAX_INT32),
    "interval": Duration(positive=True),
    "baseEjectionTime": Duration(positive=True),
    "maxEjectionPercent": Int(0, 100),
}, checks=[_outlier_checks])


def _backoff_checks(out, raw, path, problems):
    base, most = out.get("baseInterval"), out.get("maxInterval")
    if base is not None and most is not None and parse_duration(most) < parse_duration(base):
        problems.add(path + ("maxInterval",), f"{show(most)} is shorter than baseInterval {show(base)}")


def _retries_checks(out, raw, path, problems):
    """retriableStatusCodes goes with retryOn retriable-status-codes, both ways."""
    retry_on = out.get("retryOn")
    if retry_on is None and "retryOn" in raw:
        return   # invalid: already reported
    wants = "retriable-status-codes" in (retry_on or ())
    if wants and "retriableStatusCodes" not in raw:
        problems.add(path + ("retriableStatusCodes",),
                     "required when retryOn contains retriable-status-codes")
    elif not wants and "retriableStatusCodes" in raw:
        problems.add(path + ("retriableStatusCodes",), "only used with retryOn retriable-status-codes")


RETRIES = Obj({
    "attempts": required(Int(0, 100)),   # retries after the first try
    "perTryTimeout": Duration(positive=True),
    "retryOn": List(Enum(*RETRY_ON), unique=(None, _same, "condition")),
    "retriableStatusCodes": List(Int(100, 599), min_items=1, unique=(None, _same, "status code")),
    "backoff": Obj({"baseInterval": Duration(positive=True), "maxInterval": Duration(positive=True)},
                   checks=[_backoff_checks]),
    "retryNonIdempotent": optional(Bool(), default=False),
    "budget": Obj({"percent": Number(0, 100), "minRetryConcurrency": Int(0, MAX_INT32)}),
}, checks=[_retries_checks])


def _bucket_defaults(out, raw, path, problems):
    """burst (the bucket size) defaults to the count per unit."""
    for count in ("requestsPerUnit", "connectionsPerUnit"):
        if "burst" not in raw and count in out:
            out["burst"] = out[count]


def token_bucket(count: str) -> Obj:
    """A local rate limit: ``count`` tokens per ``unit``, a bucket of ``burst``, optionally one
    bucket per source workload."""
    return Obj({
        count: required(Int(1, MAX_INT32)),
        "unit": required(Enum("second", "minute", "hour")),
        "burst": Int(1, MAX_INT32),
        "perSourceWorkload": optional(Bool(), default=False),
    }, checks=[_bucket_defaults])


RATE_LIMIT = token_bucket("requestsPerUnit")
# New connections to the Service's ports (any protocol), taken at the client's node before
# protocol detection; over the limit the connection is reset (nodeagent/proxy/connlimit.py).
CONNECTION_RATE_LIMIT = token_bucket("connectionsPerUnit")

def _hc_checks(out, raw, path, problems):
    interval, timeout = out.get("interval"), out.get("timeout")
    if interval is not None and timeout is not None and parse_duration(timeout) > parse_duration(interval):
        problems.add(path + ("timeout",), f"{show(timeout)} is longer than the interval {show(interval)}")


def _hc_path_problem(v: str) -> str | None:
    if not v.startswith("/") or any(c in v for c in " \r\n\t#"):
        return f"{show(v)} is not a request path: it starts with '/' and has no spaces, '#' or control characters"
    return None


# Active health checks (nodeagent/healthcheck.py): each agent probes its own node's
# endpoints; agent defaults: interval 10s, timeout 1s, unhealthyThreshold 3,
# healthyThreshold 2, jitter 1s, panicThreshold 50 (percent healthy below which the
# balancer uses every endpoint, as Envoy's healthy panic threshold)
HEALTH_CHECK = Obj({
    "interval": Duration(positive=True),
    "timeout": Duration(positive=True),
    "unhealthyThreshold": Int(1, 1000),
    "healthyThreshold": Int(1, 1000),
    "jitter": Duration(),
    "port": port_field(),
    "panicThreshold": Int(0, 100),
    "http": Obj({"path": required(Str(max_len=1024, check_fn=_hc_path_problem)),
                 "expectedStatuses": List(Int(100, 599), min_items=1, max_items=32, unique=(None, _same, "status"))}),
    "tcp": Obj({}),
    "grpc": Obj({"service": Str(min_len=0, max_len=256)}),
}, checks=[exactly_one("http", "tcp", "grpc"), _hc_checks])

_POLICY_SECTIONS = ("loadBalancer", "connectionPool", "outlierDetection", "timeout", "retries", "rateLimit",
                    "healthCheck", "connectionRateLimit")
# the sections the agents also apply to connections relayed as TCP (the others act on HTTP)
TCP_POLICY_SECTIONS = ("connectionRateLimit", "healthCheck")


def _policy_timeouts_check(out, raw, path, problems):
    """A try longer than the whole request could never run to its own timeout (0s: no timeout)."""
    timeout, per_try = out.get("timeout"), (out.get("retries") or {}).get("perTryTimeout")
    if timeout is None or per_try is None:
        return
    t, p = parse_duration(timeout), parse_duration(per_try)
    if t != 0 and p > t:
        problems.add(path + ("retries", "perTryTimeout"),
                     f"{show(per_try)} is longer than the request timeout {show(timeout)} "
                     f"({render_path(path + ('timeout',))})")


TRAFFIC_POLICY_SPEC = Obj({
    "targetRef": required(target_ref()),
    "loadBalancer": LOAD_BALANCER,
    "connectionPool": CONNECTION_POOL,
    "outlierDetection": OUTLIER_DETECTION,
    "timeout": Duration(),
    "retries": RETRIES,
    "rateLimit": RATE_LIMIT,
    "healthCheck": HEALTH_CHECK,
    "connectionRateLimit": CONNECTION_RATE_LIMIT,
}, checks=[at_least_one(*_POLICY_SECTIONS), _policy_timeouts_check])


# ---------------------------------------------------------------- FaultInjection

ROUTE_GROUP = "gateway.networking.k8s.io"
# the kinds a FaultInjection may target, by group
FAULT_TARGET_KINDS = {"": ("Service",), ROUTE_GROUP: ("HTTPRoute", "GRPCRoute")}


def _article(kind: str) -> str:
    return "an" if kind == "HTTPRoute" else "a"   # "an HTTPRoute", "a GRPCRoute", "a Service"


def _fault_target_checks(out, raw, path, problems):
    group, kind, name = out.get("group"), out.get("kind"), out.get("name")
    if group is None or kind is None:
        return
    if kind not in FAULT_TARGET_KINDS[group]:
        want = next(g for g, ks in FAULT_TARGET_KINDS.items() if kind in ks)
        problems.add(path + ("kind",), f"{kind} is not in group {show(group)}"
                                       f"{' (the default)' if 'group' not in raw else ''}: "
                                       f"{_article(kind)} {kind} is in group {show(want)}")
    elif kind == "Service" and name is not None:
        msg = name_problem(name, DNS1035_LABEL, 63, DNS1035_TEXT)
        if msg:
            problems.add(path + ("name",), msg)


def fault_target_ref() -> Obj:
    """A FaultInjection's target in its namespace: a Service (group "") or a route
    (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute)."""
    return Obj({
        "group": optional(Enum("", ROUTE_GROUP, unsupported={"core": 'the core group is written ""'}), default=""),
        "kind": required(Enum("Service", "HTTPRoute", "GRPCRoute")),
        "name": required(dns_subdomain()),
    }, checks=[_fault_target_checks])


# The fault applies to the requests that carry every one of `headers` with exactly that value
# (names compared case-insensitively), to every request without `headers`.
FAULT_SPEC = Obj({
    "targetRef": required(fault_target_ref()),
    "delay": Obj({"percentage": required(Number(0, 100)), "fixedDelay": required(Duration(positive=True))}),
    "abort": Obj({"percentage": required(Number(0, 100)), "httpStatus": Int(200, 599), "grpcStatus": Int(0, 16)},
                 checks=[exactly_one("httpStatus", "grpcStatus")]),
    "headers": List(Obj({"name": required(header_name()), "value": required(header_value(max_len=1024))}),
                    min_items=1, max_items=16, unique=("name", _lower, "header")),
}, checks=[at_least_one("delay", "abort")])


# ---------------------------------------------------------------- AuthorizationPolicy
# Istio's shape and semantics (nodeagent/proxy/authz.py). Connection attributes are enforced
# at the destination node on the identity the mTLS tunnel proved; request attributes where
# requests are parsed: the destination's proxy parses the connections of a workload whose
# policies need them (nodeagent/proxy/request_policy.py). Non-HTTP traffic to such a
# workload is judged fail-closed: request attributes match in DENY, never in ALLOW.

_STRINGS = List(Str(max_len=1024), min_items=1)
_METHOD = token("an HTTP method (like GET)")


def _path_pattern_problem(v: str) -> str | None:
    if not (v.startswith(("/", "*")) or v.endswith("*")):
        return f"{show(v)} is not a path: it must start with '/' or use a '*' prefix/suffix wildcard"
    return None


def _wildcard_problem(v: str) -> str | None:
    if v != "*" and "*" in v[1:-1]:
        return f"{show(v)}: '*' may only be the whole value, a prefix (x*) or a suffix (*x)"
    return None


_MATCHES = List(Str(max_len=1024, check_fn=_wildcard_problem), min_items=1)
_PATHS = List(Str(max_len=1024, check_fn=_path_pattern_problem), min_items=1)
_IP_BLOCKS = List(CIDR(address_ok=True), min_items=1)
_PORTS = List(port_field(), min_items=1)

SOURCE = Obj({
    "principals": _MATCHES, "notPrincipals": _MATCHES,
    "requestPrincipals": _MATCHES, "notRequestPrincipals": _MATCHES,
    "namespaces": _MATCHES, "notNamespaces": _MATCHES,
    "ipBlocks": _IP_BLOCKS, "notIpBlocks": _IP_BLOCKS,
    "remoteIpBlocks": _IP_BLOCKS, "notRemoteIpBlocks": _IP_BLOCKS,
}, checks=[at_least_one("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
                        "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")])

OPERATION = Obj({
    "hosts": _MATCHES, "notHosts": _MATCHES,
    "methods": List(_METHOD, min_items=1), "notMethods": List(_METHOD, min_items=1),
    "paths": _PATHS, "notPaths": _PATHS,
    "ports": _PORTS, "notPorts": _PORTS,
}, checks=[at_least_one("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths", "ports", "notPorts")])

# `when` keys (Istio's "Authorization Policy Conditions")
CONDITION_KEYS_L4 = ("source.ip", "remote.ip", "source.namespace", "source.principal",
                     "destination.ip", "destination.port")
CONDITION_KEYS_AUTH = ("request.auth.principal", "request.auth.audiences", "request.auth.presenter")
_HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
_CLAIM_PART = re.compile(r"^[^\[\]]{1,256}$")


def _bracketed_parts(key: str, prefix: str) -> list[str] | None:
    """``prefix[a][b]`` -> ["a", "b"] (parts may be empty: checked by the caller)."""
    if not key.startswith(prefix + "[") or not key.endswith("]"):
        return None
    return key[len(prefix) + 1:-1].split("][")


def _request_key_problem(key: str) -> str | None:
    """None for a well-formed request.* key, else what is wrong with it."""
    if key in CONDITION_KEYS_AUTH:
        return None
    header = _bracketed_parts(key, "request.headers")
    if header is not None:
        if len(header) != 1 or not _HEADER_TOKEN.match(header[0]):
            return f"{show(key)}: request.headers[NAME] needs one valid HTTP header name"
        return None
    claim = _bracketed_parts(key, "request.auth.claims")
    if claim is not None:
        if not all(_CLAIM_PART.match(part) for part in claim):
            return f"{show(key)}: request.auth.claims[NAME] (nested: [a][b]) needs non-empty claim names"
        return None
    return (f"{show(key)} is not a condition key (known: {', '.join(CONDITION_KEYS_L4)}, "
            f"{', '.join(CONDITION_KEYS_AUTH)}, request.headers[NAME], request.auth.claims[NAME])")


def _condition_checks(out, raw, path, problems):
    key = out.get("key")
    if key is None:
        return
    if key.startswith("request."):
        problem = _request_key_problem(key)
        if problem:
            problems.add(path + ("key",), problem)
        return
    if key not in CONDITION_KEYS_L4:
        problems.add(path + ("key",), f"{show(key)} is not a condition key (known: "
                                      f"{', '.join(CONDITION_KEYS_L4)}, {', '.join(CONDITION_KEYS_AUTH)}, "
                                      f"request.headers[NAME], request.auth.claims[NAME])")
        return
    values = (out.get("values") or []) + (out.get("notValues") or [])
    for i, v in enumerate(values):
        problem = _condition_value_problem(key, v)
        if problem:
            field = "values" if i < len(out.get("values") or []) else "notValues"
            index = i if field == "values" else i - len(out.get("values") or [])
            problems.add(path + (field, index), problem)


def _condition_value_problem(key: str, value: str) -> str | None:
    if key in ("source.ip", "remote.ip", "destination.ip"):
        import ipaddress
        try:
            ipaddress.IPv4Network(value, strict=True)
        except ValueError:
            return f"{show(value)} is not an IPv4 address or CIDR"
    if key == "destination.port" and not (value.isdigit() and 0 < int(value) < 65536):
        return f"{show(value)} is not a port number"
    return _wildcard_problem(value)


CONDITION = Obj({
    "key": required(Str(max_len=256)),
    "values": List(Str(max_len=1024), min_items=1),
    "notValues": List(Str(max_len=1024), min_items=1),
}, checks=[at_least_one("values", "notValues"), _condition_checks])

AUTHZ_RULE = Obj({
    "from": List(Obj({"source": required(SOURCE)}), min_items=1),
    "to": List(Obj({"operation": required(OPERATION)}), min_items=1),
    "when": List(CONDITION, min_items=1),
})

AUTHZ_SPEC = Obj({
    "selector": selector_obj(),
    "action": optional(Enum("ALLOW", "DENY", "AUDIT", unsupported={
        "CUSTOM": "hostmesh has no external authorizers"}), default="ALLOW"),
    "rules": List(AUTHZ_RULE, max_items=256),
})


# ---------------------------------------------------------------- PeerAuthentication

MTLS = Obj({"mode": required(Enum("STRICT", "PERMISSIVE", unsupported={
    "DISABLE": "hostmesh always offers mTLS; use PERMISSIVE to accept plaintext",
    "UNSET": "omit mtls to inherit instead"}))})


class _PortKey(Field):
    """A map key that is a port number (YAML `8080:` is an integer key)."""

    def check(self, value, path, problems):
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, f"keys must be port numbers, got {describe(value)}")
            return INVALID
        return port_field().check(value, path, problems)


def _peer_checks(out, raw, path, problems):
    if "portLevelMtls" in raw and "selector" not in raw:
        problems.add(path + ("portLevelMtls",), "requires a selector (port-level settings apply to selected workloads)")


PEER_AUTHN_SPEC = Obj({
    "selector": selector_obj(),
    "mtls": MTLS,
    "portLevelMtls": Map(_PortKey(), MTLS, max_items=64, key_out=lambda k: str(int(k))),
}, checks=[at_least_one("mtls", "portLevelMtls"), _peer_checks])


# ---------------------------------------------------------------- RequestAuthentication

def _https_url_problem(v: str) -> str | None:
    try:
        parts = urlsplit(v)
    except ValueError:
        parts = None
    if parts is None or parts.scheme != "https" or not parts.hostname:
        return f"{show(v)} is not an https:// URL"
    return None


def _jwks_problem(v: str) -> str | None:
    try:
        doc = json.loads(v)
    except ValueError as exc:
        return f"is not valid JSON: {exc}"
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return 'must be a JSON Web Key Set: a JSON object with a "keys" list'
    return None


_REL_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _relative_path(rel: str) -> tuple:
    """"fromHeaders[0].name" -> ("fromHeaders", 0, "name")."""
    return tuple(int(index) if index else name for name, index in _REL_PART.findall(rel))


def _jwt_rule_checks(out, raw, path, problems):
    """The agent's own checks of a rule (nodeagent/proxy/jwtauth.py: the keys it can load, the
    headers it may write), so both sides agree; only on a rule the schema found clean."""
    from nodeagent.proxy.jwtauth import validate_jwt_rule
    if any(p[:len(path)] == path for p, _ in problems.items):
        return
    for rel, message in validate_jwt_rule(raw):
        problems.add(path + _relative_path(rel), message)


_QUERY_PARAM = re.compile(r"^[!$'()*+,\-./0-9:;@A-Z_a-z~%]{1,256}$")

JWT_RULE = Obj({
    "issuer": required(Str(max_len=1024)),
    "jwksUri": Str(max_len=2048, check_fn=_https_url_problem),
    "jwks": Str(max_len=65536, check_fn=_jwks_problem),
    "audiences": List(Str(max_len=1024), unique=(None, _same, "audience")),
    "forwardOriginalToken": optional(Bool(), default=False),
    "fromHeaders": List(Obj({"name": required(header_name()), "prefix": Str(min_len=0, max_len=256)}),
                        min_items=1, unique=("name", _lower, "header")),
    "fromParams": List(Str(max_len=256, rule=_QUERY_PARAM, rule_text="a query parameter name"), min_items=1,
                       unique=(None, _same, "parameter")),
    "outputPayloadToHeader": header_name(),
    "outputClaimToHeaders": List(Obj({"header": required(header_name()), "claim": required(Str(max_len=256))}),
                                 min_items=1, unique=("header", _lower, "header")),
}, checks=[exactly_one("jwksUri", "jwks"), _jwt_rule_checks])

REQUEST_AUTHN_SPEC = Obj({
    "selector": selector_obj(),
    "jwtRules": required(List(JWT_RULE, min_items=1, max_items=64, unique=("issuer", _same, "issuer"))),
})


# ---------------------------------------------------------------- MeshConfig

def _registry_only_not_yet(out, raw, path, problems):
    if out.get("mode") == "REGISTRY_ONLY":
        problems.add(path + ("mode",), not_supported_yet_message(
            "the agents capture only the mesh's own CIDRs (capture.meshCIDRs), so traffic to other "
            "addresses never reaches a proxy that could refuse it"))


# ---------------------------------------------------------------- access logs
# MeshConfig accessLog says where the agents write their JSON access log lines and the
# mesh-wide sampling; Telemetry objects change the sampling (or switch it off) per route,
# Service or workload (nodeagent/accesslog.py). No accessLog: no access logs (Istio's default).

ACCESS_LOG_STDOUT = "stdout"


def _access_log_output_problem(v: str) -> str | None:
    if v == ACCESS_LOG_STDOUT:
        return None
    if not v.startswith("/"):
        return f'{show(v)} is neither "stdout" nor an absolute file path'
    if v.endswith("/"):
        return f"{show(v)} names a directory; give the path of a file"
    if any(ord(c) < 0x20 or c == "\x7f" for c in v):
        return f"{show(v)} contains control characters"
    return None


ACCESS_LOG = Obj({
    # "stdout" (the agent's standard output: the journal under systemd, the container log
    # in Kubernetes; /dev/stdout means the same) or a file on each node, opened O_APPEND
    "output": required(Str(max_len=4096, check_fn=_access_log_output_problem)),
    # the share of requests and connections logged where no Telemetry says otherwise
    "samplingPercentage": optional(Number(0, 100), default=100),
})


def _access_logging_checks(out, raw, path, problems):
    if out.get("disabled") and "samplingPercentage" in raw:
        problems.add(path + ("samplingPercentage",), "has no effect with disabled: true (nothing is logged)")


# A Telemetry's accessLogging sets its scope's logging whole: off (disabled), or on at
# samplingPercentage (the agents' default 100; not inherited from a wider scope)
ACCESS_LOGGING = Obj({
    "disabled": optional(Bool(), default=False),
    "samplingPercentage": Number(0, 100),
}, checks=[_access_logging_checks])

TRACING = Obj({
    "randomSamplingPercentage": Number(0, 100),
    "disableSpanReporting": Bool(),
    "providers": List(Obj({"name": required(Str(max_len=253))}), min_items=1),
})

# Istio's Telemetry API for access logs, in hostmesh.io: which workloads (selector: in its
# namespace; neither selector nor targetRef: its whole namespace, the MeshConfig's namespace:
# the mesh) or which Service / HTTPRoute / GRPCRoute (targetRef) it applies to. The most
# specific wins: route, Service, selector, namespace, mesh, MeshConfig (nodeagent/accesslog.py).
TELEMETRY_SPEC = Obj({
    "selector": selector_obj(),
    "targetRef": fault_target_ref(),
    "accessLogging": ACCESS_LOGGING,
    "tracing": NotSupportedYet(TRACING, "the agents do not emit traces (access log lines carry the trace id "
                                        "of a traceparent or x-b3-traceid header)"),
}, checks=[exactly_one("selector", "targetRef", allow_none=True), at_least_one("accessLogging", "tracing")])


# ---------------------------------------------------------------- tracing (MeshConfig)
# Spans of proxied HTTP requests, sampled and exported over OTLP/HTTP (nodeagent/tracing.py,
# nodeagent/otlp.py). The agents' tracing core exists but their HTTP drivers do not create
# spans yet, so the section is checked in full and then refused; set this to True when they do.
MESH_TRACING_SUPPORTED = False
MESH_TRACING_NOT_YET = ("the agents' HTTP proxies do not create or export spans yet (they forward traceparent "
                        "and B3 headers unchanged)")
MAX_OTLP_TIMEOUT = 30.0


def _otlp_endpoint_problem(v: str) -> str | None:
    """The agent's own parser (nodeagent/tracing.py), so both sides accept the same URLs."""
    from nodeagent.tracing import parse_otlp_endpoint
    try:
        parse_otlp_endpoint(v)
    except ValueError as exc:
        return str(exc)
    return None


def _otlp_timeout_check(out, raw, path, problems):
    if "timeout" in out and parse_duration(out["timeout"]) > MAX_OTLP_TIMEOUT:
        problems.add(path + ("timeout",), f"{show(out['timeout'])} is longer than the maximum 30s")


MESH_TRACING = Obj({
    # the share of new traces sampled where the request carries no decision (a parent's
    # sampled flag, B3's sampled or debug, is always honoured); Istio's default 1 %
    "samplingPercentage": optional(Number(0, 100), default=1),
    "otlp": required(Obj({
        # OTLP/HTTP collector: http://host[:port][/path], port 4318 and /v1/traces by default
        "endpoint": required(Str(max_len=2048, check_fn=_otlp_endpoint_problem)),
        # one export request, connect to answer; a batch that takes longer is dropped and counted
        "timeout": optional(Duration(minimum=0.01), default="2s"),
    }, checks=[_otlp_timeout_check]), hint="where spans are sent, like {endpoint: http://otel-collector:4318}"),
})


MESH_CONFIG_SPEC = Obj({
    "trustDomain": optional(Str(max_len=255, rule=DNS1123_SUBDOMAIN,
                                rule_text="a valid trust domain (lowercase DNS name like cluster.local)"),
                            default=DEFAULT_TRUST_DOMAIN),
    "serviceCIDR": optional(CIDR(max_prefix=28), default=DEFAULT_SERVICE_CIDR),
    "certificateTTL": optional(Duration(minimum=60), default=DEFAULT_CERTIFICATE_TTL),
    "outboundTrafficPolicy": optional(Obj({"mode": required(Enum("ALLOW_ANY", "REGISTRY_ONLY"))},
                                          checks=[_registry_only_not_yet]),
                                      default={"mode": "ALLOW_ANY"}),
    # %2F / %5C in request paths before AuthorizationPolicy path matching (the proxies'
    # request checks, nodeagent/proxy/request_policy.py): REJECT answers 400, KEEP_UNCHANGED
    # keeps them encoded, UNESCAPE_AND_FORWARD decodes them to '/' and normalizes
    "pathNormalization": optional(Obj({"escapedSlashes": optional(
        Enum("REJECT", "KEEP_UNCHANGED", "UNESCAPE_AND_FORWARD"), default="REJECT")}),
        default={"escapedSlashes": "REJECT"}),
    # JSON access log lines (nodeagent/accesslog.py); absent: no access logs
    "accessLog": ACCESS_LOG,
    # spans of proxied requests over OTLP (nodeagent/tracing.py); absent: no tracing
    "tracing": MESH_TRACING if MESH_TRACING_SUPPORTED else NotSupportedYet(MESH_TRACING, MESH_TRACING_NOT_YET),
})


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class KindSpec:
    api_version: str
    kind: str
    spec: Obj
    name_rule: Callable[[str], str | None] = lambda v: name_problem(v, DNS1123_SUBDOMAIN, 253, SUBDOMAIN_TEXT)
    spec_required: bool = True
    carried: bool = True   # carried to agents as a ConfigObject (Service/Workload travel as their own types)
    not_supported_yet: str = ""   # why objects of this kind are refused: modeled, but no agent enforces it


def _service_name(v: str) -> str | None:
    return name_problem(v, DNS1035_LABEL, 63, DNS1035_TEXT)


def _mesh_config_name(v: str) -> str | None:
    return None if v == "default" else f'MeshConfig is a singleton and must be named "default", got {show(v)}'


KINDS: dict[str, KindSpec] = {k.kind: k for k in (
    KindSpec(SERVICE_API, "Service", SERVICE_SPEC, name_rule=_service_name, carried=False),
    KindSpec(HOSTMESH_API, "Workload", WORKLOAD_SPEC, carried=False),
    KindSpec(GATEWAY_API, "HTTPRoute", routes.HTTP_ROUTE_SPEC),
    KindSpec(GATEWAY_API, "GRPCRoute", routes.GRPC_ROUTE_SPEC),
    KindSpec(HOSTMESH_API, "TrafficPolicy", TRAFFIC_POLICY_SPEC),
    KindSpec(HOSTMESH_API, "FaultInjection", FAULT_SPEC),
    KindSpec(HOSTMESH_API, "AuthorizationPolicy", AUTHZ_SPEC),
    KindSpec(HOSTMESH_API, "PeerAuthentication", PEER_AUTHN_SPEC),
    KindSpec(HOSTMESH_API, "RequestAuthentication", REQUEST_AUTHN_SPEC),
    # a namespaced singleton (one in the whole mesh, in any namespace; like Istio's root-namespace
    # config): agents' ConfigObjects always carry a namespace
    KindSpec(HOSTMESH_API, "MeshConfig", MESH_CONFIG_SPEC, name_rule=_mesh_config_name, spec_required=False),
    KindSpec(HOSTMESH_API, "Telemetry", TELEMETRY_SPEC),
)}

API_VERSIONS = tuple(dict.fromkeys(k.api_version for k in KINDS.values()))


def known_kinds_text() -> str:
    return ", ".join(f"{k.api_version} {k.kind}" for k in KINDS.values())


NAMESPACE_FIELD: Field = dns_label()
LABELS_FIELD: Field = labels_map()
ANNOTATIONS_FIELD: Field = Map(label_key(), Str(min_len=0, max_len=262144))
