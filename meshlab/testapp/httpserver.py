"""The HTTP side of the test app: HTTP/1.1 (httptools) and HTTP/2 with prior knowledge
(h2) on one port, as asyncio Protocols (no task per request or chunk; works the same
under uvloop).

A connection starts in `DetectProtocol`, which looks at the first bytes: the 24-byte
HTTP/2 connection preface hands the transport to `H2Protocol`, anything else to
`H1Protocol` (via transport.set_protocol).

Response behaviour comes from `behaviour.parse_behaviour` (query parameters). Bodies
are never held whole: request bodies are counted as they arrive, /echo forwards each
piece as it arrives (with backpressure: reading pauses while the transport's write
buffer is full, and for HTTP/2 received data is only acknowledged once echoed), and
size=N bodies are generated chunk by chunk while the transport accepts them.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
import traceback
from collections import deque
from http import HTTPStatus

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httptools

from .behaviour import (DEFAULT_BEHAVIOUR, ECHO, HEALTHZ, Behaviour, BehaviourError, describe,
                        error_body, join_headers, parse_behaviour, route, split_target)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

CHUNK = 256 * 1024                       # generated-body write size
FILL = (b"abcdefghijklmnopqrstuvwxyz0123456789" * (CHUNK // 36 + 1))[:CHUNK]
FILL_MV = memoryview(FILL)
WRITE_HIGH_WATER = 512 * 1024            # transport write buffer limit (pause above)
ECHO_BUFFER_LIMIT = 256 * 1024           # pause reading when this much echo data waits
MAX_HEADER_BYTES = 64 * 1024             # request line + headers (HTTP/1.1)
MAX_HEADER_COUNT = 256
H2_MAX_STREAMS = 256
H2_STREAM_WINDOW = 1024 * 1024           # our receive windows (HTTP/2)
H2_CONN_WINDOW = 16 * 1024 * 1024
H2_DEFAULT_WINDOW = 65535

_NO_BODY_STATUSES = (204, 304)
# Inbound headers are validated by h2; outbound ones are ours (names lowercased, values
# checked by the behaviour parser), so h2's per-header outbound checks are skipped.
_H2_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                       validate_outbound_headers=False,
                                       normalize_outbound_headers=False)
H2_FLUSH_BYTES = 64 * 1024               # while handling a batch of events, write at least this


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class HTTPApp:
    """What every HTTP connection shares: identity, logging, the set of live connections."""

    def __init__(self, pod: str, node: str, log_requests: bool = False, log_file=None):
        self.pod = pod
        self.node = node
        self.log_requests = log_requests
        self.log_file = log_file if log_file is not None else sys.stderr
        self.connections: set = set()

    def protocol_factory(self):
        return DetectProtocol(self)

    def log(self, protocol: str, peer, method: str, target: str, status, body_in: int,
            body_out: int, started: float) -> None:
        ms = (time.monotonic() - started) * 1000.0
        src = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.pod} {protocol} {src} "
                            f"\"{method} {target}\" {status} in={body_in} out={body_out} "
                            f"{ms:.1f}ms\n")
        self.log_file.flush()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.shutdown()


def _set_rst_linger(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):
            pass


# --------------------------------------------------------------------------- detection
class DetectProtocol(asyncio.Protocol):
    """Reads until it can tell HTTP/2 prior knowledge from HTTP/1.x, then hands over."""

    def __init__(self, app: HTTPApp):
        self.app = app
        self.transport = None
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport
        self.app.connections.add(self)

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        n = min(len(buf), len(H2_PREFACE))
        if buf[:n] != H2_PREFACE[:n]:
            proto = H1Protocol(self.app)
        elif n < len(H2_PREFACE):
            self.buf = buf
            return
        else:
            proto = H2Protocol(self.app)
        self.app.connections.discard(self)
        self.buf = b""
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        proto.data_received(buf)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.app.connections.discard(self)

    def shutdown(self):
        self.transport.close()


class _BaseProtocol(asyncio.Protocol):
    protocol_name = ""

    def __init__(self, app: HTTPApp):
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.peer = None
        self.local = None
        self.write_paused = False
        self.reading_paused = False
        self.closing = False
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.app.connections.add(self)

    def connection_lost(self, exc):
        self.closed = self.closing = True
        self.app.connections.discard(self)

    def _gone(self) -> bool:
        # after a failed send the transport is closing before connection_lost runs: writing
        # then only makes asyncio log "socket.send() raised exception" (and, on 3.11, can
        # trip its double connection_lost bug)
        return self.closing or self.transport is None or self.transport.is_closing()

    def pause_writing(self):
        self.write_paused = True
        self._update_reading()

    def _set_reading(self, pause: bool) -> None:
        if pause == self.reading_paused or self.closing:
            return
        self.reading_paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _update_reading(self) -> None:
        self._set_reading(self.write_paused)

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.close()

    def _reset_connection(self) -> None:
        if not self.closing:
            self.closing = True
            _set_rst_linger(self.transport)
            self.transport.abort()


# --------------------------------------------------------------------------- HTTP/1.1
class _ParseLimit(Exception):
    pass


class _H1Request:
    __slots__ = (
        "url", "headers", "method", "target", "path", "query", "version", "kind", "behaviour",
        "error", "error_status", "keep_alive", "content_length", "chunked", "expect_continue",
        "head", "body_bytes", "complete", "queued", "active", "delay_done", "timer", "started",
        "streaming", "remaining", "pending", "pending_bytes", "framing", "status", "sent_bytes",
        "t0",
    )

    def __init__(self):
        self.url = bytearray()
        self.headers: list[tuple[str, str]] = []
        self.method = "-"
        self.target = "-"
        self.path = ""
        self.query = ""
        self.version = "1.1"
        self.kind = None
        self.behaviour: Behaviour = DEFAULT_BEHAVIOUR
        self.error: str | None = None
        self.error_status = 400
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.head = False
        self.body_bytes = 0
        self.complete = False
        self.queued = False
        self.active = False
        self.delay_done = False
        self.timer = None
        self.started = False
        self.streaming = False           # /echo: response body streamed from the request body
        self.remaining = 0               # generated bytes still to send (size=N)
        self.pending: deque = deque()    # echo data not written yet
        self.pending_bytes = 0
        self.framing = "length"          # "length" | "chunked" | "close"
        self.status = None
        self.sent_bytes = 0
        self.t0 = time.monotonic()


class H1Protocol(_BaseProtocol):
    protocol_name = "HTTP/1.1"

    def __init__(self, app: HTTPApp):
        super().__init__(app)
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_H1Request] = deque()   # head is the request being answered
        self.cur: _H1Request | None = None        # request being parsed
        self.header_bytes = 0
        self.limit_error: tuple[int, str] | None = None
        self.stop_parsing = False
        self.upgrade_body_left = 0
        self._kicking = False
        self._kick_again = False

    # ---- connection events
    def data_received(self, data):
        if self.stop_parsing or self.closing:
            return
        self._feed(data)
        self._kick()

    def _feed(self, data) -> None:
        while data:
            if self.upgrade_body_left:
                # the body of an Upgrade request, which llhttp would skip (see below)
                n = min(self.upgrade_body_left, len(data))
                self.on_body(data[:n] if n < len(data) else data)
                self.upgrade_body_left -= n
                data = data[n:]
                if not self.upgrade_body_left:
                    self.on_message_complete()
                continue
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # llhttp treats "Connection: upgrade" + "Upgrade: x" requests as upgrades:
                # it completes the message without its body and stops. We never switch
                # protocols; the request is answered as plain HTTP/1.1. A Content-Length
                # body is read here; the position after a chunked one is unknown, so
                # that request is answered and the connection closed.
                data = data[exc.args[0]:]
                last = self.queue[-1] if self.queue else None
                if last is None or last.chunked:
                    if last is not None:
                        last.keep_alive = False
                    self.stop_parsing = True
                    return
                if last.content_length:
                    last.complete = False
                    self.cur = last
                    self.upgrade_body_left = last.content_length
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return

    def eof_received(self):
        # The client half-closed: answer what is queued, then close.
        if not self.queue or self.cur is not None:
            return False             # nothing to answer, or a request was cut short
        self.stop_parsing = True
        for req in self.queue:
            req.keep_alive = False
        return True

    def connection_lost(self, exc):
        super().connection_lost(exc)
        for req in self.queue:
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
        self.queue.clear()

    def resume_writing(self):
        self.write_paused = False
        self._kick()

    def shutdown(self):
        self._close()

    # ---- parser callbacks
    def on_message_begin(self):
        self.cur = _H1Request()
        self.header_bytes = 0

    def on_url(self, url: bytes):
        self.cur.url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes):
        req = self.cur
        self._count_header_bytes(len(name) + len(value) + 4)
        if len(req.headers) >= MAX_HEADER_COUNT:
            self.limit_error = (431, f"too many request headers (at most {MAX_HEADER_COUNT})")
            raise _ParseLimit()
        req.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def _count_header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            self.limit_error = (431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")
            raise _ParseLimit()

    def on_headers_complete(self):
        req = self.cur
        p = self.parser
        req.method = p.get_method().decode("ascii", "replace")
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        req.target = req.url.decode("latin-1")
        req.url = None
        req.path, req.query = split_target(req.target)
        for name, value in req.headers:
            if name == "content-length":
                try:
                    req.content_length = int(value)
                except ValueError:
                    pass
            elif name == "transfer-encoding":
                req.chunked = True
            elif name == "expect" and value.strip().lower() == "100-continue":
                req.expect_continue = True
        req.head = req.method == "HEAD"
        req.kind = route(req.path)
        if req.kind != HEALTHZ:
            try:
                req.behaviour = parse_behaviour(req.query, pod=self.app.pod)
            except BehaviourError as exc:
                req.error = str(exc)
        b = req.behaviour
        req.streaming = (req.kind == ECHO and req.error is None and not b.reset and not req.head
                         and b.status not in _NO_BODY_STATUSES)
        if req.streaming:
            if req.content_length is not None and not req.chunked:
                req.framing = "length"
            elif req.version == "1.1":
                req.framing = "chunked"
            else:
                req.framing = "close"
                req.keep_alive = False
        req.t0 = time.monotonic()
        req.queued = True
        self.queue.append(req)

    def on_body(self, body: bytes):
        req = self.cur
        n = len(body)
        req.body_bytes += n
        if req.streaming and n:
            if req.started and not req.pending and not self.write_paused and not self._gone():
                self._write_echo(req, body)
            else:
                req.pending.append(body)
                req.pending_bytes += n

    def on_message_complete(self):
        self.cur.complete = True
        self.cur = None

    # ---- parser trouble
    def _parse_error(self, exc: Exception) -> None:
        if self.limit_error is not None:
            status, message = self.limit_error
        elif isinstance(exc, httptools.HttpParserCallbackError):
            status, message = 500, "internal error while reading the request"
            traceback.print_exception(exc.__context__ or exc, file=sys.stderr)
        else:
            status, message = 400, f"malformed HTTP/1.1 request: {exc}"
        self.stop_parsing = True
        req = self.cur
        self.cur = None
        if req is not None and req.queued:
            if req.started:            # the response is already under way: nothing sane to say
                self._close()
                return
        else:
            req = _H1Request()
            req.queued = True
            self.queue.append(req)
        req.error, req.error_status = message, status
        req.streaming = False
        req.complete = True
        req.keep_alive = False
        req.behaviour = DEFAULT_BEHAVIOUR

    # ---- answering, strictly in request order
    def _kick(self) -> None:
        if self._kicking:
            self._kick_again = True
            return
        self._kicking = True
        try:
            again = True
            while again:
                self._kick_again = False
                while self.queue and not self.closing:
                    req = self.queue[0]
                    if not req.active:
                        self._activate(req)
                    self._advance(req)
                    if self.queue and self.queue[0] is req:
                        break                  # still in progress
                again = self._kick_again
        finally:
            self._kicking = False
        self._update_reading()

    def _update_reading(self) -> None:
        pause = (self.write_paused or len(self.queue) > 1 or self.stop_parsing
                 or (self.cur is not None and self.cur.pending_bytes > ECHO_BUFFER_LIMIT))
        self._set_reading(pause)

    def _activate(self, req: _H1Request) -> None:
        req.active = True
        if req.expect_continue and not req.complete and req.version == "1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        delay = req.behaviour.delay if req.error is None else 0.0
        if delay > 0:
            req.timer = self.loop.call_later(delay, self._delay_elapsed, req)
        else:
            req.delay_done = True

    def _delay_elapsed(self, req: _H1Request) -> None:
        req.timer = None
        req.delay_done = True
        self._kick()

    def _advance(self, req: _H1Request) -> None:
        if not req.started:
            if not req.delay_done:
                return
            b = req.behaviour
            if req.streaming:
                self._informational(req)
                self._write_head(req, b.status, "application/octet-stream",
                                 req.content_length if req.framing == "length" else None)
            else:
                if not req.complete:
                    return
                if req.error is None and b.reset:
                    req.status = "reset"
                    self._log(req)
                    self._reset_connection()
                    return
                body = None
                if req.error is not None:
                    status, ctype = req.error_status, "application/json"
                    body = error_body(self.app.pod, self.app.node, status, req.error)
                elif req.kind == HEALTHZ:
                    status, ctype, body = 200, "text/plain; charset=utf-8", b"ok"
                elif req.kind == ECHO:     # not streamed: HEAD, 204 or 304
                    status, ctype, body = b.status, "application/octet-stream", b""
                elif b.size is not None:
                    status, ctype = b.status, "application/octet-stream"
                else:
                    status, ctype = b.status, "application/json"
                    headers = join_headers(req.headers)
                    body = describe(pod=self.app.pod, node=self.app.node, protocol="HTTP/1.1",
                                    method=req.method, path=req.path, query=req.query,
                                    host=headers.get("host"), headers=headers, source=self.peer,
                                    destination=self.local, body_bytes=req.body_bytes)
                length = len(body) if body is not None else b.size
                if req.error is None:
                    self._informational(req)
                self._write_head(req, status, ctype, length)
                if req.head or status in _NO_BODY_STATUSES:
                    pass
                elif body is not None:
                    self.transport.write(body)
                    req.sent_bytes = len(body)
                else:
                    req.remaining = b.size
            req.started = True
        if req.streaming:
            while req.pending and not self.write_paused and not self._gone():
                data = req.pending.popleft()
                req.pending_bytes -= len(data)
                self._write_echo(req, data)
            if req.complete and not req.pending:
                if req.framing == "chunked":
                    self.transport.write(b"0\r\n\r\n")
                self._finish(req)
        else:
            if req.remaining:
                self._pump(req)
            if not req.remaining:
                self._finish(req)

    def _pump(self, req: _H1Request) -> None:
        write = self.transport.write
        while req.remaining and not self.write_paused and not self._gone():
            if req.remaining >= CHUNK:
                write(FILL)
                req.remaining -= CHUNK
                req.sent_bytes += CHUNK
            else:
                write(FILL_MV[:req.remaining])
                req.sent_bytes += req.remaining
                req.remaining = 0

    def _write_echo(self, req: _H1Request, data: bytes) -> None:
        if req.framing == "chunked":
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if len(data) < 16384
                                 else b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            self.transport.write(data)
        req.sent_bytes += len(data)

    def _informational(self, req: _H1Request) -> None:
        code = req.behaviour.informational
        if code is None or req.version != "1.1":
            return
        lines = [f"HTTP/1.1 {code} {reason(code)}\r\n"]
        lines.extend(f"{n}: {v}\r\n" for n, v in req.behaviour.headers)
        lines.append("\r\n")
        self.transport.write("".join(lines).encode("latin-1"))

    def _write_head(self, req: _H1Request, status: int, ctype: str, length: int | None) -> None:
        custom = req.behaviour.headers if req.error is None else ()
        lines = [f"HTTP/1.1 {status} {reason(status)}\r\n"]
        if not any(n.lower() == "content-type" for n, _ in custom):
            lines.append(f"content-type: {ctype}\r\n")
        if status in _NO_BODY_STATUSES:
            pass
        elif length is not None:
            lines.append(f"content-length: {length}\r\n")
        elif req.framing == "chunked":
            lines.append("transfer-encoding: chunked\r\n")
        lines.append(f"x-testapp-pod: {self.app.pod}\r\n")
        lines.extend(f"{n}: {v}\r\n" for n, v in custom)
        if not req.keep_alive:
            lines.append("connection: close\r\n")
        elif req.version == "1.0":
            lines.append("connection: keep-alive\r\n")
        lines.append("\r\n")
        self.transport.write("".join(lines).encode("latin-1"))
        req.status = status

    def _finish(self, req: _H1Request) -> None:
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        self.queue.popleft()
        self._log(req)
        if not req.keep_alive:
            self.stop_parsing = True
            self._close()

    def _log(self, req: _H1Request) -> None:
        if self.app.log_requests:
            self.app.log("HTTP/" + req.version, self.peer, req.method, req.target, req.status,
                         req.body_bytes, req.sent_bytes, req.t0)


# --------------------------------------------------------------------------- HTTP/2
class _H2Stream:
    __slots__ = (
        "sid", "method", "target", "path", "query", "authority", "headers", "kind", "behaviour",
        "error", "head", "content_length", "body_bytes", "complete", "delay_done", "timer",
        "started", "streaming", "body", "body_pos", "remaining", "pending", "status",
        "sent_bytes", "t0", "closed",
    )

    def __init__(self, sid: int):
        self.sid = sid
        self.method = "-"
        self.target = "-"
        self.path = ""
        self.query = ""
        self.authority = None
        self.headers: list[tuple[str, str]] = []
        self.kind = None
        self.behaviour: Behaviour = DEFAULT_BEHAVIOUR
        self.error: str | None = None
        self.head = False
        self.content_length: int | None = None
        self.body_bytes = 0
        self.complete = False
        self.delay_done = False
        self.timer = None
        self.started = False
        self.streaming = False
        self.body: memoryview | None = None   # a fixed body still being sent
        self.body_pos = 0
        self.remaining = 0                    # generated bytes still to send
        self.pending: deque = deque()         # echo: [data, flow_controlled_length, offset]
        self.status = None
        self.sent_bytes = 0
        self.t0 = time.monotonic()
        self.closed = False


class H2Protocol(_BaseProtocol):
    protocol_name = "HTTP/2"

    def __init__(self, app: HTTPApp):
        super().__init__(app)
        self.conn = h2.connection.H2Connection(config=_H2_CONFIG)
        self.streams: dict[int, _H2Stream] = {}
        self._in_events = False       # handling received frames: batch the writes
        self._unflushed = 0
        self._dispatch = {
            h2.events.RequestReceived: self._on_request,
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.RemoteSettingsChanged: self._on_settings,
            h2.events.ConnectionTerminated: self._on_terminated,
        }

    def connection_made(self, transport):
        super().connection_made(transport)
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings({
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: H2_MAX_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES,
        })
        conn.increment_flow_control_window(H2_CONN_WINDOW - H2_DEFAULT_WINDOW)
        self._flush()

    def data_received(self, data):
        if self.closing:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self._close()
            return
        dispatch = self._dispatch
        self._in_events = True
        try:
            for ev in events:
                handler = dispatch.get(type(ev))
                if handler is not None:
                    handler(ev)
        finally:
            self._in_events = False
        self._flush()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        super().connection_lost(exc)
        for s in self.streams.values():
            s.closed = True
            if s.timer is not None:
                s.timer.cancel()
                s.timer = None
        self.streams.clear()

    def resume_writing(self):
        self.write_paused = False
        self._pump_all()
        self._flush()
        self._update_reading()

    def shutdown(self):
        if not self.closing:
            try:
                self.conn.close_connection()
                self._flush()
            except h2.exceptions.ProtocolError:
                pass
            self._close()

    def _flush(self) -> None:
        self._unflushed = 0
        data = self.conn.data_to_send()
        if data and not self._gone():
            self.transport.write(data)

    def _flush_soon(self, n: int) -> None:
        """After queueing n body bytes: write now unless we are inside a batch of received
        events and little is queued (one write per batch instead of one per response)."""
        self._unflushed += n
        if not self._in_events or self._unflushed >= H2_FLUSH_BYTES:
            self._flush()

    # ---- events
    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        s = _H2Stream(ev.stream_id)
        path = b"/"
        for name, value in ev.headers:
            if name[:1] == b":":
                if name == b":method":
                    s.method = value.decode("ascii", "replace")
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    s.authority = value.decode("latin-1")
            else:
                n, v = name.decode("latin-1"), value.decode("latin-1")
                s.headers.append((n, v))
                if n == "content-length":
                    try:
                        s.content_length = int(v)
                    except ValueError:
                        pass
                elif n == "host" and s.authority is None:
                    s.authority = v
        s.target = path.decode("latin-1")
        s.path, s.query = split_target(s.target)
        s.head = s.method == "HEAD"
        s.kind = route(s.path)
        if s.kind != HEALTHZ:
            try:
                s.behaviour = parse_behaviour(s.query, pod=self.app.pod)
            except BehaviourError as exc:
                s.error = str(exc)
        b = s.behaviour
        s.streaming = (s.kind == ECHO and s.error is None and not b.reset and not s.head
                       and b.status not in _NO_BODY_STATUSES)
        self.streams[s.sid] = s
        delay = b.delay if s.error is None else 0.0
        if delay > 0:
            s.timer = self.loop.call_later(delay, self._delay_elapsed, s)
        else:
            s.delay_done = True
        self._advance(s)

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        s = self.streams.get(ev.stream_id)
        data = ev.data
        if s is None or s.closed or not s.streaming or not data:
            if ev.flow_controlled_length:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if s is not None:
                s.body_bytes += len(data)
            return
        s.body_bytes += len(data)
        s.pending.append([data, ev.flow_controlled_length, 0])
        if s.started:
            self._pump(s)

    def _on_stream_ended(self, ev: h2.events.StreamEnded) -> None:
        s = self.streams.get(ev.stream_id)
        if s is not None:
            s.complete = True
            self._advance(s)

    def _on_stream_reset(self, ev: h2.events.StreamReset) -> None:
        s = self.streams.get(ev.stream_id)
        if s is not None:
            if s.status is None:
                s.status = "client-reset"
            self._done(s)

    def _on_window_updated(self, ev: h2.events.WindowUpdated) -> None:
        if ev.stream_id == 0:
            self._pump_all()
        else:
            s = self.streams.get(ev.stream_id)
            if s is not None and s.started:
                self._pump(s)

    def _on_settings(self, ev) -> None:
        self._pump_all()

    def _on_terminated(self, ev) -> None:
        self._flush()
        self._close()

    def _delay_elapsed(self, s: _H2Stream) -> None:
        s.timer = None
        s.delay_done = True
        if not s.closed and not self.closing:
            self._advance(s)
            self._flush()

    # ---- answering
    def _headers(self, s: _H2Stream, status: int, ctype: str, length: int | None) -> list:
        custom = s.behaviour.headers if s.error is None else ()
        hdrs = [(":status", str(status))]
        if not any(n.lower() == "content-type" for n, _ in custom):
            hdrs.append(("content-type", ctype))
        if length is not None and status not in _NO_BODY_STATUSES:
            hdrs.append(("content-length", str(length)))
        hdrs.append(("x-testapp-pod", self.app.pod))
        hdrs.extend((n.lower(), v) for n, v in custom)
        s.status = status
        return hdrs

    def _informational(self, s: _H2Stream) -> None:
        code = s.behaviour.informational
        if code is not None:
            self.conn.send_headers(s.sid, [(":status", str(code))]
                                   + [(n.lower(), v) for n, v in s.behaviour.headers])

    def _advance(self, s: _H2Stream) -> None:
        if s.closed or self.closing:
            return
        try:
            if not s.started:
                if not s.delay_done:
                    return
                b = s.behaviour
                if s.streaming:
                    self._informational(s)
                    self.conn.send_headers(s.sid, self._headers(
                        s, b.status, "application/octet-stream", s.content_length))
                    s.started = True
                else:
                    if not s.complete:
                        return
                    if s.error is None and b.reset:
                        s.status = "reset"
                        self.conn.reset_stream(s.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
                        self._done(s)
                        return
                    body = None
                    if s.error is not None:
                        status, ctype = 400, "application/json"
                        body = error_body(self.app.pod, self.app.node, 400, s.error)
                    elif s.kind == HEALTHZ:
                        status, ctype, body = 200, "text/plain; charset=utf-8", b"ok"
                    elif s.kind == ECHO:   # not streamed: HEAD, 204 or 304
                        status, ctype, body = b.status, "application/octet-stream", b""
                    elif b.size is not None:
                        status, ctype = b.status, "application/octet-stream"
                    else:
                        status, ctype = b.status, "application/json"
                        body = describe(pod=self.app.pod, node=self.app.node, protocol="HTTP/2",
                                        method=s.method, path=s.path, query=s.query,
                                        host=s.authority, headers=join_headers(s.headers),
                                        source=self.peer, destination=self.local,
                                        body_bytes=s.body_bytes)
                    length = len(body) if body is not None else b.size
                    if s.error is None:
                        self._informational(s)
                    no_body = s.head or status in _NO_BODY_STATUSES or not length
                    self.conn.send_headers(s.sid, self._headers(s, status, ctype, length),
                                           end_stream=no_body)
                    s.started = True
                    if no_body:
                        self._done(s)
                        return
                    if body is not None:
                        s.body = memoryview(body)
                    else:
                        s.remaining = b.size
            self._pump(s)
        except h2.exceptions.ProtocolError:
            self._done(s)

    def _pump_all(self) -> None:
        for s in list(self.streams.values()):
            if s.started and not self.write_paused:
                self._pump(s)

    def _pump(self, s: _H2Stream) -> None:
        conn = self.conn
        sid = s.sid
        try:
            while not self.write_paused and not self._gone():
                if s.body is not None:
                    avail = len(s.body) - s.body_pos
                elif s.remaining:
                    avail = s.remaining
                elif s.pending:
                    item = s.pending[0]
                    avail = len(item[0]) - item[2]
                else:
                    break
                n = min(avail, conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if n <= 0:
                    break
                if s.body is not None:
                    data = s.body[s.body_pos:s.body_pos + n]
                    s.body_pos += n
                    last = s.body_pos >= len(s.body)
                    if last:
                        s.body = None
                elif s.remaining:
                    data = FILL_MV[:n]
                    s.remaining -= n
                    last = not s.remaining
                else:
                    data = item[0] if n == len(item[0]) else memoryview(item[0])[item[2]:item[2] + n]
                    item[2] += n
                    if item[2] >= len(item[0]):
                        s.pending.popleft()
                        if item[1]:
                            conn.acknowledge_received_data(item[1], sid)
                    last = s.complete and not s.pending
                conn.send_data(sid, data, end_stream=last)
                s.sent_bytes += n
                self._flush_soon(n)
                if last:
                    self._done(s)
                    return
            if (s.body is None and not s.remaining and not s.pending
                    and (not s.streaming or s.complete)):
                conn.end_stream(sid)
                self._flush_soon(0)
                self._done(s)
        except h2.exceptions.ProtocolError:
            self._done(s)

    def _done(self, s: _H2Stream) -> None:
        if s.closed:
            return
        s.closed = True
        self.streams.pop(s.sid, None)
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        if s.pending:
            # hand back the window of echo data we will never send
            flow = sum(item[1] for item in s.pending)
            s.pending.clear()
            if flow and not self.closing:
                try:
                    self.conn.acknowledge_received_data(flow, s.sid)
                except h2.exceptions.ProtocolError:
                    pass
        if self.app.log_requests:
            self.app.log("HTTP/2", self.peer, s.method, s.target, s.status, s.body_bytes,
                         s.sent_bytes, s.t0)
