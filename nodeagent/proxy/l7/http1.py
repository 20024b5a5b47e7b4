"""HTTP/1.1 connection codec on httptools (llhttp): plain protocol logic, no I/O.

Two sans-I/O state machines, one per side of a proxied HTTP/1 connection:

* ``ServerConnection`` — the downstream side: parses *requests* from the client,
  serializes *responses* to it.
* ``ClientConnection`` — the upstream side: serializes *requests* to the server, parses
  its *responses*.

Bytes in -> events out; events/heads in -> bytes out. The driver (asyncio) owns sockets,
timers and backpressure; nothing here blocks, buffers a whole body or raises on bad peer
input: bad input becomes a ``ProtocolError`` *event*. Only driver mistakes (sending in the
wrong state, a body longer than its content-length, a header with CR/LF) raise
``LocalProtocolError``.

Events (``receive_data``/``receive_eof``/``next_events`` return lists of them)::

    RequestHead(method, target, headers, version, keep_alive, content_length, chunked,
                upgrade, expect_continue)
    ResponseHead(status, headers, reason, version, keep_alive, content_length, chunked, upgrade)
    Data(data)                 a piece of body, as it arrived (never the whole body)
    EndOfMessage(trailers)     the message is complete (trailers: a header list, maybe empty)
    Upgrade(data)              101 passthrough: from now on the connection is raw bytes;
                               ``data`` = bytes already received that belong to the new protocol
    ProtocolError(status, reason, flag)
                               the peer broke the protocol; nothing more will be parsed

Header lists are ``list[tuple[bytes, bytes]]``: names lowercased (like Envoy and as
HTTP/2 needs), values without surrounding whitespace, order and duplicates kept. The
heads report the framing they arrived with (``content_length``, ``chunked``), but the
serializers always write their own framing and connection-management fields and drop any
``content-length``/``transfer-encoding``/``connection``/``keep-alive``/``upgrade``/
``http2-settings`` found in a header list: framing is hop-by-hop, so a message can never
go out with two different lengths. Strip the other hop-by-hop fields with
``headers.prepare_request``/``prepare_response`` before sending.

Driver loop (downstream side)::

    server = ServerConnection()
    for ev in server.receive_data(chunk):      # or receive_eof()
        RequestHead   -> route it; client = pool.get(); up.write(client.send_request(head'))
        Data          -> up.write(client.send_data(ev.data))
        EndOfMessage  -> up.write(client.send_end(ev.trailers))
        ProtocolError -> down.write(server.send_error(ev)); close after flushing
    if server.paused: pause reading the client (pipelined requests are queued)
    if server.awaiting_head: arm the header-read timer; on expiry
        down.write(server.on_timeout()) and close           # 408 + close (slowloris)

    for ev in client.receive_data(chunk):      # the upstream's bytes
        ResponseHead  -> down.write(server.send_response(head'))   (1xx too)
        Data          -> down.write(server.send_data(ev.data))
        EndOfMessage  -> down.write(server.send_end(ev.trailers))
                         client.reusable and pool.release(client)
                         if server.must_close: close after flushing
                         else: handle server.next_events()  (the next pipelined request)
        Upgrade       -> down.write(ev.data); the client side's bytes come from
                         server.next_events() -> [Upgrade(data)]; relay raw from now on
        ProtocolError -> down.write(server.send_local_reply(ev.flag, ev.status)) if
                         not server.response_started, else close

Semantics:

* **Keep-alive and pipelining**: one request is in flight at a time. Requests pipelined
  behind it are parsed as they arrive but their events are queued until the current
  response has ended (``next_events()``); past ``max_pipelined`` requests or
  ``max_buffered`` queued body bytes, ``paused`` asks the driver to stop reading.
  ``must_close`` says the connection ends after the current response: the client asked
  (``Connection: close``, HTTP/1.0 without keep-alive), a close-delimited response, a
  response that ended before its request, a protocol error, or EOF from the client.
* **Response framing to the client**: no body for HEAD, 1xx, 204, 304 (a HEAD/304 keeps
  its content-length); ``content-length`` when known; otherwise chunked to an HTTP/1.1
  client and close-delimited to an HTTP/1.0 client; 1xx are never sent to HTTP/1.0
  clients. Reason phrases are regenerated from the status (as Envoy does); the
  upstream's phrase is in ``ResponseHead.reason`` for logs.
* **Requests to the upstream** are always HTTP/1.1, framed by ``content_length`` (when
  not None) or chunked (``chunked``) or without a body; they must carry ``host``.
* **Upgrade**: only protocols in ``allowed_upgrades`` (default ``websocket``) on a
  request without a body are passed through (``RequestHead.upgrade``); the request then
  keeps ``Connection: upgrade``/``Upgrade`` and client bytes that follow are held until
  the upstream answers: 101 -> ``Upgrade`` events on both sides, anything else -> HTTP
  continues. Every other upgrade (``h2c`` always, even if listed) is ignored as RFC 9110
  7.8 allows: the request is forwarded as a plain request with ``Upgrade`` and
  ``HTTP2-Settings`` stripped, so a 101 can never be produced for h2c (Envoy does the
  same, envoyproxy/envoy#7981). ``send_response`` refuses a 101 for any request that is
  not a passed-through upgrade, and the upstream side turns an unexpected 101 into a
  502.

Safe defaults (llhttp in strict mode does the byte-level work; the rest is here). Each is
a ``ProtocolError`` with this status, answered with a well-formed response and close:

* Content-Length together with Transfer-Encoding -> 400; duplicate Content-Length -> 400
  (even equal values: llhttp rejects them, RFC 9112 6.3 allows either); malformed chunked
  encoding (size, CRLFs, extensions) -> 400; Transfer-Encoding whose final coding is not
  ``chunked`` -> 400 (RFC 9112 6.3), other codings before ``chunked`` -> 501 (RFC 9112
  6.1: we could not pass them on); Transfer-Encoding in an HTTP/1.0 request -> 400 (RFC
  9112 6.1: faulty framing).
* CR, LF, NUL (any CTL but HTAB) in a header name or value, obs-fold, whitespace before
  the colon, bare LF line endings -> 400.
* More than ``max_headers`` (100) fields or more than ``max_header_bytes`` (60 KiB) of
  field names + values -> 431; request-target longer than ``max_target_bytes`` -> 414.
  Trailers have the same limits. Memory while reading a head is bounded as well: bytes
  read without finishing the head are capped (431) and partial lines are buffered here
  so that httptools never re-concatenates a header field piece by piece.
* Invalid request-target (characters llhttp refuses, a fragment, ``*`` other than with
  OPTIONS, absolute-form that is not http(s) with a host) -> 400; unknown or lowercase
  method -> 400; CONNECT -> 405 (no tunnelling here); HTTP/0.9 -> 400, HTTP/2.0 or other
  versions in a request line -> 505; missing Host in HTTP/1.1, duplicate or invalid
  Host -> 400.
* Header-read timeout: ``on_timeout()`` -> 408 + close when part of a request head was
  received, a silent close when the connection was idle between requests.
* Upstream side: the same parser checks, reported as 502 ``UPE``; EOF before the
  response -> 503 ``UC``, EOF inside a response -> 502 ``UC``; unsolicited bytes make the
  connection non-reusable.

Known leniency (harmless because every message is re-serialized): llhttp also accepts
``RTSP/1.0`` as the version of a request or response line and reports it as 1.0.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import httptools

from nodeagent.proxy.l7.errors import local_reply, reason_phrase
from nodeagent.proxy.l7.headers import list_tokens

Headers = list[tuple[bytes, bytes]]


# ----------------------------------------------------------------------------- events
@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: Headers
    version: bytes = b"1.1"
    keep_alive: bool = True
    content_length: int | None = None
    chunked: bool = False
    upgrade: bytes | None = None
    expect_continue: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers
    reason: bytes = b""
    version: bytes = b"1.1"
    keep_alive: bool = True
    content_length: int | None = None
    chunked: bool = False
    upgrade: bytes | None = None

    @property
    def informational(self) -> bool:
        return self.status < 200


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    trailers: Headers = field(default_factory=list)


@dataclass(slots=True)
class Upgrade:
    data: bytes = b""


@dataclass(slots=True)
class ProtocolError:
    status: int
    reason: str
    flag: str = "DPE"


Event = RequestHead | ResponseHead | Data | EndOfMessage | Upgrade | ProtocolError


class LocalProtocolError(Exception):
    """The driver used the codec wrongly (wrong state, bad header to send, length mismatch)."""


@dataclass(frozen=True, slots=True)
class Http1Limits:
    max_headers: int = 100
    max_header_bytes: int = 60 * 1024
    max_target_bytes: int = 32 * 1024
    max_pipelined: int = 16  # requests queued behind the one in flight before `paused`
    max_buffered: int = 64 * 1024  # queued body bytes (or held upgrade bytes) before `paused`


DEFAULT_LIMITS = Http1Limits()

# ------------------------------------------------------------------------- internals
_FRAGMENT = 8192  # partial head lines are buffered up to this size before llhttp sees them

# never written from a header list: the codec writes its own framing / connection fields
_SKIP_OUT = frozenset({
    b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"proxy-connection",
    b"upgrade", b"http2-settings",
})
# never sent as trailers (RFC 9110 6.5.1: framing, routing, connection management)
_SKIP_TRAILER = _SKIP_OUT | frozenset({
    b"host", b"te", b"trailer", b"content-type", b"content-encoding", b"content-range",
    b"authorization", b"expect", b"max-forwards", b"range", b"cache-control",
})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PROTOCOL = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")  # Upgrade
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")  # one regex search beats three `in` scans per value
# methods that need no token check when sending (the common ones)
_KNOWN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"})
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


_GOOD_NAMES: set[bytes] = set()  # names already checked to be tokens (bounded cache)


def _write_fields(out: list[bytes], headers: Headers, skip: frozenset[bytes]) -> bool:
    """Serialize ``headers`` into ``out`` (skipping ``skip``); returns whether host was seen.

    Refuses names that are not tokens and values with CR, LF or NUL (header injection:
    values set by filters or the routing layer end up here unchecked otherwise).
    """
    host = False
    good = _GOOD_NAMES
    bad = _BAD_VALUE.search
    append = out.append
    for name, value in headers:
        if name in skip:
            continue
        if name not in good:
            if _TOKEN.fullmatch(name) is None:
                raise LocalProtocolError(f"invalid header name {name!r}")
            if len(good) < 4096:
                good.add(name)
        if bad(value) is not None:
            raise LocalProtocolError(f"invalid value for header {name!r}")
        if name == b"host":
            host = True
        append(name + b": " + value + b"\r\n")
    return host


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def _end_chunked(trailers: Headers) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    out = [b"0\r\n"]
    _write_fields(out, trailers, _SKIP_TRAILER)
    out.append(b"\r\n")
    return b"".join(out)


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with a chosen status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Callbacks:
    """The object httptools calls; its attributes are bound methods of the connection."""

    __slots__ = ("on_message_begin", "on_url", "on_status", "on_header", "on_headers_complete",
                 "on_body", "on_message_complete", "on_chunk_complete")


# body modes of an outgoing message
_NOBODY, _LENGTH, _CHUNKED, _CLOSE = range(4)


_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host", b"upgrade",
                            b"expect"})
# Connection values seen on nearly every message: their tokens without splitting
_COMMON_CONNECTION = {b"keep-alive": (b"keep-alive",), b"close": (b"close",), b"Keep-Alive": (b"keep-alive",),
                      b"Close": (b"close",), b"upgrade": (b"upgrade",), b"Upgrade": (b"upgrade",)}
_NO_OPTIONS: frozenset[bytes] = frozenset()


def _framing_fields(headers: Headers, version: bytes, is_request: bool,
                    err_status: int) -> tuple[int | None, bool, "set[bytes] | frozenset[bytes]", bytes | None,
                                              bytes | None, int, bytes | None]:
    """Scan a parsed head: (content_length, chunked, connection options, upgrade, host, nhosts, expect)."""
    cl: bytes | None = None
    te: list[bytes] | None = None
    conn: set[bytes] | None = None
    upgrade = host = expect = None
    nhosts = 0
    names = _FRAMING_NAMES
    for name, value in headers:
        if name not in names:
            continue
        if name == b"content-length":
            cl = value
        elif name == b"connection":
            toks = _COMMON_CONNECTION.get(value)
            if conn is None:
                conn = set(toks if toks is not None else list_tokens(value))
            else:
                conn.update(toks if toks is not None else list_tokens(value))
        elif name == b"host":
            nhosts += 1
            host = value
        elif name == b"transfer-encoding":
            if te is None:
                te = []
            te.extend(list_tokens(value))
        elif name == b"upgrade":
            upgrade = value
        elif name == b"expect":
            expect = value
    if conn is None:
        conn = _NO_OPTIONS
    chunked = False
    if te:
        if is_request and version == b"1.0":
            raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te[-1] != b"chunked":  # RFC 9112 6.3: the length cannot be determined -> 400
            raise _Reject(400 if is_request else err_status, "chunked is not the final transfer coding")
        if len(te) != 1:  # e.g. "gzip, chunked": a coding we could not pass on (RFC 9112 6.1)
            raise _Reject(501 if is_request else err_status, "unsupported transfer coding")
        chunked = True
    length = int(cl) if cl is not None and not chunked else None
    return length, chunked, conn, upgrade, host, nhosts, expect


class _Side:
    """What both connection sides share: feeding llhttp safely, field limits, events."""

    __slots__ = (
        "limits", "_cb", "_parser", "_in_head", "_head_fed", "_pending", "_guard", "_stall",
        "_progress", "_reject", "_fields", "_nfields", "_field_bytes", "_trailers", "_dead",
        "_ready", "_err_status", "_err_flag", "_heads", "_started", "_suppress", "_into", "_max_fields",
        "_max_field_bytes",
    )

    def __init__(self, limits: Http1Limits, err_status: int, err_flag: str) -> None:
        self.limits = limits
        self._err_status = err_status
        self._err_flag = err_flag
        cb = _Callbacks()
        cb.on_message_begin = self._on_message_begin
        cb.on_header = self._on_header
        cb.on_headers_complete = self._on_headers_complete
        cb.on_body = self._on_body
        cb.on_message_complete = self._on_message_complete
        cb.on_chunk_complete = self._on_chunk_complete
        cb.on_url = getattr(self, "_on_url", None)
        cb.on_status = getattr(self, "_on_status", None)
        self._cb = cb
        self._parser = self._new_parser()
        self._in_head = True  # reading a head: headers of the next/current message not complete
        self._head_fed = 0  # bytes fed/buffered since this head started
        self._pending = bytearray()  # a partial head line not yet fed to llhttp
        # raw bytes allowed while reading one head (the exact limits are checked per field)
        self._guard = limits.max_header_bytes + limits.max_target_bytes + 4 * limits.max_headers + 1024
        self._stall = 0  # body-state bytes fed without parser progress (trailers, extensions)
        self._progress = 0
        self._heads = 0  # heads completed (to tell whether a feed finished one)
        self._started = False  # llhttp began a message that has not completed
        self._suppress = False  # replaying a synthetic head (server side): head callbacks ignored
        self._reject: _Reject | None = None
        self._fields: Headers = []
        self._nfields = 0
        self._field_bytes = 0
        self._trailers: Headers | None = None
        self._into: Headers = self._fields  # where _on_header appends: _fields, then _trailers
        self._max_fields = limits.max_headers
        self._max_field_bytes = limits.max_header_bytes
        self._dead = False  # nothing more is parsed (error, close, EOF)
        self._ready: list = []

    def _new_parser(self):  # pragma: no cover - overridden
        raise NotImplementedError

    # ------------------------------------------------------------ feeding
    def _feed(self, data: bytes) -> None:
        """Feed bytes to llhttp, buffering partial head lines; reports errors as events."""
        if self._dead or not data:
            return
        if self._in_head:
            # Only bytes of a head that is still incomplete after this feed count against the
            # guard (a read may hold a small head and a large body). Bytes after a message that
            # ends inside a read start the next head uncounted: at most one read.
            self._head_fed += len(data)
            pend = self._pending
            nl = b"\n" in data
            # the first bytes of a message go straight in (llhttp rejects a bad method at once);
            # later partial lines wait for their end so httptools never joins a field piecemeal
            if pend or not (nl or not self._started):
                pend += data
                if not nl and len(pend) < _FRAGMENT:
                    if self._head_fed > self._guard:
                        self._error(self._too_large, "header section too large")
                    return
                data = bytes(pend)
                pend.clear()
            mark = self._heads
            try:  # _parse, inlined: this runs for every message
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                self._paused_on_upgrade(data[exc.args[0]:])
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
            if self._in_head and self._heads == mark and self._head_fed > self._guard and not self._dead:
                self._error(self._too_large, "header section too large")
            return
        before = self._progress
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._paused_on_upgrade(data[exc.args[0]:])
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
        if self._progress == before and not self._in_head:
            self._stall += len(data)
            if self._stall > self._guard:
                self._error(self._too_large, "trailer section too large")
        else:
            self._stall = 0

    @property
    def _too_large(self) -> int:
        return 431 if self._err_flag == "DPE" else self._err_status

    def _parse(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._paused_on_upgrade(data[exc.args[0]:])
        except httptools.HttpParserError as exc:
            self._parse_error(exc)

    def _parse_error(self, exc: Exception) -> None:
        rej, self._reject = self._reject, None
        if self._dead:  # e.g. llhttp's "Data after Connection: close" once we stopped reading
            return
        if rej is not None and rej.status == 0:
            self._dead = True
        elif rej is not None:
            self._error(rej.status, rej.reason)
        elif isinstance(exc, httptools.HttpParserInvalidMethodError):
            self._error(self._err_status, "invalid method")
        elif isinstance(exc, httptools.HttpParserInvalidURLError):
            self._error(self._err_status, "invalid request-target")
        elif isinstance(exc, httptools.HttpParserInvalidStatusError):
            self._error(self._err_status, "invalid status line")
        else:
            self._error(self._err_status, str(exc) or "malformed message")

    def _error(self, status: int, reason: str) -> None:
        self._dead = True
        self._pending.clear()
        self._emit(ProtocolError(status, reason, self._err_flag))

    def _paused_on_upgrade(self, tail: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _emit(self, ev) -> None:
        self._ready.append(ev)

    def _take(self) -> list:
        r = self._ready
        self._ready = []
        return r

    def _raise(self, status: int, reason: str):
        rej = _Reject(status, reason)
        self._reject = rej
        raise rej

    # ------------------------------------------------------------ shared callbacks
    def _flush_pending(self) -> None:
        """At EOF: let llhttp judge a buffered partial line (its error beats "truncated")."""
        if self._pending and not self._dead:
            data = bytes(self._pending)
            self._pending.clear()
            self._parse(data)

    def _partial(self) -> bool:
        """Part of a message was received (empty lines between messages do not count)."""
        return self._started or not self._in_head or bool(self._pending.strip(b"\r\n"))

    def _on_message_begin(self) -> None:
        self._started = True
        self._fields = self._into = []
        self._nfields = 0
        self._field_bytes = 0
        self._trailers = None

    def _on_header(self, name: bytes, value: bytes) -> None:
        if self._suppress:
            return
        value = value.rstrip(b" \t")  # llhttp drops leading OWS, keeps trailing
        n = self._nfields = self._nfields + 1
        size = self._field_bytes = self._field_bytes + len(name) + len(value)
        if n > self._max_fields or size > self._max_field_bytes:
            self._too_many_fields(n)
        self._into.append((name.lower(), value))

    def _too_many_fields(self, n: int) -> None:
        what = "header" if self._trailers is None else "trailer"
        if n > self._max_fields:
            self._raise(self._too_large, f"too many {what} fields")
        self._raise(self._too_large, f"{what} section too large")

    def _start_body(self) -> None:
        """Called by subclasses at headers-complete: trailers are counted separately.
        (Inlined in both ``_on_headers_complete``: keep them in step.)"""
        self._in_head = False
        self._stall = 0
        self._progress += 1
        self._heads += 1
        self._trailers = self._into = []
        self._nfields = 0
        self._field_bytes = 0

    def _on_body(self, body: bytes) -> None:
        self._progress += 1
        self._emit(Data(body))

    def _on_chunk_complete(self) -> None:
        self._progress += 1

    def _message_done(self) -> None:
        self._started = False
        self._progress += 1
        self._in_head = True
        self._head_fed = 0

    def _on_headers_complete(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _on_message_complete(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# ============================================================================ server side
class ServerConnection(_Side):
    """The downstream side of one client connection: requests in, responses out."""

    __slots__ = (
        "allowed_upgrades", "_url", "_url_len", "_skip_complete", "_replay",
        "_parse_cycle", "_cycle", "_later", "_later_bytes", "_later_heads", "_reqs",
        "_hold", "_hold_cycle", "_resp", "_resp_mode", "_resp_left", "_switched",
        "_input_closed", "eof_received", "must_close", "_cur_keep_alive", "_host_ok",
    )

    def __init__(self, limits: Http1Limits = DEFAULT_LIMITS, *,
                 allowed_upgrades: tuple[bytes, ...] = (b"websocket",)) -> None:
        self.allowed_upgrades = frozenset(u.lower() for u in allowed_upgrades) - {b"h2c"}
        self._url: list[bytes] = []
        self._url_len = 0
        self._skip_complete = False
        self._replay: tuple[int | None, bool] | None = None
        self._parse_cycle = 0  # index of the request being parsed
        self._cycle = 0  # index of the request/response exchange being served
        self._later: deque = deque()  # (cycle, event) of pipelined requests
        self._later_bytes = 0
        self._later_heads = 0
        self._reqs: deque[RequestHead] = deque()  # parsed request heads, [0] = current cycle
        self._hold: bytearray | None = None  # client bytes after a passed-through upgrade request
        self._hold_cycle = -1
        self._resp = 0  # 0 none sent, 1 final head sent (body), 2 ended
        self._resp_mode = _NOBODY
        self._resp_left = 0
        self._switched = False
        self._input_closed = False  # no further requests will be read
        self.eof_received = False
        self.must_close = False
        self._cur_keep_alive = True
        self._host_ok: bytes | None = None  # the last Host value found valid
        super().__init__(limits, 400, "DPE")

    def _new_parser(self):
        return httptools.HttpRequestParser(self._cb)

    # ---------------------------------------------------------------- public: state
    @property
    def paused(self) -> bool:
        """True: stop reading from the client until ``next_events()`` drains the queue."""
        lim = self.limits
        if self._hold is not None and len(self._hold) > lim.max_buffered:
            return True
        return self._later_heads > lim.max_pipelined or self._later_bytes > lim.max_buffered

    @property
    def awaiting_head(self) -> bool:
        """True while waiting for the head of the next request (arm the header timer)."""
        return not self._reqs and not self._dead and not self._switched and not self._input_closed

    @property
    def partial_head(self) -> bool:
        """Part of the next request was received (the header-read clock is running)."""
        return self._partial()

    @property
    def in_flight(self) -> bool:
        """A request head was delivered and its response has not ended."""
        return bool(self._reqs) and self._resp != 2 and not self._switched

    @property
    def response_started(self) -> bool:
        return self._resp != 0 or self._switched

    @property
    def upgraded(self) -> bool:
        return self._switched

    # ---------------------------------------------------------------- public: input
    def receive_data(self, data: bytes) -> list:
        """Feed client bytes; returns the events of the current exchange."""
        if self._switched:
            raise LocalProtocolError("the connection was upgraded: relay raw bytes")
        if self._hold is not None:
            self._hold += data
            return self._take()
        if not self._input_closed:
            self._feed(data)
        return self._take()

    def receive_eof(self) -> list:
        """The client half-closed. A partial request is an error; complete ones are served."""
        if self.eof_received or self._switched:
            return self._take()
        self.eof_received = True
        if self._hold is not None:
            return self._take()
        if not self._input_closed:
            self._flush_pending()
        if not self._input_closed and not self._dead and self._partial():
            self._error(400, "connection closed inside a request")
        self._input_closed = True
        if not self._reqs and not self._later:
            self.must_close = True
        return self._take()

    def next_events(self) -> list:
        """Events released since the last call (the next pipelined request, Upgrade)."""
        return self._take()

    # ---------------------------------------------------------------- public: output
    def send_response(self, head: ResponseHead) -> bytes:
        """Serialize a response head (1xx included) for the current request."""
        if self._switched or self._resp == 2:
            raise LocalProtocolError("no response expected now")
        if self._resp == 1:
            raise LocalProtocolError("response head already sent")
        if not self._reqs:
            raise LocalProtocolError("no request to respond to")
        req = self._reqs[0]
        status = head.status
        if not 100 <= status <= 599:
            raise LocalProtocolError(f"invalid status {status}")
        if status < 200:
            if status == 101:
                return self._switch(req, head)
            if req.version == b"1.0":
                return b""  # RFC 9110 15.2: no 1xx to an HTTP/1.0 client
            out = [_status_line(status)]
            _write_fields(out, head.headers, _SKIP_OUT)
            out.append(b"\r\n")
            return b"".join(out)
        return self._final_head(req, status, head.headers, head.content_length)

    def send_data(self, data: bytes) -> bytes:
        """Frame a piece of the response body (b"" for HEAD/204/304, which have none)."""
        if self._resp != 1:
            raise LocalProtocolError("no response body expected now")
        mode = self._resp_mode
        if mode == _CHUNKED:
            return _chunk(data)
        if mode == _LENGTH:
            n = len(data)
            if n > self._resp_left:
                raise LocalProtocolError("response body longer than its content-length")
            self._resp_left -= n
            return data
        if mode == _CLOSE:
            return data
        return b""

    def send_end(self, trailers: Headers = ()) -> bytes:
        """End the response; afterwards check ``must_close`` and ``next_events()``."""
        if self._resp != 1:
            raise LocalProtocolError("no response to end")
        mode = self._resp_mode
        if mode == _LENGTH and self._resp_left:
            raise LocalProtocolError("response body shorter than its content-length")
        out = _end_chunked(list(trailers)) if mode == _CHUNKED else b""
        if mode == _CLOSE:
            self.must_close = True
        self._resp = 2
        self._end_cycle()
        return out

    def send_local_reply(self, flag: str, status: int | None = None, message: str | None = None,
                         *, close: bool = False, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """A complete proxy-made response (errors.local_reply) for the current request."""
        if self._switched or self._resp != 0:
            raise LocalProtocolError("a response was already started")
        r = local_reply(flag, status, message, extra)
        if close:
            self.must_close = True
        if self._reqs:
            req = self._reqs[0]
        else:  # no parsed request (an error in its head): answer as to HTTP/1.1, then close
            req = RequestHead(b"GET", b"/", [], keep_alive=False)
            self._reqs.append(req)
            self._parse_cycle = max(self._parse_cycle, self._cycle + 1)
            self.must_close = True
        out = self._final_head(req, r.status, r.headers, len(r.body))
        out += self.send_data(r.body)
        return out + self.send_end()

    def send_error(self, err: ProtocolError) -> bytes:
        """The reply to a ``ProtocolError`` event: a well-formed response, then close.

        Returns b"" when a response was already started (then only closing is possible).
        """
        self.must_close = True
        self._input_closed = True
        self._dead = True
        if self._switched or self._resp != 0:
            return b""
        return self.send_local_reply(err.flag, err.status, err.reason, close=True)

    def on_timeout(self) -> bytes:
        """The header-read timer fired: 408 + close if a head was partly received, else close."""
        self.must_close = True
        self._input_closed = True
        if self._switched or self._resp != 0 or self._reqs:
            self._dead = True
            return b""
        started = self._partial()
        self._dead = True
        if not started:
            return b""
        self._later.clear()
        return self.send_local_reply("SI", 408, "request header timeout", close=True)

    # ---------------------------------------------------------------- output internals
    def _final_head(self, req: RequestHead, status: int, headers: Headers, length: int | None) -> bytes:
        close = self.must_close or not req.keep_alive
        if req.method == b"HEAD" or status == 204 or status == 304:
            mode = _NOBODY
        elif length is not None:
            mode = _LENGTH
        elif req.version == b"1.1":
            mode = _CHUNKED
        else:
            mode = _CLOSE
            close = True
        out = [_STATUS_LINES.get(status) or _status_line(status)]
        _write_fields(out, headers, _SKIP_OUT)
        if mode == _LENGTH or (mode == _NOBODY and status != 204 and length is not None):
            out.append(b"content-length: %d\r\n" % length)
        elif mode == _CHUNKED:
            out.append(b"transfer-encoding: chunked\r\n")
        if close:
            out.append(b"connection: close\r\n")
            self.must_close = True
        elif req.version == b"1.0":
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        self._resp = 1
        self._resp_mode = mode
        self._resp_left = length or 0
        return b"".join(out)

    def _switch(self, req: RequestHead, head: ResponseHead) -> bytes:
        if req.upgrade is None or self._hold is None or self._hold_cycle != self._cycle:
            raise LocalProtocolError("101 Switching Protocols without a passed-through upgrade request")
        proto = head.upgrade or req.upgrade
        if _PROTOCOL.fullmatch(proto) is None:
            raise LocalProtocolError(f"invalid upgrade protocol {proto!r}")
        out = [_status_line(101)]
        _write_fields(out, head.headers, _SKIP_OUT)
        out.append(b"connection: upgrade\r\nupgrade: %s\r\n\r\n" % proto)
        self._switched = True
        self._resp = 2
        tail, self._hold = bytes(self._hold), None
        self._later.clear()
        self._ready.append(Upgrade(tail))
        return b"".join(out)

    def _end_cycle(self) -> None:
        """The response ended: serve the next queued request, or decide to close."""
        req_done = self._parse_cycle > self._cycle
        if not req_done:
            self.must_close = True  # the response ended before its request (Envoy does the same)
        if self._reqs and not self._reqs[0].keep_alive:
            self.must_close = True
        if self.must_close:
            self._input_closed = True
            return
        self._reqs.popleft()
        self._cycle += 1
        self._resp = 0
        self._resp_mode = _NOBODY
        later = self._later
        while later and later[0][0] == self._cycle:
            ev = later.popleft()[1]
            if type(ev) is Data:
                self._later_bytes -= len(ev.data)
            elif type(ev) is RequestHead:
                self._later_heads -= 1
            self._ready.append(ev)
        if self._hold is not None and self._cycle > self._hold_cycle:  # upgrade declined upstream
            data, self._hold = bytes(self._hold), None
            self._feed(data)
        if self.eof_received and not self._reqs and not later and self._parse_cycle <= self._cycle:
            self.must_close = True

    def _emit(self, ev) -> None:
        if self._parse_cycle == self._cycle:
            self._ready.append(ev)
            return
        self._later.append((self._parse_cycle, ev))
        if type(ev) is Data:
            self._later_bytes += len(ev.data)
        elif type(ev) is RequestHead:
            self._later_heads += 1

    # ---------------------------------------------------------------- parser callbacks
    def _on_message_begin(self) -> None:
        if self._suppress:
            return
        self._started = True  # _Side._on_message_begin, inlined
        self._fields = self._into = []
        self._nfields = 0
        self._field_bytes = 0
        self._trailers = None
        self._url = []
        self._url_len = 0

    def _on_url(self, frag: bytes) -> None:
        if self._suppress:
            return
        self._url.append(frag)
        self._url_len += len(frag)
        if self._url_len > self.limits.max_target_bytes:
            self._raise(414, "request-target too long")

    def _on_headers_complete(self) -> None:
        if self._suppress:
            return
        head = self._request_head()
        self._in_head = False  # _start_body, inlined
        self._stall = 0
        self._progress += 1
        self._heads += 1
        self._trailers = self._into = []
        self._nfields = 0
        self._field_bytes = 0
        self._cur_keep_alive = head.keep_alive
        self._reqs.append(head)
        if self._parse_cycle == self._cycle:
            self._ready.append(head)
        else:
            self._emit(head)

    def _on_message_complete(self) -> None:
        if self._skip_complete:  # llhttp ends a declined upgrade's head; the replay carries the body
            self._skip_complete = False
            return
        self._started = False  # _message_done, inlined
        self._progress += 1
        self._in_head = True
        self._head_fed = 0
        t = self._trailers
        ev = EndOfMessage(t if t is not None else [])  # a fresh list per message (see _start_body)
        if self._parse_cycle == self._cycle:
            self._ready.append(ev)
        else:
            self._emit(ev)
        self._parse_cycle += 1
        if not self._cur_keep_alive:
            self._input_closed = True
            self._dead = True  # ignore whatever follows (llhttp: "Data after Connection: close")

    def _paused_on_upgrade(self, tail: bytes) -> None:
        if self._dead:
            return
        if self._replay is not None:  # declined upgrade with a body: parse the body afresh
            length, chunked = self._replay
            self._replay = None
            self._parser = httptools.HttpRequestParser(self._cb)
            framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % length
            self._suppress = True
            try:
                self._parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n\r\n" % framing)
            finally:
                self._suppress = False
            self._feed(tail)
            return
        head = self._reqs[-1] if self._reqs else None
        if head is not None and head.upgrade is not None:
            self._hold = bytearray(tail)  # until the upstream answers the upgrade
            self._hold_cycle = self._parse_cycle - 1
            return
        self._feed(tail)  # a declined upgrade without a body: llhttp already resumed

    def _request_head(self) -> RequestHead:
        p = self._parser
        hv = p.get_http_version()
        if hv == "1.1":
            version = b"1.1"
        elif hv == "1.0":
            version = b"1.0"
        elif hv.startswith("0."):
            self._raise(400, "HTTP/0.9 is not supported")
        else:
            self._raise(505, "HTTP version not supported")
        method = p.get_method()
        if method == b"CONNECT":
            self._raise(405, "CONNECT is not supported")
        target = b"".join(self._url) if len(self._url) != 1 else self._url[0]
        if target[:1] == b"/":
            pass
        elif target == b"*":
            if method != b"OPTIONS":
                self._raise(400, "asterisk-form request-target is only for OPTIONS")
        else:
            try:
                u = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                self._raise(400, "invalid request-target")
            if (u.schema or b"").lower() not in (b"http", b"https") or not u.host:
                self._raise(400, "invalid request-target")
        if b"#" in target:
            self._raise(400, "fragment in request-target")
        headers = self._fields
        try:
            length, chunked, conn, upgrade, host, nhosts, expect = _framing_fields(headers, version, True, 400)
        except _Reject as rej:
            self._reject = rej
            raise
        if nhosts > 1:
            self._raise(400, "duplicate Host header")
        if nhosts == 0:
            if version == b"1.1":
                self._raise(400, "missing Host header")
        elif host != self._host_ok:  # a keep-alive connection repeats its Host: check it once
            if _HOST.fullmatch(host) is None:
                self._raise(400, "invalid Host header")
            self._host_ok = host
        if version == b"1.1":
            keep_alive = b"close" not in conn
        else:
            keep_alive = b"keep-alive" in conn and b"close" not in conn
        passed = None
        if p.should_upgrade():  # Connection: upgrade + Upgrade (CONNECT was refused above)
            protos = list_tokens(upgrade or b"")
            has_body = chunked or bool(length)
            if len(protos) == 1 and protos[0] in self.allowed_upgrades and not has_body:
                passed = upgrade.strip(b" \t")
            elif has_body:  # llhttp stops at the head; parse the body with a fresh parser
                self._skip_complete = True
                self._replay = (length, chunked)
        return RequestHead(
            method, target, headers, version, keep_alive, length, chunked, passed,
            expect is not None and expect.lower() == b"100-continue",
        )


# ============================================================================ client side
class ClientConnection(_Side):
    """The upstream side of one connection to a server: requests out, responses in.

    One request at a time. ``reusable`` says whether the connection may go back to the
    pool (the exchange ended cleanly and both sides allow keep-alive).
    """

    __slots__ = (
        "_req", "_req_mode", "_req_left", "_req_sent", "_head_request", "_resp_done",
        "_resp_head", "_informational", "_switching", "_switched", "_close_delimited",
        "_keep_alive", "_reason", "_scan", "eof_received", "_resp_seen",
    )

    def __init__(self, limits: Http1Limits = DEFAULT_LIMITS) -> None:
        self._req: RequestHead | None = None
        self._req_mode = _NOBODY
        self._req_left = 0
        self._req_sent = False
        self._head_request = False
        self._resp_done = False
        self._resp_head: ResponseHead | None = None
        self._informational = False
        self._switching = False
        self._switched = False
        self._close_delimited = False
        self._keep_alive = True
        self._reason: list[bytes] = []
        self._scan: bytearray | None = None  # exact head scanning for HEAD responses
        self.eof_received = False
        self._resp_seen = False  # a response message (1xx included) began for the current request
        super().__init__(limits, 502, "UPE")

    def _new_parser(self):
        return httptools.HttpResponseParser(self._cb)

    # ---------------------------------------------------------------- public: state
    @property
    def reusable(self) -> bool:
        """Idle, clean and keep-alive on both sides: may return to the pool."""
        return (self._req is None and not self._dead and not self._switched and self._keep_alive
                and not self.eof_received)

    @property
    def idle(self) -> bool:
        return self._req is None

    @property
    def upgraded(self) -> bool:
        return self._switched

    @property
    def response_untouched(self) -> bool:
        """Not one byte of a response to the current request arrived (not even a 1xx): what a
        stale keep-alive connection looks like when it dies under a request."""
        return not self._resp_seen and not self._head_fed and not self._scan

    # ---------------------------------------------------------------- public: output
    def send_request(self, head: RequestHead) -> bytes:
        """Serialize a request head (always HTTP/1.1).

        ``head.headers`` must carry ``host`` and no HTTP/2 pseudo-headers (a translator
        turns ``:authority`` into ``host``); framing comes from ``content_length`` /
        ``chunked``, never from the list. Every request ends with ``send_end()``, bodyless
        ones too.
        """
        if self._req is not None or self._dead or self._switched:
            raise LocalProtocolError("connection busy or closed")
        method = head.method
        if method not in _KNOWN_METHODS and (not method or _TOKEN.fullmatch(method) is None):
            raise LocalProtocolError(f"invalid method {method!r}")
        if not head.target or _BAD_TARGET.search(head.target) is not None:
            raise LocalProtocolError(f"invalid request-target {head.target!r}")
        out = [b"%s %s HTTP/1.1\r\n" % (head.method, head.target)]
        if not _write_fields(out, head.headers, _SKIP_OUT):
            raise LocalProtocolError("a request needs a host header")
        if head.upgrade is not None:
            if head.has_body or head.method == b"HEAD" or _PROTOCOL.fullmatch(head.upgrade) is None:
                raise LocalProtocolError("invalid upgrade request")
            out.append(b"connection: upgrade\r\nupgrade: %s\r\n" % head.upgrade)
        if head.content_length is not None:
            out.append(b"content-length: %d\r\n" % head.content_length)
            self._req_mode = _LENGTH
            self._req_left = head.content_length
        elif head.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
            self._req_mode = _CHUNKED
        else:
            self._req_mode = _NOBODY
            self._req_left = 0
        out.append(b"\r\n")
        self._req = head
        self._req_sent = False
        self._head_request = head.method == b"HEAD"
        self._resp_done = False
        self._resp_head = None
        self._resp_seen = False
        self._close_delimited = False
        self._scan = bytearray() if self._head_request else None
        return b"".join(out)

    def send_data(self, data: bytes) -> bytes:
        if self._req is None or self._req_sent:
            raise LocalProtocolError("no request body expected now")
        mode = self._req_mode
        if mode == _CHUNKED:
            return _chunk(data)
        n = len(data)
        if n > self._req_left:
            raise LocalProtocolError("request body longer than its content-length")
        self._req_left -= n
        return data

    def send_end(self, trailers: Headers = ()) -> bytes:
        if self._req is None or self._req_sent:
            raise LocalProtocolError("no request to end")
        if self._req_mode == _LENGTH and self._req_left:
            raise LocalProtocolError("request body shorter than its content-length")
        out = _end_chunked(list(trailers)) if self._req_mode == _CHUNKED else b""
        self._req_sent = True
        self._maybe_idle()
        return out

    # ---------------------------------------------------------------- public: input
    def receive_data(self, data: bytes) -> list:
        """Feed the upstream's bytes; returns response events."""
        if self._switched:
            raise LocalProtocolError("the connection was upgraded: relay raw bytes")
        if self._dead or not data:
            return self._take()
        if self._req is None:  # unsolicited bytes (e.g. a 408 on an idle pooled connection)
            self._dead = True
            return self._take()
        if self._scan is not None:
            self._feed_head_response(data)
        else:
            self._feed(data)
        return self._take()

    def receive_eof(self) -> list:
        """The upstream closed its side: ends a close-delimited body, else an error if busy."""
        if self.eof_received or self._switched:
            return self._take()
        self.eof_received = True
        if self._dead or self._req is None or self._resp_done:
            self._dead = True
            return self._take()
        if self._scan:  # a partial HEAD response head
            data = bytes(self._scan)
            self._scan.clear()
            self._feed(data)
        self._flush_pending()
        if self._dead or self._resp_done:
            self._dead = True
            return self._take()
        if self._close_delimited and self._resp_head is not None and not self._in_head:
            self._emit(EndOfMessage([]))
            self._resp_done = True
            self._dead = True
            self._maybe_idle()
            return self._take()
        if self._resp_head is None:
            self._err_flag = "UC"
            self._error(503, "upstream closed the connection before responding")
        else:
            self._err_flag = "UC"
            self._error(502, "upstream closed the connection inside a response")
        return self._take()

    # ---------------------------------------------------------------- internals
    def _feed_head_response(self, data: bytes) -> None:
        """HEAD responses: llhttp cannot be told "no body", so find each head's end here."""
        buf = self._scan
        buf += data
        while self._scan is not None and not self._dead:
            end = buf.find(b"\r\n\r\n")
            alt = buf.find(b"\n\n")
            if end < 0 and alt < 0:
                if len(buf) > self._guard:
                    self._error(self._err_status, "header section too large")
                return
            end = end + 4 if alt < 0 or (0 <= end and end + 2 <= alt) else alt + 2
            head = bytes(buf[:end])
            del buf[:end]
            self._feed(head)
            if self._dead or self._resp_head is None:
                continue  # an error, or a 1xx: the final head follows
            # the final head of a HEAD response: the message is complete
            self._scan = None
            self._parser = self._new_parser()
            self._in_head = True
            self._head_fed = 0
            if not self._resp_done:  # llhttp completes it itself for CL: 0, 204 and 304
                self._emit(EndOfMessage([]))
                self._resp_done = True
            rest = bytes(buf)
            if rest:
                self._dead = True  # bytes after a complete response: never reuse
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self._resp_done and self._req_sent:
            self._req = None
            if not self._keep_alive:
                self._dead = True

    def _paused_on_upgrade(self, tail: bytes) -> None:
        if self._dead:
            return
        if not self._switching:  # cannot happen: 101 without a passed-through request is refused
            self._error(502, "unexpected upgrade")
            return
        self._switched = True
        self._req = None
        self._emit(Upgrade(tail))

    # callbacks
    def _on_message_begin(self) -> None:
        if self._req is None or self._resp_done:
            # bytes after the response: no event (the exchange is over), just never reuse
            self._raise(0, "unsolicited response")
        self._resp_seen = True
        self._started = True  # _Side._on_message_begin, inlined
        self._fields = self._into = []
        self._nfields = 0
        self._field_bytes = 0
        self._trailers = None
        self._reason = []

    def _on_status(self, frag: bytes) -> None:
        self._reason.append(frag)

    def _on_headers_complete(self) -> None:
        p = self._parser
        status = p.get_status_code()
        if not 100 <= status <= 599:
            self._raise(502, f"invalid status {status}")
        hv = p.get_http_version()
        if hv == "1.1":
            version = b"1.1"
        elif hv == "1.0":
            version = b"1.0"
        else:
            self._raise(502, "unsupported HTTP version")
        headers = self._fields
        try:
            length, chunked, conn, upgrade, _host, _n, _e = _framing_fields(headers, version, False, 502)
        except _Reject as rej:
            self._reject = rej
            raise
        reason = b"".join(self._reason)
        if status < 200:
            self._start_body()
            if status == 101:
                if self._req is None or self._req.upgrade is None:
                    self._raise(502, "unexpected 101 Switching Protocols")
                if upgrade is None or b"upgrade" not in conn:
                    self._raise(502, "101 Switching Protocols without Upgrade")
                self._switching = True
                self._emit(ResponseHead(101, headers, reason, version, True, None, False,
                                        (upgrade or self._req.upgrade).strip(b" \t")))
                return
            self._informational = True
            self._emit(ResponseHead(status, headers, reason, version, True))
            return
        if version == b"1.1":
            keep_alive = b"close" not in conn
        else:
            keep_alive = b"keep-alive" in conn and b"close" not in conn
        if chunked and version == b"1.0":
            keep_alive = False  # RFC 9112 6.1: faulty framing; process it, then close
        bodyless = self._head_request or status == 204 or status == 304
        if not bodyless and length is None and not chunked:
            self._close_delimited = True
            keep_alive = False
        self._keep_alive = keep_alive
        head = ResponseHead(status, headers, reason, version, keep_alive, length, chunked)
        self._resp_head = head
        self._in_head = False  # _start_body, inlined
        self._stall = 0
        self._progress += 1
        self._heads += 1
        self._trailers = self._into = []
        self._nfields = 0
        self._field_bytes = 0
        self._ready.append(head)

    def _on_body(self, body: bytes) -> None:
        self._progress += 1
        self._ready.append(Data(body))

    def _on_message_complete(self) -> None:
        self._started = False  # _message_done, inlined
        self._progress += 1
        self._in_head = True
        self._head_fed = 0
        if self._informational:
            self._informational = False
            return
        if self._switching:
            return  # HttpParserUpgrade follows
        t = self._trailers
        self._ready.append(EndOfMessage(t if t is not None else []))
        self._resp_done = True
        if self._req_sent:  # _maybe_idle, inlined
            self._req = None
            if not self._keep_alive:
                self._dead = True
