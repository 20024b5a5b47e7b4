"""Protocol detection on the first bytes of a captured connection: a pure state machine.

The driver makes one ``Detector`` per accepted connection (``detector_for(app_protocol)``
picks it from the Service port's ``appProtocol``), arms a timer of ``detector.timeout_s``
seconds unless ``detector.decision`` is already set, and feeds every chunk it reads::

    det = detector_for(port.app_protocol)
    if det.decision is None:                  # auto-detect: wait for client bytes
        r = det.feed(chunk)                   # -> NeedMore (NEED_MORE) or Detected
        ...on timer: r = det.timeout()        # -> Detected (OPAQUE when auto)
        ...on EOF:   r = det.eof()            # -> Detected
    # Detected.protocol picks the codec; Detected.data are the bytes read so far,
    # to be replayed into that codec (or relayed as they are).

Rules (auto-detection):

* ``HTTP2_PRIOR_KNOWLEDGE``: the full 24-byte connection preface
  ``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n``; a prefix of it waits for more; bytes that
  diverge from it after ``PRI`` are OPAQUE (a broken HTTP/2 client is relayed, not parsed).
* ``HTTP1``: a method the HTTP/1 codec (llhttp) accepts, followed by SP and a valid start
  of a request-target: ``/`` (origin-form), ``*`` (asterisk-form), a letter (absolute-form
  ``http://``...), or for CONNECT an authority (letter, digit or ``[``). Methods are
  case-sensitive (RFC 9110 9.1), so ``get /`` is not HTTP. This is what Envoy's
  http_inspector does too (a request line prefix), without waiting for the version.
* ``TLS``: a TLS record header carrying a ClientHello: ``0x16 0x03 0x00..0x04``, a record
  length of 1..2^14+2048, then handshake type ``0x01``. TLS is relayed as TCP (never
  terminated here).
* Anything else: ``OPAQUE`` as soon as no rule can match any more (usually on the first
  byte), or once ``max_bytes`` arrived without a decision.
* ``timeout()``: no decision within ``timeout_s`` seconds -> ``OPAQUE``. This is the case of
  server-speaks-first protocols (MySQL, SMTP, ...) whose client sends nothing until the
  server greets it: detection must give up so the relay can connect. Default 1 s: a
  middle ground between the delay every undeclared server-first connection pays and the
  risk of classifying a slow (CPU-throttled) HTTP client as TCP; Linkerd waits 10 s,
  Istio now waits forever (0 = no timeout). Declare ``appProtocol: tcp`` (or mysql, ...)
  on such ports to skip detection entirely.
* ``eof()`` before a decision: ``OPAQUE`` (relay what there is).

``appProtocol`` overrides (``detector_for``), case-insensitive:

* ``http``, ``http1``, ``http/1.1``, ``grpc-web``, ``kubernetes.io/ws``: HTTP, but the
  HTTP/2 preface is still recognised (like Envoy's ``codec_type: AUTO``): decided on the
  first byte that leaves the preface, ``HTTP1`` on timeout.
* ``http2``, ``h2c``, ``grpc``, ``kubernetes.io/h2c``: HTTP as well, between the HTTP/2
  preface and HTTP/1.x (Envoy's ``codec_type: AUTO`` downstream of an HTTP/2 cluster): the
  preface is ``HTTP2_PRIOR_KNOWLEDGE``, a byte that leaves it ``HTTP1`` (the HTTP/1.1
  driver then speaks HTTP/2 to the upstream), never ``OPAQUE``; on timeout
  ``HTTP2_PRIOR_KNOWLEDGE`` (the declared protocol: its driver's header timeout takes over).
* ``tls``, ``https``, ``kubernetes.io/wss``: ``TLS`` at once.
* ``tcp``, ``mongo``, ``mysql``, ``redis``, ``udp``, ``opaque``: ``OPAQUE`` at once.
* empty or anything else: auto-detection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_MAX_BYTES = 64
DEFAULT_TIMEOUT = 1.0

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# the HTTP methods llhttp accepts in an HTTP/1.x request (PRI is the HTTP/2 preface)
HTTP_METHODS = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"COPY", b"LOCK", b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH", b"SEARCH", b"UNLOCK",
    b"BIND", b"REBIND", b"UNBIND", b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE",
    b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE", b"UNSUBSCRIBE", b"PURGE", b"MKCALENDAR", b"LINK",
    b"UNLINK", b"SOURCE", b"QUERY",
)
_METHOD_SP = tuple(m + b" " for m in HTTP_METHODS)

_TLS_MAX_RECORD = (1 << 14) + 2048


class Protocol(str, enum.Enum):
    HTTP1 = "http/1.1"
    HTTP2_PRIOR_KNOWLEDGE = "h2c"
    TLS = "tls"
    OPAQUE = "tcp"


HTTP1 = Protocol.HTTP1
HTTP2_PRIOR_KNOWLEDGE = Protocol.HTTP2_PRIOR_KNOWLEDGE
TLS = Protocol.TLS
OPAQUE = Protocol.OPAQUE


@dataclass(frozen=True, slots=True)
class Detected:
    """The decision. ``data``: bytes fed since the last decision was returned (the driver
    passes them on); ``reason`` says why, for logs and tests."""

    protocol: Protocol
    data: bytes = b""
    reason: str = ""


class NeedMore:
    """Not decided yet: feed more bytes (or call ``timeout()`` / ``eof()``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()

# verdicts of the pure matchers
_NO = 0  # cannot match any more
_MAYBE = 1  # a prefix: need more bytes
_YES = 2


def _match_preface(buf: bytes) -> int:
    n = min(len(buf), len(H2_PREFACE))
    if buf[:n] != H2_PREFACE[:n]:
        return _NO
    return _YES if n == len(H2_PREFACE) else _MAYBE


def _match_tls(buf: bytes) -> int:
    n = len(buf)
    if buf[0] != 0x16:
        return _NO
    if n >= 2 and buf[1] != 0x03:
        return _NO
    if n >= 3 and buf[2] > 0x04:
        return _NO
    if n >= 5 and not 0 < ((buf[3] << 8) | buf[4]) <= _TLS_MAX_RECORD:
        return _NO
    if n < 6:
        return _MAYBE
    return _YES if buf[5] == 0x01 else _NO


def _target_start_ok(method_sp: bytes, c: int) -> bool:
    if method_sp == b"CONNECT ":
        return (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A) or c == 0x5B
    return c == 0x2F or c == 0x2A or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A)


