"""The agent's admin HTTP endpoint (127.0.0.1:15000 by default).

Two layers, as everywhere in the agent:

* `AdminDispatcher.dispatch(method, path, query) -> Response` is plain code with no I/O:
  it routes a request to the `AdminInputs` callables and renders the answer. Actions that
  must happen *after* the answer is on the wire (``POST /drain``, ``POST /quitquitquit``)
  are returned as ``Response.after`` instead of being run.
* `AdminServer` is the asyncio transport layer (works under uvloop and plain asyncio):
  HTTP/1.1 parsed with httptools, keep-alive and pipelining, and a safe default for every
  limit a client could push (`AdminLimits`): request head size and header count (431),
  body size (413), time to read a request (408 / close), idle keep-alive time, stalled
  writes, concurrent connections (503). Malformed requests get 400 and the connection is
  closed. Closing always half-closes first and drains what the client still sends, so a
  client that is told 4xx actually reads it instead of a connection reset.

Paths (JSON unless noted; mutations are POST only):
``GET /`` (index), ``/healthz`` (text), ``/ready`` (text; 503 + reason), ``/stats/prometheus``
and ``/metrics`` (Prometheus text format 0.0.4), ``/config_dump``, ``/clusters``,
``/listeners``, ``/routes``, ``/certs``, ``/policies``, ``/capture``, ``/server_info``;
``POST /logging?level=debug|info|warning|error``, ``POST /drain``, ``POST /quitquitquit``.
HEAD works on every GET path.

Two browser-facing safeguards, because a web page can make a browser talk to 127.0.0.1:
a POST that carries an ``Origin`` header (only browsers send one) is refused with 403, and
while the endpoint listens on loopback only, a ``Host`` that is neither an IP literal nor
``localhost`` (the mark of DNS rebinding) is refused with 403. JSON answers never carry
PEM private keys: any that a callable returns by mistake is replaced by a marker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import gzip
import inspect
import ipaddress
import json
import logging
import os
import re
import socket
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import httptools
import prometheus_client
from prometheus_client.exposition import generate_latest

from nodeagent.errors import ProxyError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 15000
LOG_LEVELS = ("debug", "info", "warning", "error")
# the classic text format; prometheus_client >= 0.22 makes CONTENT_TYPE_LATEST 1.0.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
GZIP_MIN_BYTES = 1024

Action = Callable[[], "Awaitable[None] | None"]


@dataclass
class AdminInputs:
    """Everything the admin endpoint shows or does, passed in by the agent."""

    registry: prometheus_client.CollectorRegistry
    server_info: Callable[[], dict]  # version, node, uptime, state (LIVE/DRAINING), capture mode, ...
    readiness: Callable[[], tuple[bool, str]]  # (ready, reason)
    config_dump: Callable[[], dict]
    listeners: Callable[[], list | dict]
    clusters: Callable[[], list | dict]
    routes: Callable[[], list | dict]
    certs: Callable[[], list | dict]  # identities, serials, expiry: never key material
    capture: Callable[[], dict]
    drain: Action  # POST /drain, run after the response is sent
    quit: Action  # POST /quitquitquit, run after the response is sent
    set_log_level: Callable[[str], None]  # raises ValueError on a bad level
    policies: Callable[[], list | dict] = lambda: []  # AuthorizationPolicies in force per local workload


@dataclass(frozen=True)
class AdminLimits:
    """Safe defaults for everything a client of the admin endpoint could push."""

    max_header_bytes: int = 16 * 1024  # request line + headers; 431 beyond
    max_headers: int = 100  # 431 beyond
    max_body_bytes: int = 1024 * 1024  # 413 beyond (no admin path reads a body)
    header_timeout: float = 10.0  # accept / first byte of a request -> request fully read
    keepalive_timeout: float = 60.0  # idle keep-alive connection; also a write stalled this long
    max_connections: int = 32  # concurrent admin connections; 503 beyond
    max_pipelined: int = 16  # queued requests per connection before reading pauses
    linger_timeout: float = 2.0  # after our FIN, how long to drain the client before abort


@dataclass
class Response:
    """What the dispatcher answers; the transport adds framing headers (length, date, ...)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # run by the transport once the response has been written (POST /drain, /quitquitquit)
    after: Action | None = None
    # the connection is closed after this response
    close: bool = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


