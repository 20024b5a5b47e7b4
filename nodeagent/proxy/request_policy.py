"""Per-request security at the destination: path normalization, JWT, L7 authorization.

A connection to a local workload is judged once by ``authz`` (AuthorizationPolicy on what
the node verified: principal, source address, port). When that answer depends on the
requests (``AuthzDecision.needs_request``) or a RequestAuthentication selects the
workload, the listener parses the connection as HTTP instead of relaying it, and every
request passes a ``RequestGate`` before it is forwarded to the pod:

1. **Path normalization** (``l7.pathnorm``, MeshConfig ``pathNormalization.escapedSlashes``):
   the normalized path is what policies match and what the pod receives. A path that
   cannot be normalized safely is answered 400 (flag ``DPE``).
2. **RequestAuthentication** (``jwtauth``): an invalid token is answered 401 (gRPC
   UNAUTHENTICATED, flag ``JWT``) with ``www-authenticate``; a valid one gives the request
   principal and claims; the token headers/parameters and output headers are rewritten
   as the rule says. No token: the request goes on without a request principal.
3. **AuthorizationPolicy** on the request (``Authorizer.decide_request``): a denial is 403
   ``RBAC: access denied`` (gRPC PERMISSION_DENIED, flag ``RBAC``), counted and logged.

A connection that turns out not to be HTTP gets the connection decision's fail-closed
answer (``GatedConnection.fallback_allowed``). Everything here is pure: the drivers call
``RequestGate.check`` and act on the ``GateDenial`` or the rewritten request it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from nodeagent.proxy.authz import ALLOWED_BY_DEFAULT, AuthzDecision, AuthzGate, ConnectionAttrs, RequestAttrs
from nodeagent.proxy.jwtauth import INVALID, VALID, Authenticator, RequestAuthn, realm_of, strip_query_params
from nodeagent.proxy.l7.pathnorm import EscapedSlashes, PathRejected, normalize_target
from nodeagent.state import NodeSnapshot, Workload

JWT_FLAG = "JWT"
_DEFAULT_SLASHES = EscapedSlashes.REJECT
# what MeshConfig pathNormalization.escapedSlashes may say (UNESCAPE_AND_REDIRECT needs a
# redirect answer the gate does not make: not offered)
ESCAPED_SLASHES = {e.value: e for e in (EscapedSlashes.REJECT, EscapedSlashes.KEEP_UNCHANGED,
                                         EscapedSlashes.UNESCAPE_AND_FORWARD)}


_MAX_CACHED_TARGET = 512
_MAX_CACHED_TARGETS = 4096


class _Target:
    """A normalized request-target: ``path`` (what policies match), ``query`` (raw, None
    without '?'), ``target_bytes`` (what the pod receives)."""

    __slots__ = ("path", "query", "target_bytes")

    def __init__(self, path: str, query: str | None, target_bytes: bytes) -> None:
        self.path = path
        self.query = query
        self.target_bytes = target_bytes


@dataclass(frozen=True, slots=True)
class GateDenial:
    """Answer the request locally: ``status`` with ``flag``'s reply, ``message`` as the body
    (or gRPC message), ``headers`` added to the reply."""

    flag: str
    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def escaped_slashes_of(snapshot: NodeSnapshot) -> EscapedSlashes:
    """MeshConfig ``pathNormalization.escapedSlashes`` (REJECT without one, or when unreadable)."""
    for obj in snapshot.config:
        if obj.kind != "MeshConfig":
            continue
        try:
            value = ((json.loads(obj.spec) or {}).get("pathNormalization") or {}).get("escapedSlashes")
        except (ValueError, AttributeError):
            return _DEFAULT_SLASHES
        return ESCAPED_SLASHES.get(value, _DEFAULT_SLASHES)
    return _DEFAULT_SLASHES


def _header_map(headers: list[tuple[bytes, bytes]], names: frozenset[str]) -> dict[str, str]:
    """The values of the header fields ``names`` (repeated fields joined with ",")."""
    out: dict[str, str] = {}
    if not names:
        return out
    for n, v in headers:
        name = n.decode("latin-1")
        if name not in names:
            continue
        value = v.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


class RequestGate:
    """The per-request checks of one connection to one workload (see the module doc). Each
    request is judged on the snapshot in force when it arrives, so a policy change applies
    to an open keep-alive connection at its next request. Where neither a JWT nor a header
    can change the answer, the last request's outcome is remembered for the connection
    (keep-alive clients repeat their requests) — and still counted."""

    __slots__ = ("policy", "snapshot", "workload", "conn", "_authn", "_names", "_plain", "_memo")

    def __init__(self, policy: "RequestPolicy", snapshot: NodeSnapshot, workload: Workload,
                 conn: ConnectionAttrs) -> None:
        self.policy = policy
        self.snapshot = snapshot
        self.workload = workload
        self.conn = conn
        self._learn()

    def _learn(self) -> None:
        """What the snapshot says about the workload's requests, once per snapshot."""
        snapshot, workload = self.snapshot, self.workload
        gone = workload is _GONE
        self._authn = None if gone else self.policy.authn.for_workload(snapshot, workload)
        self._names = frozenset() if gone else self.policy.authz.authorizer.request_headers(snapshot, workload)
        self._plain = not gone and self._authn is None and not self._names  # nothing but the target matters
        self._memo: tuple | None = None  # ((method, target, authority), new target, decision, path)

    def _current(self) -> tuple[NodeSnapshot, Workload]:
        snapshot = self.policy.current() or self.snapshot
        if snapshot is not self.snapshot:
            self.snapshot = snapshot
            self.workload = snapshot.workload_by_ip(self.workload.address) or _GONE
            self._learn()
        return snapshot, self.workload

    def check(self, method: bytes, target: bytes, authority: bytes, headers: list[tuple[bytes, bytes]],
              scheme: bytes = b"http") -> GateDenial | tuple[bytes, list[tuple[bytes, bytes]]]:
        """A denial, or the request to forward: (normalized target, headers)."""
        snapshot, workload = self._current()
        if workload is _GONE:
            return GateDenial("UH", 503, "the destination workload left the mesh")
        memo = self._memo
        if memo is not None and memo[0] == (method, target, authority):
            return self._outcome(memo[1], headers, memo[2], workload, method, memo[3])
        policy = self.policy
        normalized = policy.normalize(snapshot, target)
        if type(normalized) is GateDenial:
            return normalized
        new_target = normalized.target_bytes
        principal = claims = None
        audiences: tuple[str, ...] = ()
        presenter = ""
        authn = self._authn
        if authn is not None:
            result = authn.authenticate(headers, (normalized.query or "").encode("latin-1"))
            if result.outcome == INVALID:
                realm = realm_of(scheme, authority, target)
                return GateDenial(JWT_FLAG, 401, result.reason, ((b"www-authenticate", result.www_authenticate(realm)),))
            changes = result.changes
            if changes.remove or changes.add:
                headers = changes.apply(headers)
            if changes.remove_params:
                new_target = strip_query_params(new_target, changes.remove_params)
            if result.outcome == VALID:
                principal, claims, audiences, presenter = (result.principal, result.claims, result.audiences,
                                                           result.presenter)
        req = RequestAttrs(self.conn, method.decode("latin-1"), authority.decode("latin-1"), normalized.path,
                           _header_map(headers, self._names),
                           principal, claims, audiences, presenter)
        decision = policy.authz.authorizer.decide_request(snapshot, workload, req)
        if self._plain:
            self._memo = ((method, target, authority), new_target, decision, normalized.path)
        return self._outcome(new_target, headers, decision, workload, method, normalized.path)

    def _outcome(self, new_target: bytes, headers: list, decision: AuthzDecision, workload: Workload,
                 method: bytes, path: str) -> GateDenial | tuple[bytes, list]:
        if decision is not ALLOWED_BY_DEFAULT:
            conn = self.conn
            self.policy.authz.count(decision, workload, conn.principal, conn.source_ip, conn.destination_port,
                                    (method, path))
        if not decision.allowed:
            return GateDenial("RBAC", 403, "RBAC: access denied")
        return new_target, headers


