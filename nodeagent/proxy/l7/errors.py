"""Responses the proxy makes itself: pure functions, no I/O.

Every reply the mesh generates (no healthy upstream, connect failure, timeout, no route,
rate limited, a protocol error, ...) is a well-formed response carrying the Envoy-style
response flag in ``x-hostmesh-flags``, so a client (and an operator reading an access
log) can tell a mesh error from an application error.

* ``local_reply(flag, status=None, message=None)`` -> ``LocalReply(status, headers, body)``:
  the protocol-neutral reply (status, a header list without pseudo-headers or framing,
  a short ``text/plain`` body). The HTTP/1.1 codec (``http1.ServerConnection``) and the
  HTTP/2 codec serialize it with their own framing.
* ``http1_response(flag, ...) -> bytes``: the same reply as complete HTTP/1.1 bytes, for
  code paths without a codec.
* ``grpc_error(flag, ...) -> list[(name, value)]``: the gRPC form, a *trailers-only*
  response — the contents of one HTTP/2 HEADERS frame with END_STREAM: ``:status 200``,
  ``content-type: application/grpc``, ``grpc-status``, ``grpc-message`` (percent-encoded
  as gRPC's PROTOCOL-HTTP2 says: bytes outside 0x20-0x7E, and ``%``, become ``%XX``) and
  the flag. The HTTP/2 codec sends it.

Flags (Envoy's names; the default HTTP status and gRPC status of each)::

    UH   no healthy upstream                 503  UNAVAILABLE (14)
    UF   upstream connection failure         503  UNAVAILABLE
    UT   upstream request timeout            504  DEADLINE_EXCEEDED (4)
    NR   no route configured                 404  UNIMPLEMENTED (12)
    URX  upstream retry limit exceeded       503  UNAVAILABLE
    RL   rate limited                        429  RESOURCE_EXHAUSTED (8)
    UO   upstream overflow (circuit breaker) 503  UNAVAILABLE
    UC   upstream connection termination     503  UNAVAILABLE
    DC   downstream connection termination   499  CANCELLED (1)   (for logs: nobody reads it)
    FI   fault injected                      503  UNAVAILABLE     (the fault config overrides)
    DPE  downstream protocol error           400  INTERNAL (13)
    UPE  upstream protocol error             502  UNAVAILABLE
    SI   stream idle / header read timeout   408  UNAVAILABLE
    RBAC denied by an AuthorizationPolicy    403  PERMISSION_DENIED (7)
    JWT  refused by a RequestAuthentication  401  UNAUTHENTICATED (16)   (hostmesh's own flag:
         Envoy's jwt_authn sets none; the body says why, e.g. "Jwt is expired")

Decisions:
* UT -> DEADLINE_EXCEEDED and RL -> RESOURCE_EXHAUSTED, although gRPC's "HTTP to gRPC
  status mapping" table maps 504 and 429 to UNAVAILABLE: that table is for clients that
  received *no* grpc-status; a proxy that knows why it failed says so. RESOURCE_EXHAUSTED
  is also not retried by default gRPC retry policies, which is what a rate limit wants
  (Envoy's rate-limit filter has the same switch, ``rate_limited_as_resource_exhausted``).
* An unknown flag with an explicit status gets its gRPC status from that mapping table
  (``grpc_status_for_http``).
* No ``date`` or ``server`` header: the reply is pure (no clock); the codec may add one.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

FLAG_HEADER = b"x-hostmesh-flags"

# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class FlagInfo:
    status: int
    grpc_status: int
    text: str


FLAGS: dict[str, FlagInfo] = {
    "UH": FlagInfo(503, GRPC_UNAVAILABLE, "no healthy upstream"),
    "UF": FlagInfo(503, GRPC_UNAVAILABLE, "upstream connect error"),
    "UT": FlagInfo(504, GRPC_DEADLINE_EXCEEDED, "upstream request timeout"),
    "NR": FlagInfo(404, GRPC_UNIMPLEMENTED, "no route"),
    "URX": FlagInfo(503, GRPC_UNAVAILABLE, "upstream retry limit exceeded"),
    "RL": FlagInfo(429, GRPC_RESOURCE_EXHAUSTED, "rate limited"),
    "UO": FlagInfo(503, GRPC_UNAVAILABLE, "upstream overflow"),
    "UC": FlagInfo(503, GRPC_UNAVAILABLE, "upstream connection terminated"),
    "DC": FlagInfo(499, GRPC_CANCELLED, "downstream connection terminated"),
    "FI": FlagInfo(503, GRPC_UNAVAILABLE, "fault injected"),
    "DPE": FlagInfo(400, GRPC_INTERNAL, "bad request"),
    "UPE": FlagInfo(502, GRPC_UNAVAILABLE, "upstream protocol error"),
    "SI": FlagInfo(408, GRPC_UNAVAILABLE, "request timeout"),
    "RBAC": FlagInfo(403, GRPC_PERMISSION_DENIED, "RBAC: access denied"),
    "JWT": FlagInfo(401, GRPC_UNAUTHENTICATED, "Jwt verification fails"),
}

# gRPC's http-grpc-status-mapping.md (for replies without a grpc-status)
_HTTP_TO_GRPC = {
    400: GRPC_INTERNAL, 401: GRPC_UNAUTHENTICATED, 403: GRPC_PERMISSION_DENIED,
    404: GRPC_UNIMPLEMENTED, 429: GRPC_UNAVAILABLE, 502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE, 504: GRPC_UNAVAILABLE,
}

_EXTRA_REASONS = {499: "Client Closed Request"}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (b"" for an unregistered code)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return _EXTRA_REASONS.get(status, "").encode("ascii")


def grpc_status_for_http(status: int) -> int:
    """gRPC status for an HTTP status without grpc-status (gRPC's mapping table)."""
    return _HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)


