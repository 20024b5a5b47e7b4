"""Gateway API route filters as pure functions and immutable compiled objects (no I/O).

Compiled once per snapshot (``FilterChain.compile(spec_filters)``), applied per request.
Header lists follow the L7 codec's convention (``headers.py``): ``list[tuple[bytes, bytes]]``
with lowercase names; every function returns a new list and leaves its input alone.

Semantics (Gateway API v1, ``apis/v1/httproute_types.go``):

* **RequestHeaderModifier / ResponseHeaderModifier** (``HTTPHeaderFilter``): names are
  case-insensitive; within ``set`` (and within ``add``) only the first entry of a name
  counts. ``remove`` drops every field of that name; ``set`` replaces all fields of the
  name by one; ``add`` appends to the existing value with a comma, as the spec's example
  shows (``my-header: foo`` + add ``bar,baz`` -> ``my-header: foo,bar,baz``) — except
  ``set-cookie``, which RFC 9110 5.3 forbids combining, so it gets a field of its own. A
  valid filter names each header in one action only, so the order remove -> set -> add
  is only observable on invalid configs. Names written by the filter are lowercased.
* **URLRewrite**: ``hostname`` replaces the whole Host/:authority value; ``path`` is
  ``ReplaceFullPath`` (the path becomes the value) or ``ReplacePrefixMatch`` (the matched
  PathPrefix, compared element-wise with a trailing ``/`` ignored, is replaced; see
  ``replace_prefix_match`` for the spec's table). The query string is kept.
* **RequestRedirect**: answers with ``statusCode`` (default 302; 301/302/303/307/308) and a
  ``Location`` built from ``scheme`` (else the request's), ``hostname`` (else the request's
  Host without its port), ``port`` and ``path`` (else the request path; query kept).
  Port rules from the spec: an explicit ``port`` wins; else a given ``scheme`` implies its
  well-known port (http 80, https 443); else the listener port — in the mesh (GAMMA) the
  Service port the request was sent to. The port is left out of ``Location`` for http:80
  and https:443.
* **RequestMirror**: ``percent`` or ``fraction`` (numerator/denominator, default 100) of
  requests, all when neither is given. Which backend and whether it fires is decided by
  the router (``routing.py``); sending it, fire-and-forget, is the driver's job.
* Filters of one rule apply in the order they are listed (the spec's SHOULD), rule-level
  filters before the chosen backendRef's own filters.
* ``ExtensionRef`` and filter types this implementation does not know (``CORS``,
  ``ExternalAuth``, ...) are kept as ``unsupported``: the spec says such a filter must not
  be skipped — requests it would have processed get an error response (the router turns
  that into a 500).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

Headers = list[tuple[bytes, bytes]]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
WELL_KNOWN_PORTS = {b"http": 80, b"https": 443}

REPLACE_FULL_PATH = "ReplaceFullPath"
REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"

KNOWN_FILTERS = frozenset({"RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite",
                           "RequestRedirect", "RequestMirror"})


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


# ------------------------------------------------------------------ responses

@dataclass(frozen=True, slots=True)
class DirectResponse:
    """A response the proxy gives itself instead of forwarding.

    ``status``: the HTTP status. ``flag``: the response flag for ``x-hostmesh-flags`` and the
    access log ("" for a redirect, which is not an error). ``message``: a short body text.
    ``grpc_status``: the status of the trailers-only reply when the request is gRPC.
    ``headers``: extra header fields (``location`` for a redirect).

    Render errors with ``errors.local_reply(flag, status, message)`` /
    ``errors.grpc_error(flag, grpc_status, message)``; a redirect (``location`` set) is
    ``status`` + ``headers`` with an empty body.
    """

    status: int
    flag: str = ""
    message: str = ""
    grpc_status: int = 2  # UNKNOWN
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def location(self) -> bytes | None:
        for name, value in self.headers:
            if name == b"location":
                return value
        return None


# ------------------------------------------------------------------ header modifiers

def _header_list(entries: Any) -> tuple[tuple[bytes, bytes], ...]:
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for entry in entries or ():
        name = _b(entry["name"]).lower()
        if name in seen:  # "only the first entry with an equivalent name MUST be considered"
            continue
        seen.add(name)
        out.append((name, _b(entry.get("value", ""))))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    """A compiled ``HTTPHeaderFilter``: ``apply(headers)`` costs one pass over the headers."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "HeaderModifier":
        spec = spec or {}
        return cls(set=_header_list(spec.get("set")), add=_header_list(spec.get("add")),
                   remove=frozenset(_b(n).lower() for n in spec.get("remove") or ()))

    def apply(self, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
        drop = self.remove.union(n for n, _ in self.set) if self.set else self.remove
        if drop:
            out = [(n, v) for n, v in headers if n.lower() not in drop]
        else:
            out = list(headers)
        out.extend(self.set)
        for name, value in self.add:
            if name != b"set-cookie":
                for i, (n, v) in enumerate(out):
                    if n.lower() == name:
                        out[i] = (n, v + b"," + value if v else value)
                        break
                else:
                    out.append((name, value))
            else:
                out.append((name, value))
        return out


def apply_header_modifier(headers: Iterable[tuple[bytes, bytes]], spec: Mapping[str, Any]) -> Headers:
    """One-shot form of ``HeaderModifier.from_spec(spec).apply(headers)``."""
    return HeaderModifier.from_spec(spec).apply(headers)


# ------------------------------------------------------------------ paths

def split_target(target: bytes) -> tuple[bytes, bytes]:
    """``(path, query)`` of a request-target; the query keeps no ``?``; a fragment is dropped.

    Absolute-form (``http://host/p?q``) yields its path; asterisk-form is ``(b"*", b"")``.
    O(len(target)).
    """
    if target[:1] != b"/":
        if target == b"*":
            return b"*", b""
        i = target.find(b"://")
        if i >= 0:
            j = target.find(b"/", i + 3)
            q = target.find(b"?", i + 3)
            if j < 0 or (0 <= q < j):
                target = b"/" + (target[q:] if q >= 0 else b"")
            else:
                target = target[j:]
    h = target.find(b"#")
    if h >= 0:
        target = target[:h]
    q = target.find(b"?")
    if q < 0:
        return target, b""
    return target[:q], target[q + 1:]


def prefix_matches(path: bytes, prefix: bytes) -> bool:
    """Gateway API ``PathPrefix``: element-wise, case-sensitive, trailing ``/`` of the prefix ignored.

    ``/abc`` matches ``/abc``, ``/abc/`` and ``/abc/def`` but not ``/abcd``.
    """
    p = prefix.rstrip(b"/")
    return not p or path == p or path.startswith(p + b"/")


def replace_prefix_match(path: bytes, prefix: bytes, replacement: bytes) -> bytes:
    """``ReplacePrefixMatch``: replace the matched ``prefix`` of ``path`` (no query) by ``replacement``.

    The spec's table (request path | prefix | replacement -> result)::

        /foo/bar  /foo   /xyz   -> /xyz/bar      /foo/bar  /foo   ""    -> /bar
        /foo/bar  /foo   /xyz/  -> /xyz/bar      /foo/     /foo   ""    -> /
        /foo/bar  /foo/  /xyz   -> /xyz/bar      /foo      /foo   ""    -> /
        /foo/bar  /foo/  /xyz/  -> /xyz/bar      /foo/     /foo   /     -> /
        /foo      /foo   /xyz   -> /xyz          /foo      /foo   /     -> /
        /foo/     /foo   /xyz   -> /xyz/

    i.e. the trailing ``/`` of both prefix and replacement is ignored and the rest of the
    path (empty or starting with ``/``) is appended; an empty result is ``/``. A path the
    prefix does not match is returned unchanged.
    """
    p = prefix.rstrip(b"/")
    if p and not (path == p or path.startswith(p + b"/")):
        return path
    rest = path[len(p):]
    out = replacement.rstrip(b"/") + rest
    if not out:
        return b"/"
    if out[:1] != b"/":
        out = b"/" + out
    return out


@dataclass(frozen=True, slots=True)
class PathModifier:
    """A compiled ``HTTPPathModifier``."""

    type: str
    value: bytes

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "PathModifier":
        kind = spec.get("type", "")
        if kind == REPLACE_FULL_PATH:
            return cls(kind, _b(spec.get("replaceFullPath", "/")))
        if kind == REPLACE_PREFIX_MATCH:
            return cls(kind, _b(spec.get("replacePrefixMatch", "")))
        raise ValueError(f"unsupported path modifier type {kind!r}")

    def apply(self, path: bytes, matched_prefix: bytes | None) -> bytes:
        """The new path (no query) for request ``path``; ``matched_prefix`` is the PathPrefix
        value that matched (``ReplacePrefixMatch`` leaves the path alone without one)."""
        if self.type == REPLACE_FULL_PATH:
            return self.value or b"/"
        if matched_prefix is None:
            return path
        return replace_prefix_match(path, matched_prefix, self.value)


def _join(path: bytes, query: bytes) -> bytes:
    return path + b"?" + query if query else path


def rewrite_target(target: bytes, modifier: PathModifier | None, matched_prefix: bytes | None) -> bytes:
    """The request-target after a path modifier (query kept); ``target`` unchanged without one."""
    if modifier is None:
        return target
    path, query = split_target(target)
    return _join(modifier.apply(path, matched_prefix), query)


@dataclass(frozen=True, slots=True)
class UrlRewrite:
    """A compiled ``HTTPURLRewriteFilter``."""

    hostname: bytes | None = None
    path: PathModifier | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "UrlRewrite":
        host = spec.get("hostname")
        path = spec.get("path")
        return cls(_b(host) if host else None, PathModifier.from_spec(path) if path else None)

    def apply(self, target: bytes, authority: bytes, matched_prefix: bytes | None) -> tuple[bytes, bytes]:
        """``(target, authority)`` after the rewrite."""
        if self.path is not None:
            target = rewrite_target(target, self.path, matched_prefix)
        return target, (self.hostname if self.hostname is not None else authority)


# ------------------------------------------------------------------ redirects

def split_authority(authority: bytes) -> tuple[bytes, int | None]:
    """``(host, port)`` of a Host/:authority value; IPv6 literals keep their brackets."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return authority, None
        host, rest = authority[:end + 1], authority[end + 1:]
        if rest.startswith(b":") and rest[1:].isdigit():
            return host, int(rest[1:])
        return host, None
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit() and host:
        return host, int(port)
    return authority, None


@dataclass(frozen=True, slots=True)
class RequestRedirect:
    """A compiled ``HTTPRequestRedirectFilter``."""

    scheme: bytes | None = None
    hostname: bytes | None = None
    port: int | None = None
    path: PathModifier | None = None
    status: int = 302

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "RequestRedirect":
        status = int(spec.get("statusCode", 302))
        if status not in REDIRECT_STATUSES:
            raise ValueError(f"unsupported redirect statusCode {status}")
        scheme = spec.get("scheme")
        host = spec.get("hostname")
        port = spec.get("port")
        path = spec.get("path")
        return cls(_b(scheme).lower() if scheme else None, _b(host) if host else None,
                   int(port) if port else None, PathModifier.from_spec(path) if path else None, status)

    def location(self, *, scheme: bytes, authority: bytes, target: bytes, listener_port: int,
                 matched_prefix: bytes | None = None) -> bytes:
        """The ``Location`` value for a request (``scheme``, Host ``authority``, request-target)."""
        out_scheme = self.scheme or scheme or b"http"
        req_host, _ = split_authority(authority)
        host = self.hostname or req_host
        if self.port is not None:
            port = self.port
        elif self.scheme is not None:
            port = WELL_KNOWN_PORTS.get(self.scheme, listener_port)
        else:
            port = listener_port
        if WELL_KNOWN_PORTS.get(out_scheme) == port:
            hostport = host
        else:
            hostport = host + b":%d" % port
        path, query = split_target(target)
        if self.path is not None:
            path = self.path.apply(path, matched_prefix)
        return out_scheme + b"://" + hostport + _join(path, query)

    def response(self, *, scheme: bytes, authority: bytes, target: bytes, listener_port: int,
                 matched_prefix: bytes | None = None) -> DirectResponse:
        loc = self.location(scheme=scheme, authority=authority, target=target,
                            listener_port=listener_port, matched_prefix=matched_prefix)
        return DirectResponse(self.status, "", "", 0, ((b"location", loc),))


# ------------------------------------------------------------------ mirrors

@dataclass(frozen=True, slots=True)
class MirrorSpec:
    """A compiled ``HTTPRequestMirrorFilter``: the raw backendRef and the share mirrored."""

    backend_ref: Mapping[str, Any]
    numerator: int = 100
    denominator: int = 100

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "MirrorSpec":
        ref = spec.get("backendRef") or {}
        if "percent" in spec:
            return cls(ref, int(spec["percent"]), 100)
        frac = spec.get("fraction")
        if frac:
            return cls(ref, int(frac.get("numerator", 0)), int(frac.get("denominator", 100)) or 100)
        return cls(ref)

    @property
    def probability(self) -> float:
        return min(1.0, max(0.0, self.numerator / self.denominator))

    def fires(self, rand) -> bool:
        """Whether to mirror this request; ``rand()`` returns a float in [0, 1)."""
        p = self.probability
        return p >= 1.0 or (p > 0.0 and rand() < p)


# ------------------------------------------------------------------ chains

@dataclass(frozen=True, slots=True)
class FilterChain:
    """The compiled filters of a rule (or of a rule plus the chosen backendRef).

    ``request_ops``: header modifiers and URL rewrites in listed order;
    ``response_ops``: response header modifiers; ``redirect``; ``mirrors`` (raw, resolved
    by the router); ``unsupported``: names of filters that cannot be applied.
    """

    request_ops: tuple[HeaderModifier | UrlRewrite, ...] = ()
    response_ops: tuple[HeaderModifier, ...] = ()
    redirect: RequestRedirect | None = None
    mirrors: tuple[MirrorSpec, ...] = ()
    unsupported: tuple[str, ...] = ()

    @classmethod
    def compile(cls, filters: Sequence[Mapping[str, Any]] | None) -> "FilterChain":
        req: list[HeaderModifier | UrlRewrite] = []
        resp: list[HeaderModifier] = []
        redirect = None
        mirrors: list[MirrorSpec] = []
        unsupported: list[str] = []
        for f in filters or ():
            kind = f.get("type", "")
            if kind == "RequestHeaderModifier":
                req.append(HeaderModifier.from_spec(f.get("requestHeaderModifier")))
            elif kind == "ResponseHeaderModifier":
                resp.append(HeaderModifier.from_spec(f.get("responseHeaderModifier")))
            elif kind == "URLRewrite":
                req.append(UrlRewrite.from_spec(f.get("urlRewrite") or {}))
            elif kind == "RequestRedirect":
                redirect = RequestRedirect.from_spec(f.get("requestRedirect") or {})
            elif kind == "RequestMirror":
                mirrors.append(MirrorSpec.from_spec(f.get("requestMirror") or {}))
            else:
                ref = f.get("extensionRef") or {}
                unsupported.append(f"{kind}:{ref.get('name')}" if ref else (kind or "?"))
        return cls(tuple(req), tuple(resp), redirect, tuple(mirrors), tuple(unsupported))

    def then(self, other: "FilterChain") -> "FilterChain":
        """This chain followed by ``other`` (rule filters, then a backendRef's filters)."""
        if not (other.request_ops or other.response_ops or other.redirect or other.mirrors
                or other.unsupported):
            return self
        return FilterChain(self.request_ops + other.request_ops, self.response_ops + other.response_ops,
                           other.redirect or self.redirect, self.mirrors + other.mirrors,
                           self.unsupported + other.unsupported)

    @property
    def rewrites_request(self) -> bool:
        return bool(self.request_ops)

    @property
    def rewrites_response(self) -> bool:
        return bool(self.response_ops)

    @property
    def url_rewrite(self) -> UrlRewrite | None:
        for op in self.request_ops:
            if isinstance(op, UrlRewrite):
                return op
        return None

    def apply_request(self, target: bytes, authority: bytes, headers: Iterable[tuple[bytes, bytes]],
                      matched_prefix: bytes | None = None) -> tuple[bytes, bytes, Headers]:
        """``(target, authority, headers)`` after the request filters, in order. O(ops x headers)."""
        out = headers if isinstance(headers, list) else list(headers)
        for op in self.request_ops:
            if isinstance(op, HeaderModifier):
                out = op.apply(out)
            else:
                target, authority = op.apply(target, authority, matched_prefix)
        return target, authority, out

    def apply_response(self, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
        out = headers if isinstance(headers, list) else list(headers)
        for op in self.response_ops:
            out = op.apply(out)
        return out


EMPTY_CHAIN = FilterChain()