_GONE = Workload("", "", "", "")  # the destination is no longer in the snapshot


class RequestPolicy:
    """One listener's factory of RequestGates: which connections need their requests checked.
    ``current()`` gives the snapshot in force (None: the gate keeps its connection's)."""

    def __init__(self, authz: AuthzGate, authn: RequestAuthn,
                 current: Callable[[], NodeSnapshot | None] = lambda: None) -> None:
        self.authz = authz
        self.authn = authn
        self.current = current
        self._slashes: tuple[NodeSnapshot | None, EscapedSlashes] = (None, _DEFAULT_SLASHES)
        self._normalized: dict[bytes, _Target | GateDenial] = {}

    def escaped_slashes(self, snapshot: NodeSnapshot) -> EscapedSlashes:
        if self._slashes[0] is not snapshot:
            self._slashes = (snapshot, escaped_slashes_of(snapshot))
            self._normalized = {}
        return self._slashes[1]

    def normalize(self, snapshot: NodeSnapshot, target: bytes) -> "_Target | GateDenial":
        """``target`` normalized under the snapshot's MeshConfig, or the 400 it gets;
        remembered for short targets (clients repeat theirs)."""
        mode = self.escaped_slashes(snapshot)
        found = self._normalized.get(target)
        if found is not None:
            return found
        try:
            n = normalize_target(target, escaped_slashes=mode)
            text = n.target.encode("latin-1")
            found = _Target(n.path, n.query, target if text == target else text)
        except PathRejected as exc:
            found = GateDenial("DPE", 400, f"bad request path: {exc}")
        if len(target) <= _MAX_CACHED_TARGET:
            if len(self._normalized) >= _MAX_CACHED_TARGETS:
                self._normalized.clear()
            self._normalized[target] = found
        return found

    def gate(self, snapshot: NodeSnapshot, workload: Workload, conn: ConnectionAttrs,
             decision: AuthzDecision) -> RequestGate | None:
        """The gate for a connection ``decision`` allowed or left to the requests; None when
        the connection decision is final and no JWT needs checking."""
        if not decision.allowed and not decision.needs_request:
            return None
        if not decision.needs_request and self.authn.for_workload(snapshot, workload) is None:
            return None
        return RequestGate(self, snapshot, workload, conn)

    def fallback(self, gate: RequestGate, decision: AuthzDecision) -> bool:
        """A gated connection that is not HTTP: the connection decision's fail-closed answer,
        counted now (a ``needs_request`` decision was not counted when made)."""
        if decision.needs_request:
            conn = gate.conn
            self.authz.count(decision, gate.workload, conn.principal, conn.source_ip, conn.destination_port)
        return decision.allowed