# ---------------------------------------------------------------------------------------
# rendering helpers (pure)

_PRIVATE_KEY_IN_JSON = re.compile(r'-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:[^"\\]|\\.)*')


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return f"<{len(obj)} bytes>"  # never raw bytes: they could be key material
    return str(obj)  # ip addresses, paths, ...


def json_response(status: int, obj: Any, **kw: Any) -> Response:
    text = json.dumps(obj, indent=2, default=_json_default)
    text = _PRIVATE_KEY_IN_JSON.sub("[REDACTED PRIVATE KEY]", text)
    return Response(status, [("Content-Type", JSON_CONTENT_TYPE)], (text + "\n").encode(), **kw)


def text_response(status: int, text: str, **kw: Any) -> Response:
    if not text.endswith("\n"):
        text += "\n"
    return Response(status, [("Content-Type", TEXT_CONTENT_TYPE)], text.encode(), **kw)


def error_response(status: int, message: str, **extra: Any) -> Response:
    return json_response(status, {"error": message, **extra})


def _accepts_gzip(accept_encoding: str) -> bool:
    for part in accept_encoding.split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def maybe_gzip(resp: Response, accept_encoding: str | None) -> Response:
    """Gzip a sizeable 200 when the client accepts it (Prometheus does)."""
    if resp.status != 200 or len(resp.body) < GZIP_MIN_BYTES or resp.header("content-encoding"):
        return resp
    if not accept_encoding or not _accepts_gzip(accept_encoding):
        return resp
    body = gzip.compress(resp.body, compresslevel=5)
    headers = resp.headers + [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")]
    return dataclasses.replace(resp, headers=headers, body=body)


def render_response(resp: Response, *, head_only: bool = False, keep_alive: bool = True,
                    http10: bool = False) -> bytes:
    """Serialize a response: status line, headers, framing, body (none for HEAD)."""
    try:
        reason = HTTPStatus(resp.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {resp.status} {reason}"]
    lines.extend(f"{k}: {v}" for k, v in resp.headers)
    lines.append(f"Content-Length: {len(resp.body)}")
    lines.append("Date: " + formatdate(usegmt=True))
    lines.append("Cache-Control: no-store")
    lines.append("X-Content-Type-Options: nosniff")
    if not keep_alive:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


def _host_is_local(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):  # [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def screen_request(method: str, headers: dict[str, str], loopback_only: bool) -> Response | None:
    """Refuse what only a browser driven by some web page would send; None = go ahead."""
    if method not in ("GET", "HEAD") and "origin" in headers:
        return error_response(403, "admin mutations are refused from browsers (Origin header present)")
    host = headers.get("host")
    if loopback_only and host and not _host_is_local(host):
        return error_response(403, f"Host {host!r} is not allowed on the loopback admin endpoint")
    return None


# ---------------------------------------------------------------------------------------
# the dispatcher (pure: no sockets, no event loop)

@dataclass(frozen=True)
class Route:
    method: str  # "GET" (HEAD included) or "POST"
    handler: Callable[[str], Response]
    description: str


class RouteTable:
    """Path -> handler dispatch with 404 (listing the paths), 405 + Allow, and 500 on a
    handler's exception; never raises. Shared by every HTTP endpoint hostmesh serves."""

    def __init__(self, routes: dict[str, Route], name: str = "admin endpoint"):
        self.routes = routes
        self.name = name

    def paths(self) -> list[dict[str, str]]:
        return [{"path": p, "method": r.method, "description": r.description}
                for p, r in self.routes.items()]

    def dispatch(self, method: str, path: str, query: str = "") -> Response:
        method = method.upper()
        route = self.routes.get(path)
        if route is None:
            return error_response(404, "not found", path=path,
                                  paths=[f"{r.method} {p}" for p, r in self.routes.items()])
        allowed = ("GET", "HEAD") if route.method == "GET" else ("POST",)
        if method not in allowed:
            resp = error_response(405, f"{method} not allowed on {path}; use {route.method}",
                                  allow=list(allowed))
            resp.headers.append(("Allow", ", ".join(allowed)))
            return resp
        try:
            return route.handler(query)
        except Exception as exc:  # a callable behind the endpoint failed: report, keep serving
            log.exception("%s: %s %s failed", self.name, method, path)
            detail = f"{type(exc).__name__}: {exc}"
            return error_response(500, "internal error", path=path, detail=detail[:300])


def metrics_response(registry: prometheus_client.CollectorRegistry) -> Response:
    return Response(200, [("Content-Type", METRICS_CONTENT_TYPE)], generate_latest(registry))


#: what the read-only health endpoint serves (probes and Prometheus; no views, no POSTs)
HEALTH_PATHS = ("/", "/healthz", "/ready", "/stats/prometheus", "/metrics")


class AdminDispatcher:
    """Routes (method, path, query) to the `AdminInputs`; never raises. ``only``: serve just
    these paths (the health endpoint)."""

    def __init__(self, inputs: AdminInputs, only: tuple[str, ...] | None = None):
        self.inputs = inputs
        i = inputs
        self._table = RouteTable({
            "/": Route("GET", self._index, "this index"),
            "/healthz": Route("GET", lambda q: text_response(200, "ok"), "liveness: 200 ok"),
            "/ready": Route("GET", self._ready, "readiness: 200, or 503 with the reason"),
            "/stats/prometheus": Route("GET", self._metrics, "Prometheus metrics (text format)"),
            "/metrics": Route("GET", self._metrics, "alias of /stats/prometheus"),
            "/config_dump": Route("GET", self._json_view(i, "config_dump"), "the config in force"),
            "/clusters": Route("GET", self._json_view(i, "clusters"), "clusters and endpoints"),
            "/listeners": Route("GET", self._json_view(i, "listeners"), "listeners"),
            "/routes": Route("GET", self._json_view(i, "routes"), "routes"),
            "/certs": Route("GET", self._json_view(i, "certs"), "identities, serials, expiry"),
            "/policies": Route("GET", self._json_view(i, "policies"), "AuthorizationPolicies per local workload"),
            "/capture": Route("GET", self._json_view(i, "capture"), "traffic capture state"),
            "/server_info": Route("GET", self._json_view(i, "server_info"), "version, node, state"),
            "/logging": Route("POST", self._logging, "set the log level: ?level=" + "|".join(LOG_LEVELS)),
            "/drain": Route("POST", self._drain, "stop accepting new connections, finish the rest"),
            "/quitquitquit": Route("POST", self._quit, "shut the agent down"),
        })
        if only is not None:
            self._table.routes = {p: r for p, r in self._table.routes.items() if p in only}

    def paths(self) -> list[dict[str, str]]:
        return self._table.paths()

    def dispatch(self, method: str, path: str, query: str = "") -> Response:
        return self._table.dispatch(method, path, query)

    # -- handlers --------------------------------------------------------------------

    def _index(self, query: str) -> Response:
        return json_response(200, {"paths": self.paths()})

    def _ready(self, query: str) -> Response:
        ready, reason = self.inputs.readiness()
        if ready:
            return text_response(200, str(reason) or "ready")
        return text_response(503, str(reason) or "not ready")

    def _metrics(self, query: str) -> Response:
        return metrics_response(self.inputs.registry)

    @staticmethod
    def _json_view(inputs: AdminInputs, name: str) -> Callable[[str], Response]:
        def view(query: str) -> Response:
            return json_response(200, getattr(inputs, name)())
        return view

    def _logging(self, query: str) -> Response:
        valid = ", ".join(LOG_LEVELS)
        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=16)
        except ValueError:
            return error_response(400, "too many query parameters")
        levels = params.get("level", [])
        if len(levels) != 1:
            return error_response(400, f"give exactly one level: POST /logging?level=<{'|'.join(LOG_LEVELS)}>",
                                  valid_levels=list(LOG_LEVELS))
        level = levels[0].strip().lower()
        if level not in LOG_LEVELS:
            return error_response(400, f"unknown log level {levels[0]!r}; valid levels: {valid}",
                                  valid_levels=list(LOG_LEVELS))
        try:
            self.inputs.set_log_level(level)
        except ValueError as exc:
            message = str(exc) if "valid levels" in str(exc) else f"{exc}; valid levels: {valid}"
            return error_response(400, message, valid_levels=list(LOG_LEVELS))
        log.info("admin endpoint: log level set to %s", level)
        return json_response(200, {"status": "ok", "level": level})

    def _drain(self, query: str) -> Response:
        return json_response(200, {"status": "draining"}, after=self.inputs.drain)

    def _quit(self, query: str) -> Response:
        return json_response(200, {"status": "quitting"}, after=self.inputs.quit)


# ---------------------------------------------------------------------------------------
# the transport layer

class _Reject(Exception):
    """Raised from a parser callback to stop parsing and answer with `response`."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


@dataclass
class _Request:
    method: str
    url: bytes
    headers: dict[str, str]
    keep_alive: bool
    http10: bool


class _AdminConnection(asyncio.Protocol):
    """One admin connection: httptools callbacks -> queued requests -> dispatcher -> writes."""

    def __init__(self, server: AdminServer):
        self._server = server
        self._limits = server.limits
        self._loop = server._loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Request | Response] = deque()
        self._peer = "?"
        self._accepted = False
        # request being read
        self._in_message = False
        self._in_head = False
        self._msg_seq = 0
        self._url: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._nheaders = 0
        self._head_bytes = 0  # counted in callbacks: url + complete headers
        self._raw_head_bytes = 0  # whole reads that arrived while still in the head
        self._body_bytes = 0
        self._reject: _Reject | None = None
        # connection state
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind: str | None = None  # "header", "idle" or "linger"
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._read_paused = False
        self._stopped = False  # no more requests are read
        self._close_when_done = False
        self._closing = False
        self._lost = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop: not an asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}"
        self._accepted = self._server._register(self)
        if not self._accepted:
            self._server._log_refusal(self._peer)
            self._stopped = True
            self._queue.append(error_response(503, "too many admin connections", close=True))
            self._process()
            return
        self._set_timer("header", self._limits.header_timeout, self._on_header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return  # lingering close or end of input: discard
        seq, was_in_head = self._msg_seq, self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # we switch to no other protocol: answer what was asked, then close
            self._stopped = True
            if self._queue and isinstance(self._queue[-1], _Request):
                self._queue[-1].keep_alive = False
            else:
                self._queue.append(error_response(400, "protocol upgrade not supported", close=True))
        except httptools.HttpParserError as exc:
            self._stopped = True
            if self._reject is not None:
                resp = self._reject.response
            else:
                log.debug("admin endpoint: malformed request from %s: %s", self._peer, exc)
                resp = error_response(400, f"malformed request: {exc}")
            resp.close = True
            self._queue.append(resp)
        else:
            if self._in_head and was_in_head and seq == self._msg_seq:
                # this whole read is part of one request head (e.g. a header value growing
                # without end, which httptools buffers before calling on_header)
                self._raw_head_bytes += len(data)
                if self._raw_head_bytes > self._limits.max_header_bytes:
                    self._stopped = True
                    self._queue.append(self._too_large_head())
        self._process()
        if (not self._stopped and not self._read_paused
                and len(self._queue) >= self._limits.max_pipelined):
            self._pause_reading()

    def eof_received(self) -> bool:
        if self._closing or not self._queue:
            return False  # the transport closes itself
        self._stopped = True
        self._close_when_done = True
        return True  # keep writing the queued answers

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self._limits.keepalive_timeout,
                                                      self._on_write_stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._closing = self._stopped = True
        self._cancel_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._queue.clear()
        self._server._unregister(self, self._accepted)

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = self._in_head = True
        self._msg_seq += 1
        self._url = []
        self._headers = {}
        self._nheaders = 0
        self._head_bytes = self._raw_head_bytes = self._body_bytes = 0
        if self._timer_kind != "header":
            self._set_timer("header", self._limits.header_timeout, self._on_header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._count_head(len(url) + 16)  # + method, version, CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        self._nheaders += 1
        if self._nheaders > self._limits.max_headers:
            self._fail(_Reject(error_response(431, f"more than {self._limits.max_headers} request headers")))
        self._count_head(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1").strip()
        if key in self._headers:
            val = self._headers[key] + ", " + val
        self._headers[key] = val

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = self._headers.get("content-length", "")
        if length.isdigit() and int(length) > self._limits.max_body_bytes:
            self._fail(_Reject(error_response(
                413, f"request body larger than {self._limits.max_body_bytes} bytes")))
        if (self._headers.get("expect", "").lower() == "100-continue" and not self._queue
                and not self._write_paused and self._transport is not None):
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)  # no admin path reads a body: count, don't keep
        if self._body_bytes > self._limits.max_body_bytes:
            self._fail(_Reject(error_response(
                413, f"request body larger than {self._limits.max_body_bytes} bytes")))

    def on_message_complete(self) -> None:
        self._in_message = self._in_head = False
        if self._timer_kind == "header":
            self._cancel_timer()
        self._queue.append(_Request(
            method=self._parser.get_method().decode("ascii", "replace"),
            url=b"".join(self._url),
            headers=self._headers,
            keep_alive=self._parser.should_keep_alive(),
            http10=self._parser.get_http_version() == "1.0",
        ))

    # -- internals -------------------------------------------------------------------

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._limits.max_header_bytes:
            self._fail(_Reject(self._too_large_head()))

    def _too_large_head(self) -> Response:
        return error_response(431, f"request line and headers larger than {self._limits.max_header_bytes} bytes",
                              close=True)

    def _fail(self, reject: _Reject) -> None:
        self._reject = reject
        raise reject

    def _set_timer(self, kind: str, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, callback)
        self._timer_kind = kind

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_kind = None

    def _on_header_timeout(self) -> None:
        self._timer = self._timer_kind = None
        if self._closing:
            return
        if self._in_message and not self._write_paused:
            log.info("admin endpoint: %s did not send a request within %.1fs, closing",
                     self._peer, self._limits.header_timeout)
            self._stopped = True
            self._queue.append(error_response(408, "request not received in time", close=True))
            self._process()
        else:  # never started a request: just hang up
            self._hang_up()

    def _on_idle_timeout(self) -> None:
        self._timer = self._timer_kind = None
        if not self._closing:
            self._hang_up()

    def _on_linger_timeout(self) -> None:
        self._timer = self._timer_kind = None
        if self._transport is not None:
            self._transport.abort()

    def _on_write_stalled(self) -> None:
        self._write_timer = None
        log.info("admin endpoint: %s stopped reading its responses, aborting", self._peer)
        if self._transport is not None:
            self._transport.abort()

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
            self._read_paused = True

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
        self._read_paused = False

    def _hang_up(self) -> None:
        self._closing = self._stopped = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()

    def _close_gracefully(self) -> None:
        """Half-close after our last bytes, then drain the client for a while: closing with
        unread input would make the kernel send RST and the client lose our answer."""
        self._closing = self._stopped = True
        self._queue.clear()
        t = self._transport
        if t is None or t.is_closing():
            return
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self._resume_reading()
        self._set_timer("linger", self._limits.linger_timeout, self._on_linger_timeout)

    def _process(self) -> None:
        t = self._transport
        wrote = False
        while self._queue and not self._write_paused and not self._closing:
            item = self._queue.popleft()
            if isinstance(item, Response):
                resp, head_only, keep, http10 = item, False, False, False
            else:
                resp = self._answer(item)
                head_only, http10 = item.method == "HEAD", item.http10
                keep = item.keep_alive and not resp.close
            assert t is not None
            t.write(render_response(resp, head_only=head_only, keep_alive=keep, http10=http10))
            wrote = True
            if resp.after is not None:
                self._server._spawn(self._run_after(resp.after))
            if not keep:
                self._close_gracefully()
                return
        if self._closing:
            return
        if not self._queue and self._close_when_done:
            self._hang_up()
            return
        if self._read_paused and not self._stopped and not self._write_paused \
                and len(self._queue) < self._limits.max_pipelined:
            self._resume_reading()
        if wrote and not self._queue and not self._in_message and not self._stopped:
            # the connection turned idle (re-armed only by answering, never by stray bytes)
            self._set_timer("idle", self._limits.keepalive_timeout, self._on_idle_timeout)

    def _answer(self, req: _Request) -> Response:
        try:
            url = httptools.parse_url(req.url)
        except httptools.HttpParserInvalidURLError:
            return error_response(400, "malformed request target", close=True)
        path = (url.path or b"/").decode("utf-8", "replace")
        query = (url.query or b"").decode("utf-8", "replace")
        resp = screen_request(req.method, req.headers, self._server.loopback_only)
        if resp is None:
            resp = self._server.dispatcher.dispatch(req.method, path, query)
        resp = maybe_gzip(resp, req.headers.get("accept-encoding"))
        level = logging.INFO if req.method not in ("GET", "HEAD") or resp.status >= 500 else logging.DEBUG
        log.log(level, "admin endpoint: %s %s %s -> %d", self._peer, req.method, path, resp.status)
        return resp

    async def _run_after(self, action: Action) -> None:
        # let the response reach the socket before the action takes effect
        t = self._transport
        for _ in range(100):
            if t is None or t.is_closing() or self._lost or t.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        try:
            result = action()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("admin endpoint: follow-up action %r failed", getattr(action, "__name__", action))

    def shutdown(self) -> None:
        """Server is closing: finish what is written, then close."""
        if self._transport is not None and not self._closing:
            self._closing = self._stopped = True
            self._cancel_timer()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class AdminServer:
    """The admin HTTP endpoint: `await start()`, `await close()`."""

    def __init__(self, inputs: AdminInputs | None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 *, limits: AdminLimits | None = None, dispatcher: Any = None, name: str = "admin endpoint"):
        """Serves `AdminDispatcher(inputs)`, or any `dispatcher` with the same `dispatch()`."""
        self.inputs = inputs
        self.dispatcher = dispatcher if dispatcher is not None else AdminDispatcher(inputs)
        self.name = name
        self.host = host
        self.port = port
        self.limits = limits or AdminLimits()
        self.loopback_only = _is_loopback(host)
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_AdminConnection] = set()
        self._active = 0
        self._accepting = False
        self._refused = 0
        self._refusal_logged_at = float("-inf")
        self._tasks: set[asyncio.Task] = set()
        self._bound_port: int | None = None

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (useful with port 0); None before start()."""
        return self._bound_port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._bound_port or self.port}"

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen, or accept on ``sock`` (handed over by the previous agent)."""
        if self._server is not None:
            raise RuntimeError(f"{self.name} already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        try:
            if sock is not None:
                self._server = await self._loop.create_server(lambda: _AdminConnection(self), sock=sock, backlog=64)
            else:
                self._server = await self._loop.create_server(
                    lambda: _AdminConnection(self), self.host, self.port,
                    reuse_address=True, reuse_port=False, backlog=64)
        except OSError as exc:
            self._accepting = False
            raise ProxyError(f"{self.name}: cannot listen on {self.address}: {_os_reason(exc)}") from exc
        sockets = self._server.sockets or ()
        self._bound_port = sockets[0].getsockname()[1] if sockets else self.port
        log.info("%s listening on %s", self.name, self.address)

    @property
    def listening_socket(self) -> socket.socket | None:
        sockets = self._server.sockets if self._server is not None else ()
        return sockets[0] if sockets else None

    def stop_accepting(self) -> None:
        """Close the listening socket only (a successor accepts on its copy); requests in
        flight finish, and ``close`` still does the rest."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening, let open connections flush, then close them. Follow-up actions
        already scheduled (drain, quit) are left to finish: quit may well be what calls this."""
        server, self._server = self._server, None
        if server is None:
            return
        self._accepting = False
        server.close()
        for conn in list(self._connections):
            conn.shutdown()
        await server.wait_closed()
        for _ in range(100):
            if not self._connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.abort()
        log.info("%s on %s closed", self.name, self.address)

    # -- used by the connections -----------------------------------------------------

    def _register(self, conn: _AdminConnection) -> bool:
        self._connections.add(conn)
        if not self._accepting or self._active >= self.limits.max_connections:
            return False
        self._active += 1
        return True

    def _unregister(self, conn: _AdminConnection, accepted: bool) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            if accepted:
                self._active -= 1

    def _log_refusal(self, peer: str) -> None:
        now = self._loop.time() if self._loop is not None else 0.0
        self._refused += 1
        if now - self._refusal_logged_at >= 10.0:  # a flood must not flood the log too
            log.warning("admin endpoint: refusing %s: already %d connections (%d refused in all)",
                        peer, self.limits.max_connections, self._refused)
            self._refusal_logged_at = now

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror) and exc.strerror:
        reason = exc.strerror
    elif exc.errno and exc.errno > 0:
        reason = os.strerror(exc.errno)
    else:
        reason = str(exc)
    return reason[:1].lower() + reason[1:]
