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

from nodeagent.proxy.authz import AuthzDecision, AuthzGate, ConnectionAttrs, RequestAttrs
from nodeagent.proxy.jwtauth import INVALID, VALID, Authenticator, RequestAuthn, realm_of, strip_query_params
from nodeagent.proxy.l7.pathnorm import EscapedSlashes, PathRejected, normalize_target
from nodeagent.state import NodeSnapshot, Workload

JWT_FLAG = "JWT"
_DEFAULT_SLASHES = EscapedSlashes.REJECT
# what MeshConfig pathNormalization.escapedSlashes may say (UNESCAPE_AND_REDIRECT needs a
# redirect answer the gate does not make: not offered)
ESCAPED_SLASHES = {e.value: e for e in (EscapedSlashes.REJECT, EscapedSlashes.KEEP_UNCHANGED,
                                         EscapedSlashes.UNESCAPE_AND_FORWARD)}


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


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, v in headers:
        name = n.decode("latin-1")
        value = v.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


class RequestGate:
    """The per-request checks of one connection to one workload (see the module doc). Each
    request is judged on the snapshot in force when it arrives, so a policy change applies
    to an open keep-alive connection at its next request."""

    __slots__ = ("policy", "snapshot", "workload", "conn")

    def __init__(self, policy: "RequestPolicy", snapshot: NodeSnapshot, workload: Workload,
                 conn: ConnectionAttrs) -> None:
        self.policy = policy
        self.snapshot = snapshot
        self.workload = workload
        self.conn = conn

    def _current(self) -> tuple[NodeSnapshot, Workload | None]:
        snapshot = self.policy.current() or self.snapshot
        if snapshot is self.snapshot:
            return snapshot, self.workload
        self.snapshot = snapshot
        self.workload = snapshot.workload_by_ip(self.workload.address) or _GONE
        return snapshot, self.workload

    def check(self, method: bytes, target: bytes, authority: bytes, headers: list[tuple[bytes, bytes]],
              scheme: bytes = b"http") -> GateDenial | tuple[bytes, list[tuple[bytes, bytes]]]:
        """A denial, or the request to forward: (normalized target, headers)."""
        snapshot, workload = self._current()
        if workload is _GONE:
            return GateDenial("UH", 503, "the destination workload left the mesh")
        policy = self.policy
        try:
            normalized = normalize_target(target, escaped_slashes=policy.escaped_slashes(snapshot))
        except PathRejected as exc:
            return GateDenial("DPE", 400, f"bad request path: {exc}")
        text = normalized.target.encode("latin-1")
        new_target = target if text == target else text
        principal = claims = None
        audiences: tuple[str, ...] = ()
        presenter = ""
        authn = policy.authn.for_workload(snapshot, workload)
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
        req = RequestAttrs.of(self.conn, method.decode("latin-1"), authority.decode("latin-1"), normalized.path,
                              _header_map(headers), principal, claims, audiences, presenter)
        if not policy.authz.check_request(snapshot, workload, req).allowed:
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

    def escaped_slashes(self, snapshot: NodeSnapshot) -> EscapedSlashes:
        if self._slashes[0] is not snapshot:
            self._slashes = (snapshot, escaped_slashes_of(snapshot))
        return self._slashes[1]

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
