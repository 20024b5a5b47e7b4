"""Gateway API route schemas (gateway.networking.k8s.io/v1 HTTPRoute and GRPCRoute), GAMMA-style.

Routes attach to Services through parentRefs (group "", kind Service). The shapes,
limits and cross-field rules follow the Gateway API v1 CRDs (MaxItems, the filter
union, RequestRedirect/URLRewrite exclusivity, ReplacePrefixMatch needing one PathPrefix
match, backendRequest <= request, path value rules); the defaults the CRDs declare are
filled in (rules, matches, path, header/query match type, backendRef group/kind/
namespace/weight, redirect statusCode, mirror fraction denominator). Regular expressions
are compiled with Python's `re`. Not supported: Gateway parents, CORS, ExternalAuth and
ExtensionRef filters, and the experimental fields (retry, sessionPersistence).
"""

from __future__ import annotations

import re

from controlplane.model.fields import (
    Duration,
    Enum,
    Field,
    Int,
    List,
    Obj,
    Problems,
    Str,
    at_least_one,
    dns1035_label,
    dns_label,
    exactly_one,
    header_name,
    header_value,
    hostname,
    optional,
    parse_duration,
    port_field,
    regex_problem,
    required,
    show,
)

MAX_INT32 = 2**31 - 1


def _ns_default(problems: Problems) -> str:
    return problems.namespace


def _lower(s: str) -> str:
    return s.lower()


def _same(s):
    return s


# ---------------------------------------------------------------- Gateway API shared

def parent_ref() -> Obj:
    """GAMMA: routes attach to Services (group "", kind Service)."""
    hint = 'hostmesh routes attach to Services (GAMMA): set group: "" and kind: Service'
    return Obj({
        "group": required(Enum("", unsupported={"gateway.networking.k8s.io": "Gateways are not supported; " + hint}),
                          hint=hint),
        "kind": required(Enum("Service", unsupported={"Gateway": "Gateways are not supported; " + hint}), hint=hint),
        "name": required(dns1035_label()),
        "namespace": optional(dns_label(), default=_ns_default),
        "port": optional(port_field()),
        "sectionName": optional(dns_label()),
    })


def backend_object_ref() -> dict:
    return {
        "group": optional(Enum("", unsupported={"core": 'the core group is written ""'}), default=""),
        "kind": optional(Enum("Service"), default="Service"),
        "name": required(dns1035_label()),
        "namespace": optional(dns_label(), default=_ns_default),
        "port": required(port_field(), hint="required for a Service backend"),
    }


HTTP_HEADER = Obj({"name": required(header_name()), "value": required(header_value())})


def _header_actions_once(out, raw, path, problems):
    """Only one action per header name across set/add/remove."""
    seen: dict[str, str] = {}
    for action in ("set", "add", "remove"):
        for i, item in enumerate(out.get(action) or []):
            name = item["name"] if isinstance(item, dict) else item
            key = name.lower()
            if key in seen:
                problems.add(path + (action, i),
                             f"header {show(name)} already has an action ({seen[key]}); one action per header")
            else:
                seen[key] = action


HEADER_FILTER = Obj({
    "set": List(HTTP_HEADER, max_items=16, unique=("name", _lower, "header")),
    "add": List(HTTP_HEADER, max_items=16, unique=("name", _lower, "header")),
    "remove": List(header_name(), max_items=16, unique=(None, _lower, "header")),
}, checks=[at_least_one("set", "add", "remove"), _header_actions_once])


def _path_modifier_checks(out, raw, path, problems):
    t = out.get("type")
    for kind, fld in (("ReplaceFullPath", "replaceFullPath"), ("ReplacePrefixMatch", "replacePrefixMatch")):
        if t == kind and fld not in raw:
            problems.add(path + (fld,), f"required when type is {kind}")
        if t is not None and t != kind and fld in raw:
            problems.add(path + (fld,), f"must not be set when type is {t}")


PATH_MODIFIER = Obj({
    "type": required(Enum("ReplaceFullPath", "ReplacePrefixMatch")),
    "replaceFullPath": Str(min_len=0, max_len=1024),
    "replacePrefixMatch": Str(min_len=0, max_len=1024),
}, checks=[_path_modifier_checks])

REDIRECT = Obj({
    "scheme": Enum("http", "https"),
    "hostname": hostname(wildcard=False),
    "path": PATH_MODIFIER,
    "port": port_field(),
    "statusCode": optional(Enum(301, 302, 303, 307, 308), default=302),
})

URL_REWRITE = Obj({"hostname": hostname(wildcard=False), "path": PATH_MODIFIER},
                  checks=[at_least_one("hostname", "path")])


def _fraction_check(out, raw, path, problems):
    if "numerator" in out and "denominator" in out and out["numerator"] > out["denominator"]:
        problems.add(path + ("numerator",),
                     f"{out['numerator']} is greater than the denominator {out['denominator']}")


FRACTION = Obj({
    "numerator": required(Int(0, MAX_INT32)),
    "denominator": optional(Int(1, MAX_INT32), default=100),
}, checks=[_fraction_check])