# gRPC status -> HTTP status (Envoy's grpc::Utility::grpcToHttpStatus), for a gRPC fault
# answered to a client that is not gRPC
_GRPC_TO_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
                 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


def http_status_for_grpc(grpc_status: int) -> int:
    """The HTTP status that stands for a gRPC status (500 for an unknown one)."""
    return _GRPC_TO_HTTP.get(grpc_status, 500)


def _flag_bytes(flag: str) -> bytes:
    b = flag.encode("ascii")
    if not b or not all(0x21 <= c <= 0x7E for c in b):
        raise ValueError(f"invalid response flag {flag!r}")
    return b


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A reply made by the proxy: status, headers (no framing, no pseudo-headers), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    flag: str


def local_reply(flag: str, status: int | None = None, message: str | None = None,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> LocalReply:
    """The reply for ``flag``; ``status``/``message`` override the flag's defaults, ``extra``
    headers are added (``www-authenticate`` with a 401)."""
    info = FLAGS.get(flag)
    if status is None:
        if info is None:
            raise ValueError(f"unknown response flag {flag!r} needs an explicit status")
        status = info.status
    if not 100 <= status <= 599 or status < 200 or status in (204, 304):
        raise ValueError(f"a local reply needs a final status with a body, not {status}")
    if message is None:
        message = info.text if info is not None else reason_phrase(status).decode("ascii").lower()
    body = message.encode("utf-8", "replace")
    headers = [(b"content-type", b"text/plain"), (FLAG_HEADER, _flag_bytes(flag)), *extra]
    return LocalReply(status, headers, body, flag)


def http1_response(flag: str, status: int | None = None, message: str | None = None, *,
                   close: bool = False, head_request: bool = False) -> bytes:
    """``local_reply`` as complete HTTP/1.1 response bytes.

    ``close`` adds ``connection: close`` (the caller then closes after writing);
    ``head_request`` omits the body (the reply to a HEAD request keeps its length).
    """
    r = local_reply(flag, status, message)
    out = [b"HTTP/1.1 %d %s\r\n" % (r.status, reason_phrase(r.status))]
    out.extend(b"%s: %s\r\n" % hv for hv in r.headers)
    out.append(b"content-length: %d\r\n" % len(r.body))
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    if not head_request:
        out.append(r.body)
    return b"".join(out)


def grpc_message_encode(message: str) -> bytes:
    """Percent-encode a grpc-message: UTF-8, bytes outside 0x20-0x7E and ``%`` as ``%XX``."""
    out = bytearray()
    for c in message.encode("utf-8", "replace"):
        if 0x20 <= c <= 0x7E and c != 0x25:
            out.append(c)
        else:
            out += b"%%%02X" % c
    return bytes(out)


def grpc_error(flag: str, grpc_status: int | None = None, message: str | None = None) -> list[tuple[bytes, bytes]]:
    """A gRPC trailers-only response for ``flag``: the header list of one HEADERS frame.

    Send it with END_STREAM set. ``grpc_status`` overrides the flag's gRPC status (an
    unknown flag without it gets the status mapped from 503 / its default).
    """
    info = FLAGS.get(flag)
    if grpc_status is None:
        grpc_status = info.grpc_status if info is not None else GRPC_UNKNOWN
    if not 0 <= grpc_status <= 16:
        raise ValueError(f"invalid grpc-status {grpc_status}")
    if message is None:
        message = info.text if info is not None else "proxy error"
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % grpc_status),
        (b"grpc-message", grpc_message_encode(message)),
        (FLAG_HEADER, _flag_bytes(flag)),
    ]