def _match_http1(buf: bytes) -> int:
    n = len(buf)
    maybe = False
    for msp in _METHOD_SP:
        k = len(msp)
        if n > k:
            if buf.startswith(msp):
                return _YES if _target_start_ok(msp, buf[k]) else _NO
        elif msp.startswith(buf):
            maybe = True  # a prefix of "METHOD " or exactly "METHOD ": need the target's first byte
    return _MAYBE if maybe else _NO


class Detector:
    """Detects the protocol of one connection from its first bytes (see the module doc).

    ``max_bytes`` bounds what is held before giving up (>= 24, the preface length);
    ``timeout_s`` is the detection timeout in seconds for the driver's timer (0 = none);
    when it fires the driver calls ``timeout()``.
    ``fixed``: a protocol decided up front (``decision`` is set at construction).
    ``http_only``: only choose between HTTP1 and HTTP2_PRIOR_KNOWLEDGE (appProtocol http,
    http2, grpc, ...); ``http_default`` is the choice on timeout (HTTP1 for the HTTP/1 names,
    HTTP2_PRIOR_KNOWLEDGE for the HTTP/2 ones).
    """

    __slots__ = ("max_bytes", "timeout_s", "http_only", "http_default", "decision", "_buf", "_handed")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = DEFAULT_TIMEOUT, *,
                 fixed: Protocol | None = None, http_only: bool = False,
                 http_default: Protocol = Protocol.HTTP1) -> None:
        if max_bytes < len(H2_PREFACE):
            raise ValueError(f"max_bytes must be >= {len(H2_PREFACE)}")
        if timeout_s < 0:
            raise ValueError("timeout_s must be >= 0")
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.http_only = http_only
        self.http_default = Protocol(http_default)
        self._buf = bytearray()
        self._handed = False
        self.decision: Detected | None = None
        if fixed is not None:
            self.decision = Detected(Protocol(fixed), b"", "app_protocol")
            self._handed = True

    def _decide(self, protocol: Protocol, reason: str) -> Detected:
        d = Detected(protocol, bytes(self._buf), reason)
        self._buf = bytearray()
        self.decision = d
        self._handed = True
        return d

    def feed(self, data: bytes) -> Detected | NeedMore:
        """Add client bytes; returns the decision or ``NEED_MORE``.

        After a decision every call returns it again with ``data`` = the new bytes only.
        """
        if self._handed:
            return Detected(self.decision.protocol, bytes(data), self.decision.reason)
        self._buf += data
        buf = bytes(self._buf[: self.max_bytes])
        if not buf:
            return NEED_MORE
        pre = _match_preface(buf)
        if pre == _YES:
            return self._decide(HTTP2_PRIOR_KNOWLEDGE, "preface")
        if self.http_only:
            if pre == _NO:
                return self._decide(HTTP1, "app_protocol")
            return NEED_MORE
        h1 = _match_http1(buf)
        if h1 == _YES:
            return self._decide(HTTP1, "request line")
        tls = _match_tls(buf)
        if tls == _YES:
            return self._decide(TLS, "client hello")
        if pre == _NO and h1 == _NO and tls == _NO:
            return self._decide(OPAQUE, "no match")
        if len(self._buf) >= self.max_bytes:
            return self._decide(OPAQUE, "max bytes")
        return NEED_MORE

    def timeout(self) -> Detected:
        """The detection timer fired: decide now (OPAQUE, or ``http_default`` for a declared HTTP port)."""
        if self._handed:
            return Detected(self.decision.protocol, b"", self.decision.reason)
        return self._decide(self.http_default if self.http_only else OPAQUE, "timeout")

    def eof(self) -> Detected:
        """The client half-closed before a decision: relay what there is (a declared HTTP port:
        the bytes are a prefix of the preface, ``http_default`` parses them)."""
        if self._handed:
            return Detected(self.decision.protocol, b"", self.decision.reason)
        return self._decide(self.http_default if self.http_only and self._buf else OPAQUE, "eof")