MIRROR = Obj({
    "backendRef": required(Obj(backend_object_ref())),
    "percent": Int(0, 100),
    "fraction": FRACTION,
}, checks=[exactly_one("percent", "fraction", allow_none=True)])


def typed_union(kinds: dict[str, str], unsupported: dict[str, str]) -> Obj:
    """A Gateway API filter: `type` names which one config field must be present."""
    fields: dict[str, Field] = {
        "requestHeaderModifier": HEADER_FILTER,
        "responseHeaderModifier": HEADER_FILTER,
        "requestMirror": MIRROR,
        "requestRedirect": REDIRECT,
        "urlRewrite": URL_REWRITE,
    }

    def check(out, raw, path, problems):
        t = out.get("type")
        for kind, fld in kinds.items():
            if t == kind and fld not in raw:
                problems.add(path + (fld,), f"required when type is {kind}")
            elif fld in raw and t is not None and t != kind:
                problems.add(path + (fld,), f"must not be set when type is {t}")

    return Obj({"type": required(Enum(*kinds, unsupported=unsupported)),
                **{fld: fields[fld] for fld in kinds.values()}}, checks=[check])


HTTP_FILTER_KINDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
}
GRPC_FILTER_KINDS = {k: HTTP_FILTER_KINDS[k] for k in ("RequestHeaderModifier", "ResponseHeaderModifier",
                                                       "RequestMirror")}
_UNSUPPORTED_FILTERS = {"ExtensionRef": "hostmesh has no extension filters",
                        "CORS": "hostmesh does not implement CORS yet",
                        "ExternalAuth": "hostmesh does not implement external auth"}

HTTP_FILTER = typed_union(HTTP_FILTER_KINDS, _UNSUPPORTED_FILTERS)
GRPC_FILTER = typed_union(GRPC_FILTER_KINDS, {**_UNSUPPORTED_FILTERS,
                                              "RequestRedirect": "not available on a GRPCRoute",
                                              "URLRewrite": "not available on a GRPCRoute"})


def _filters_combination(out, raw, path, problems, *, field_name: str = "filters"):
    filters = out.get(field_name) or []
    types = [f.get("type") for f in filters]
    for once in ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite"):
        idx = [i for i, t in enumerate(types) if t == once]
        if len(idx) > 1:
            problems.add(path + (field_name, idx[1], "type"), f"{once} filter cannot be repeated")
    if "RequestRedirect" in types and "URLRewrite" in types:
        problems.add(path + (field_name, types.index("URLRewrite"), "type"),
                     "RequestRedirect and URLRewrite filters cannot be used together")


def http_backend_ref() -> Obj:
    return Obj({**backend_object_ref(),
                "weight": optional(Int(0, 1_000_000), default=1),
                "filters": List(HTTP_FILTER, max_items=16)},
               checks=[_filters_combination])


def grpc_backend_ref() -> Obj:
    return Obj({**backend_object_ref(),
                "weight": optional(Int(0, 1_000_000), default=1),
                "filters": List(GRPC_FILTER, max_items=16)},
               checks=[_filters_combination])


def _route_spec_checks(out, raw, path, problems):
    rules = out.get("rules") or []
    names: dict[str, int] = {}
    total = 0
    for i, rule in enumerate(rules):
        total += len(rule.get("matches") or [])
        name = rule.get("name")
        if name is not None:
            if name in names:
                problems.add(path + ("rules", i, "name"),
                             f"duplicate rule name {show(name)} (also at spec.rules[{names[name]}])")
            names.setdefault(name, i)
    if total > 128:
        problems.add(path + ("rules",), f"has {total} matches in all; at most 128 are allowed across all rules")


# ---------------------------------------------------------------- HTTPRoute

_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")
_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")


def _path_match_check(out, raw, path, problems):
    t, v = out.get("type"), out.get("value")
    if t is None or v is None:
        return
    where = path + ("value",)
    if t == "RegularExpression":
        msg = regex_problem(v)
        if msg:
            problems.add(where, msg)
        return
    if not v.startswith("/"):
        problems.add(where, f"{show(v)} must be an absolute path starting with '/' when type is {t}")
        return
    for bad in _PATH_FORBIDDEN:
        if bad in v:
            problems.add(where, f"{show(v)} must not contain '{bad}' when type is {t}")
            return
    if v.endswith(("/..", "/.")):
        problems.add(where, f"{show(v)} must not end with '/.' or '/..' when type is {t}")
        return
    if not _PATH_CHARS.match(v):
        problems.add(where, f"{show(v)} contains characters not allowed in a path (use %-encoding)")


def _value_regex_check(out, raw, path, problems):
    if out.get("type") == "RegularExpression" and "value" in out:
        msg = regex_problem(out["value"])
        if msg:
            problems.add(path + ("value",), msg)


PATH_MATCH = Obj({
    "type": optional(Enum("Exact", "PathPrefix", "RegularExpression"), default="PathPrefix"),
    "value": optional(Str(max_len=1024), default="/"),
}, checks=[_path_match_check])

