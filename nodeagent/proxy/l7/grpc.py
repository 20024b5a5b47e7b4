"""gRPC over HTTP/2 for the proxy: pure functions, no I/O.

What the mesh needs to know about gRPC (grpc/grpc doc/PROTOCOL-HTTP2.md) to proxy it
correctly; message bodies pass through as bytes (the 5-byte message framing is never
parsed: nothing here needs message boundaries).

* ``is_grpc(headers)``: ``content-type`` is ``application/grpc`` or
  ``application/grpc+<subtype>`` / ``application/grpc;<params>`` (``+proto``, ``+json``,
  ...). gRPC-Web (``application/grpc-web*``) is not gRPC over HTTP/2 and is not matched.
* ``parse_timeout(value)``: ``grpc-timeout`` = 1..8 ASCII digits + one unit of
  ``H M S m u n`` (hours, minutes, seconds, milli-, micro-, nanoseconds; case matters)
  -> seconds, or None when malformed. The spec gives no rule for a malformed value; like
  Envoy, the proxy then ignores it (the route's timeout applies) instead of failing the
  call, and forwards the field unchanged for the server to judge.
* ``request_timeout(headers, route_timeout, max_grpc_timeout)``: the timeout to enforce:
  the smaller of the client's grpc-timeout (capped by ``max_grpc_timeout`` when given)
  and the route's timeout; ``deadline(...)`` adds it to a clock value.
* ``encode_timeout(seconds)``: the finest unit that fits 8 digits (what gRPC's own
  encoder does), to tell the upstream the time that is left.
* ``response_status(status, headers)``: for a response to a gRPC request, None when it
  is a real gRPC response (HTTP 200 with a gRPC content-type), else the gRPC status a
  client would derive (gRPC's http-grpc-status-mapping.md: 400 INTERNAL, 401
  UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504
  UNAVAILABLE, anything else UNKNOWN; a 200 that is not gRPC: UNKNOWN).
  ``non_grpc_reply(status, headers)`` turns such a response into a trailers-only reply
  (``errors.grpc_error`` with flag ``UPE``), so gRPC clients get a status they
  understand instead of an HTML error page.
* ``grpc_status_for_flag(flag)``: the status of a proxy error (UH/UF/UC... UNAVAILABLE,
  UT DEADLINE_EXCEEDED, NR UNIMPLEMENTED, RL RESOURCE_EXHAUSTED: see ``errors``); the
  reply itself is ``errors.grpc_error(flag)``, a trailers-only HEADERS frame.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from nodeagent.proxy.l7.errors import (FLAGS, GRPC_UNKNOWN, grpc_error, grpc_status_for_http)

_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_SECONDS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# finest first, as gRPC's encoder: (unit, units per second)
_ENCODE_UNITS = ((b"n", 1e9), (b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600))
_MAX_VALUE = 99_999_999


def is_grpc_content_type(value: bytes | None) -> bool:
    if value is None or not value[:16].lower() == b"application/grpc":
        return False
    rest = value[16:17]
    return rest in (b"", b"+", b";")


def is_grpc(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A gRPC request/response by its content-type (the first one counts)."""
    for name, value in headers:
        if name == b"content-type":
            return is_grpc_content_type(value)
    return False


def parse_timeout(value: bytes) -> float | None:
    """A ``grpc-timeout`` value in seconds, or None when malformed."""
    m = _TIMEOUT.fullmatch(value)
    if m is None:
        return None
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def encode_timeout(seconds: float) -> bytes:
    """``seconds`` as a ``grpc-timeout`` value (rounded up; at least 1n; at most 99999999H)."""
    if seconds <= 0:
        return b"1n"
    for unit, per_second in _ENCODE_UNITS:
        v = seconds * per_second
        iv = int(v)
        if iv < v:  # round up: never tell the upstream it has less time than it has
            iv += 1
        if iv <= _MAX_VALUE:
            return b"%d%s" % (iv, unit)
    return b"%dH" % _MAX_VALUE


def request_timeout(headers: Iterable[tuple[bytes, bytes]], route_timeout: float | None,
                    max_grpc_timeout: float | None = None) -> float | None:
    """The timeout for this gRPC call in seconds (None: no timeout).

    The client's ``grpc-timeout`` (capped by ``max_grpc_timeout``) and the route's
    timeout both apply: the smaller wins.
    """
    client = None
    for name, value in headers:
        if name == b"grpc-timeout":
            client = parse_timeout(value)
            break
    if client is not None and max_grpc_timeout is not None:
        client = min(client, max_grpc_timeout)
    if client is None:
        return route_timeout
    if route_timeout is None:
        return client
    return min(client, route_timeout)


def deadline(headers: Iterable[tuple[bytes, bytes]], now: float, route_timeout: float | None = None,
             max_grpc_timeout: float | None = None) -> float | None:
    """``now`` + ``request_timeout(...)``, or None without a timeout."""
    t = request_timeout(headers, route_timeout, max_grpc_timeout)
    return None if t is None else now + t


def with_timeout(headers: list[tuple[bytes, bytes]], remaining: float) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``grpc-timeout`` set to ``remaining`` seconds (for the upstream)."""
    out = [hv for hv in headers if hv[0] != b"grpc-timeout"]
    out.append((b"grpc-timeout", encode_timeout(remaining)))
    return out


def response_status(status: int, headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """None for a real gRPC response, else the gRPC status a client derives from it."""
    if status == 200:
        return None if is_grpc(headers) else GRPC_UNKNOWN
    return grpc_status_for_http(status)


def non_grpc_reply(status: int, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """A trailers-only reply replacing a non-gRPC answer to a gRPC request (None: pass it on)."""
    code = response_status(status, headers)
    if code is None:
        return None
    return grpc_error("UPE", code, f"upstream answered HTTP {status} without gRPC status")


def grpc_status_for_flag(flag: str) -> int:
    info = FLAGS.get(flag)
    return info.grpc_status if info is not None else GRPC_UNKNOWN