# the protocol an appProtocol declares (``pool_h2.speaks_h2``: the HTTP/2 names); detection
# still tells HTTP/1.x from the HTTP/2 preface on the HTTP/2 names (``detector_for``)
_FIXED = {
    "http2": HTTP2_PRIOR_KNOWLEDGE, "h2c": HTTP2_PRIOR_KNOWLEDGE, "grpc": HTTP2_PRIOR_KNOWLEDGE,
    "kubernetes.io/h2c": HTTP2_PRIOR_KNOWLEDGE,
    "tls": TLS, "https": TLS, "kubernetes.io/wss": TLS,
    "tcp": OPAQUE, "mongo": OPAQUE, "mysql": OPAQUE, "redis": OPAQUE, "udp": OPAQUE, "opaque": OPAQUE,
}
_HTTP = frozenset({"http", "http1", "http/1.1", "http/1.0", "grpc-web", "kubernetes.io/ws"})


def detector_for(app_protocol: str | None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT) -> Detector:
    """The detector for a Service port with ``app_protocol`` (see the module doc)."""
    ap = (app_protocol or "").strip().lower()
    fixed = _FIXED.get(ap)
    if fixed is HTTP2_PRIOR_KNOWLEDGE:  # HTTP/1.1 clients too: translated to HTTP/2 upstream
        return Detector(max_bytes, timeout_s, http_only=True, http_default=HTTP2_PRIOR_KNOWLEDGE)
    if fixed is not None:
        return Detector(max_bytes, timeout_s, fixed=fixed)
    return Detector(max_bytes, timeout_s, http_only=ap in _HTTP)