HEADER_MATCH = Obj({
    "type": optional(Enum("Exact", "RegularExpression"), default="Exact"),
    "name": required(header_name()),
    "value": required(header_value()),
}, checks=[_value_regex_check])

QUERY_MATCH = Obj({
    "type": optional(Enum("Exact", "RegularExpression"), default="Exact"),
    "name": required(Str(max_len=256, rule=re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"),
                         rule_text="a valid query parameter name")),
    "value": required(Str(max_len=1024)),
}, checks=[_value_regex_check])

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")

HTTP_MATCH = Obj({
    "path": optional(PATH_MATCH, default={"type": "PathPrefix", "value": "/"}),
    "headers": List(HEADER_MATCH, max_items=16, unique=("name", _lower, "header name")),
    "queryParams": List(QUERY_MATCH, max_items=16, unique=("name", _same, "query parameter")),
    "method": Enum(*HTTP_METHODS),
})


def _timeouts_check(out, raw, path, problems):
    req, backend = out.get("request"), out.get("backendRequest")
    if req is None or backend is None:
        return
    r, b = parse_duration(req), parse_duration(backend)
    if r != 0 and b > r:
        problems.add(path + ("backendRequest",),
                     f"{show(backend)} is longer than the request timeout {show(req)}")


TIMEOUTS = Obj({"request": Duration(), "backendRequest": Duration()}, checks=[_timeouts_check])


def _http_rule_checks(out, raw, path, problems):
    _filters_combination(out, raw, path, problems)
    filters = out.get("filters") or []
    if out.get("backendRefs") and any(f.get("type") == "RequestRedirect" for f in filters):
        problems.add(path + ("filters",), "a RequestRedirect filter must not be used together with backendRefs")
    prefix_modifiers = []
    for i, f in enumerate(filters):
        cfg = f.get("requestRedirect") or f.get("urlRewrite") or {}
        if (cfg.get("path") or {}).get("type") == "ReplacePrefixMatch":
            prefix_modifiers.append(i)
    for b, ref in enumerate(out.get("backendRefs") or []):
        for f in ref.get("filters") or []:
            cfg = f.get("requestRedirect") or f.get("urlRewrite") or {}
            if (cfg.get("path") or {}).get("type") == "ReplacePrefixMatch":
                prefix_modifiers.append(("backendRefs", b))
    if prefix_modifiers:
        matches = out.get("matches") or []
        if len(matches) != 1 or (matches[0].get("path") or {}).get("type") != "PathPrefix":
            problems.add(path + ("matches",),
                         "a ReplacePrefixMatch path modifier needs exactly one match, of type PathPrefix")


HTTP_RULE = Obj({
    "name": dns_label(),
    "matches": optional(List(HTTP_MATCH, max_items=64), default=[{"path": {"type": "PathPrefix", "value": "/"}}]),
    "filters": List(HTTP_FILTER, max_items=16),
    "backendRefs": List(http_backend_ref(), max_items=16),
    "timeouts": TIMEOUTS,
}, checks=[_http_rule_checks])

ROUTE_COMMON = {
    "parentRefs": required(List(parent_ref(), min_items=1, max_items=32)),
    "hostnames": List(hostname(), max_items=16, unique=(None, _same, "hostname")),
}

HTTP_ROUTE_SPEC = Obj({
    **ROUTE_COMMON,
    "rules": optional(List(HTTP_RULE, min_items=1, max_items=16),
                      default=[{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]),
}, checks=[_route_spec_checks])


# ---------------------------------------------------------------- GRPCRoute

_GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


def _grpc_method_check(out, raw, path, problems):
    if "service" not in raw and "method" not in raw:
        problems.add(path, "one or both of service and method are required")
        return
    t = out.get("type")
    for fld, rule, text in (("service", _GRPC_SERVICE, "a gRPC service name (like helloworld.Greeter)"),
                            ("method", _GRPC_METHOD, "a gRPC method name (like SayHello)")):
        v = out.get(fld)
        if v is None:
            continue
        if t == "Exact" and not rule.match(v):
            problems.add(path + (fld,), f"{show(v)} is not {text}")
        elif t == "RegularExpression":
            msg = regex_problem(v)
            if msg:
                problems.add(path + (fld,), msg)


GRPC_METHOD_MATCH = Obj({
    "type": optional(Enum("Exact", "RegularExpression"), default="Exact"),
    "service": Str(max_len=1024),
    "method": Str(max_len=1024),
}, checks=[_grpc_method_check])

GRPC_MATCH = Obj({
    "method": GRPC_METHOD_MATCH,
    "headers": List(HEADER_MATCH, max_items=16, unique=("name", _lower, "header name")),
})

GRPC_RULE = Obj({
    "name": dns_label(),
    "matches": List(GRPC_MATCH, max_items=64),
    "filters": List(GRPC_FILTER, max_items=16),
    "backendRefs": List(grpc_backend_ref(), max_items=16),
}, checks=[_filters_combination])

GRPC_ROUTE_SPEC = Obj({
    **ROUTE_COMMON,
    "rules": List(GRPC_RULE, min_items=1, max_items=16),
}, checks=[_route_spec_checks])
