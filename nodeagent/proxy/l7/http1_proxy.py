"""The asyncio driver of HTTP/1.1 proxying: one client connection, routed request by request.

Wiring (what the listener does after protocol detection said HTTP/1)::

    inputs = L7Inputs.create(node, HttpMetrics(registry), limits=L7Limits(...),
                             connector=tcp_connector)            # once per proxy
    ctx = ConnContext.for_connection(inputs, snapshot, src_ip=peer_ip, dst_ip=dst_ip,
                                     dst_port=dst_port, reporter="source",
                                     on_done=lambda drv: listener.relay_done(relay))
    # inbound / a workload address: ConnContext.for_connection(..., endpoint=Endpoint(...))
    driver = serve_http1(transport, detected.data, ctx, inputs)
    ...drain deadline / shutdown: driver.abort("drain"); graceful: driver.drain()

``serve_http1`` takes the accepted transport over (``transport.set_protocol``), resumes
reading, feeds the bytes detection already read, and returns the ``Http1Proxy``
protocol. ``ctx.on_done(driver)`` is called exactly once, after the client connection
is closed and no upstream exchange of it is in flight (mirrors never delay it): that is
where the listener stops counting the connection (the transport's protocol is replaced,
so ``Relay.connection_lost`` no longer runs: TCP-level metrics of the connection are the
caller's to record; ``driver.rx`` / ``driver.tx`` count the bytes read from / written to
the client for them). Nothing else is reported back; the request metrics go to
``inputs.metrics``. ``drain()`` closes an idle connection now and a busy one after its
response (``connection: close``); an upgraded (WebSocket) connection runs until
``abort()``. ``listen_http1`` (end of this module) is the same driver behind a plain
listener, for tests and ``bench/l7.py``.

Per request (``RequestHead`` from ``http1.ServerConnection``):

1. route: ``ctx.router.match(RequestInfo)`` (HTTPRoute matches, weighted backendRefs,
   filters) -> a ``DirectResponse`` (redirect, 404 NR, 500) is answered here; a
   ``RouteDecision`` picks an endpoint with ``inputs.lb`` (no endpoint: 503 UH). Without
   a router, ``ctx.endpoint`` is the fixed destination (no endpoint either: 404 NR).
2. the upstream head: URLRewrite / RequestHeaderModifier, hop-by-hop fields stripped
   (``Upgrade`` kept only for a passed-through WebSocket upgrade; ``Upgrade: h2c`` and
   ``HTTP2-Settings`` are always gone, so a 101 for h2c cannot happen), ``host`` set to the
   rewritten authority (``x-forwarded-host`` keeps the original), ``x-forwarded-for`` /
   ``x-forwarded-proto`` / ``x-request-id``.
3. an upstream connection from ``inputs.pool`` (idle: synchronous; dial or queue: the
   request's events wait, reading of the client paused, at most one read held) — or,
   when the backend's Service port speaks HTTP/2 (``pool_h2.speaks_h2``: appProtocol
   http2, h2c, grpc, kubernetes.io/h2c, as the HTTP/2 driver decides), a stream of
   ``inputs.h2pool`` (``_H2Leg``, below).
4. bodies are streamed piece by piece as the codecs produce them; mirrors get a copy.
5. the response head gets ResponseHeaderModifier and hop-by-hop stripping; the end of the
   response releases the upstream connection, observes the metrics and releases the next
   pipelined request (``ServerConnection.next_events``) or closes when ``must_close``.

Flow control: reading the client pauses while the upstream's write buffer is above its
high mark, while the upstream connection is being acquired, and while the codec holds
too many pipelined requests (``ServerConnection.paused``); reading the upstream pauses
while the client's write buffer is above its high mark. Memory per connection is bounded
by the two write buffers plus one read each.

Timers: one timer per connection, the tick (every half of the smallest of the three
timeouts, or sooner for a request's deadline; no timer is created or cancelled per request
in the common case) checks, in turn, the request's deadlines (below), the
header-read timeout (``header_timeout``, from the first byte of a head; 408 SI + close
when part of a head arrived: slowloris), the stream idle timeout while a request is in
flight or a connection is upgraded (``stream_idle_timeout``: no byte either way and no
progress draining the client's buffer -> 408 SI while the request is incomplete, 504 UT
while waiting for the upstream, a reset once the response started) and the keep-alive
idle timeout between requests (``idle_timeout``, silent close); each fires at most one
tick late (after a stream-idle 504 a keep-alive connection keeps its tick). The route's
``timeouts.request`` (from the head, covering retries), ``timeouts.backendRequest`` (from
each try's upstream request) and the TrafficPolicy's ``perTryTimeout`` (from each try's
dispatch to its response head) are deadlines on the exchange (``deadline``, ``bdeadline``,
``tdeadline``), only when configured: a deadline earlier than the tick's next wake moves
the wake (``wake_for``: one timer re-armed, at most once per wake, however many requests
go by), any other costs a compare. Each fires no earlier than due and at most about 1 ms
late (uvloop's timer resolution) plus event-loop lag: 504 ``UT``, or a reset once the
response has started; an expired per-try timeout is retried like a failed try. Fault
delays and retry backoffs (rare) are event-loop timers.

Errors made here (``errors.local_reply`` via the codec): UH no endpoint, UF connect
failure, UO pool queue full, UT timeout, UC upstream closed/reset before the response,
UPE upstream protocol error, NR no route, DPE the client broke HTTP (400/431/414/505...,
then close). After the response started, an upstream failure resets the client (RST),
so a truncated body is never mistaken for a complete one.

Stale keep-alive connections: servers close idle connections on their own clock (Node.js
after 5 s, nginx 75 s), so a pooled connection can die just as a request goes into it.
When a connection that had served a request before closes or resets before one byte of
the response (``pool.died_stale``: EOF, ECONNRESET, EPIPE), the request is sent once more,
to the same endpoint, on a connection that was not idle (``acquire(fresh=True)``: a new
dial, or one released after a completed exchange when ``max_connections`` are busy — its
idle siblings are as old as the dead one) — only when the method is idempotent (RFC 9110
9.2.2; RFC 9112 9.3.1 forbids replaying others), the request was read to its end and its
body (``_Exchange.replay``, kept only for such a request on a pooled connection) is at
most ``RETRY_BUFFER`` bytes, it is no upgrade, the client was sent nothing for it (no 1xx
either) and no route deadline passed (they keep running across the retry). Browsers, Go's
``http.Transport``, nginx (``proxy_next_upstream error``) and HAProxy (``retry-on
conn-failure``) do the same. The request is still one observation with its final outcome
(a second failure: 503 UC; a failed dial: UF); the retry counts in
``hostmesh_agent_upstream_retries_total{reason="stale_keepalive"}``. Mirrors are never
retried.

Performance (bench/l7.py, loopback, nginx backend, shared 2-vCPU VM, Python 3.11 +
uvloop): ~27 us of Python per keep-alive request driven in-process (codec ~10, the rest
here: routing, LB, pool, headers, metrics), ~43-56 us of process CPU with uvloop and the
four syscalls (two reads, a write, a writev); HAProxy (nbthread 1) uses ~8-11 us, and a
bare uvloop byte forwarder ~12 us. Per request nothing allocates a task, future or
timer unless the request needs one (a dial, a queue slot, a fault delay, a backoff), and nothing
is hashed that the connection's last request already looked up (backend, endpoint,
labels, metric series: one-entry memos on the connection).

HTTP/2 upstreams (``_H2Leg``; Envoy's codec AUTO downstream of an HTTP/2 cluster): the
request head goes through ``translate.h1_request_to_h2`` (``:authority`` from Host, hop-by-
hop fields gone, ``te: trailers`` kept), chunked and length-delimited bodies become DATA,
the end END_STREAM (a chunked body's trailers as trailing HEADERS); the response comes back
through ``h2_response_to_h1`` and the client's codec frames it (content-length when the
upstream sent one or ended with its HEADERS, else chunked; close-delimited for an
HTTP/1.0 client); trailers only to a client that sent ``TE: trailers``, and a gRPC
trailers-only answer is a head with its grpc-status and ``content-length: 0``. Streams of
many client connections share a few upstream connections (multiplexed). Flow control
mirrors the HTTP/2 driver's: client reading pauses while the stream is blocked (window
used up, its buffer full, or the connection's transport above high water) and response
DATA is acknowledged upstream only while the client's transport is below high water.
Errors map as for HTTP/1.1 upstreams (UF dial, UO queue full, UC reset or connection lost
before the response — RST once it started —, UPE a malformed response, UT timeouts); a
stream the upstream never processed (REFUSED_STREAM, above a GOAWAY's last id) is retried
once on another connection. Upgrade requests stay on HTTP/1.1 to the same endpoint: Envoy
would send RFC 8441 extended CONNECT, which is not offered here, and most h2c servers
(the test app, Go's h2c handler) speak HTTP/1.1 too; an HTTP/2-only upstream closes the
connection, which the client sees as 503 UC. Metrics are those of any HTTP/1.1 request
(``request_protocol="http"``).

Upgrade (WebSocket): the request keeps ``Upgrade``; a 101 from the upstream switches
both connections to raw byte relay (half-close passed on), any other answer continues
HTTP. The upgraded upstream connection never returns to the pool.

Mirrors (``RequestMirror``): fire and forget. Each mirror gets the upstream head (host
with ``-shadow`` appended, as Envoy and Istio do; over HTTP/2 with the HTTP/2 driver's
``_H2Mirror`` when the mirror backend speaks it) and the body as it streams; its
response is read and dropped. A mirror never holds the main request back: while it is
connecting at most ``mirror_buffer`` bytes are held for it, and a mirror whose buffer is
full, whose connection fails, that takes longer than ``mirror_timeout`` or whose request
will not be read to its end (the client connection closes first) is abandoned. A mirror
outlives the main exchange when it is slower (its response is still read, then dropped).
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter as _clock  # uvloop's loop.time() counts milliseconds

from nodeagent.proxy.l7 import http2
from nodeagent.proxy.l7.context import ConnContext, L7Inputs
from nodeagent.proxy.l7.errors import FLAGS, http_status_for_grpc
from nodeagent.proxy.l7.filters import DirectResponse
from nodeagent.proxy.l7.headers import _PLAIN_CONNECTION, prepare_request, prepare_response, strip_hop_by_hop
from nodeagent.proxy.l7.http1 import (Data, EndOfMessage, LocalProtocolError, ProtocolError, RequestHead,
                                      ResponseHead, ServerConnection, Upgrade)
from nodeagent.proxy.l7.http2_proxy import RETRY_BUFFER, _H2Mirror
from nodeagent.proxy.l7.lb import LEAST_REQUEST
from nodeagent.proxy.l7.metrics import NO_FLAGS, HttpMetrics
from nodeagent.proxy.l7.pool import (IDEMPOTENT, ConnectFailed, PoolOverflow, UpstreamConn, closed_before_sending,
                                     died_stale)
from nodeagent.proxy.l7.pool_h2 import H2Pool, H2Upstream, flush, speaks_h2
from nodeagent.proxy.l7.resilience import (CONNECT_FAILURE, NO_FAULT, RESET, TIMEOUT, reinstate,
                                           retry_after_seconds, retry_after_value, source_key)
from nodeagent.proxy.l7.routing import UNKNOWN_SERVICE, RequestInfo, RouteDecision
from nodeagent.proxy.l7.shared import DriverLifecycle, labels_for, listen
from nodeagent.proxy.l7.translate import TranslationError, h1_request_to_h2, h1_trailers, h2_response_to_h1
from nodeagent.proxy.relay import RST, _close_transport

log = logging.getLogger(__name__)

LINGER = 2.0  # seconds a closing connection keeps reading so the client gets its reply
DRAIN_IDLE_CLOSE = 1.0  # draining: an idle keep-alive connection is closed after this long

# reasons the client connection is not read (bit mask)
_R_PIPELINE = 1  # the codec holds enough pipelined requests
_R_UPSTREAM = 2  # waiting for the upstream connection
_R_UPWRITE = 4  # the upstream's write buffer is full

_T_NONE, _T_HEADER, _T_IDLE, _T_STREAM = 0, 1, 2, 3
_MIN_WAKE = 0.001  # s: the event loop's timer resolution (uvloop counts milliseconds)


def serve_http1(transport: asyncio.Transport, first_bytes: bytes, ctx: ConnContext,
                inputs: L7Inputs) -> "Http1Proxy":
    """Take over an accepted transport whose first bytes were detected as HTTP/1 (see module doc)."""
    proto = Http1Proxy(inputs, ctx)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    transport.resume_reading()
    if first_bytes:
        proto.data_received(first_bytes)
    return proto


def _rst(transport: asyncio.BaseTransport) -> None:
    _close_transport(transport, RST)


def _write(transport: asyncio.Transport, out: list[bytes]) -> None:
    if len(out) == 1:
        transport.write(out[0])
    elif out:
        transport.writelines(out)


class Http1Proxy(DriverLifecycle, asyncio.Protocol):
    """The client side of one proxied HTTP/1 connection (the downstream protocol)."""

    name = "http1"  # DriverLifecycle's log prefix

    __slots__ = ("inputs", "ctx", "loop", "transport", "codec", "ex", "paused", "write_paused",
                 "timer", "wake_at", "tick_every", "since", "mark", "head_since", "activity", "timer_kind", "closing",
                 "lost",
                 "reported", "raw_up", "raw_eofs", "_labels", "draining", "requests", "rx", "tx",
                 "_memo_backend", "_memo_limits", "_memo_service", "_memo_h2", "_memo_ep", "_memo_labels",
                 "_memo_series", "_memo_dest")

    def __init__(self, inputs: L7Inputs, ctx: ConnContext) -> None:
        self.inputs = inputs
        self.ctx = ctx
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self.codec = ServerConnection()
        self.ex: _Exchange | None = None
        self.paused = 0  # _R_* bits
        self.write_paused = False
        self.timer: asyncio.TimerHandle | None = None  # the tick (or, closing, the linger close)
        # when the tick fires (``_clock``); 0.0 while no deadline may move it (inside the
        # tick, closing): an exchange's deadline earlier than this re-arms it (``wake_for``)
        self.wake_at = 0.0
        self.tick_every = 1.0
        self.since = 0.0  # when `mark` last changed
        self.mark: tuple[int, int] = (-1, -1)  # (activity, client write-buffer size) at the last tick
        self.head_since = 0.0  # first byte of the head being read
        self.activity = 0  # bumped by every read on either side and every phase change
        self.timer_kind = _T_NONE
        self.closing = False
        self.lost = False
        self.reported = False
        self.raw_up: UpstreamConn | None = None  # after a 101: the upstream of the byte relay
        self.raw_eofs = 0  # bit 1: client EOF, bit 2: upstream EOF (raw relay)
        self._labels: dict = {}
        # the previous request's backend (its pool limits and hostname) and endpoint (its
        # labels): a keep-alive connection usually sends every request the same way
        self._memo_backend = None
        self._memo_limits = None
        self._memo_service = ""
        self._memo_h2 = False  # the backend's port speaks HTTP/2: the exchange goes over an h2 stream
        self._memo_ep = None
        self._memo_labels = None
        self._memo_series = None  # (labels, status, flag, RequestSeries) of the last observation
        self._memo_dest = None  # the backend's resilience.DestinationState (None: its policy has none)
        self.draining = False
        self.requests = 0
        self.rx = 0  # bytes read from the client (the connection's TCP metrics)
        self.tx = 0  # bytes written to the client

    # ================================================================ asyncio (client side)
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        lim = self.inputs.limits
        transport.set_write_buffer_limits(lim.write_buffer_high, lim.write_buffer_low)
        self._start_ticks()
        self._arm(_T_HEADER)

    def data_received(self, data: bytes) -> None:
        self.rx += len(data)
        if self.closing:
            return  # lingering close: drain and drop
        self.activity += 1
        up = self.raw_up
        if up is not None:
            up.transport.write(data)
            return
        events = self.codec.receive_data(data)
        if events:
            self._events(events)
        elif self.timer_kind == _T_IDLE and self.codec.awaiting_head:
            self._arm(_T_HEADER)  # the first bytes of the next head: the header clock starts
        if self.codec.paused and not self.closing:
            self._pause(_R_PIPELINE)

    def eof_received(self) -> bool:
        if self.closing:
            self._close_now()
            return False
        up = self.raw_up
        if up is not None:
            self.raw_eofs |= 1
            if self.raw_eofs == 3:
                self._close_now()
                return False
            up.transport.write_eof()
            return True
        events = self.codec.receive_eof()
        if events:
            self._events(events)
        ex = self.ex
        if ex is None or ex.finished:
            if not self.closing:
                self._close()
        return True  # an in-flight exchange may still answer (HTTP allows the client's half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._stop_timer()
        ex = self.ex
        if ex is not None:
            ex.drop_incomplete_mirrors()
            if not ex.finished:
                ex.client_gone()
        up = self.raw_up
        if up is not None:
            self.raw_up = None
            up.owner = None
            if exc is None:
                up.transport.close()
            else:
                _rst(up.transport)
        self._maybe_done()

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.raw_up
        if up is not None:
            up.pause_reading()
            return
        ex = self.ex
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.raw_up
        if up is not None:
            up.resume_reading()
            return
        ex = self.ex
        if ex is not None:
            if ex.conn is not None:
                ex.conn.resume_reading()
            elif ex.h2 is not None:
                ex.h2.client_writable()

    def send(self, data: bytes) -> None:
        """Write to the client (counted)."""
        self.tx += len(data)
        self.transport.write(data)

    def send_all(self, out: list[bytes]) -> None:
        if len(out) == 1:
            self.send(out[0])
        elif out:
            self.tx += sum(map(len, out))
            self.transport.writelines(out)

    @property
    def h2pool(self) -> H2Pool:
        """The proxy's HTTP/2 upstream pool (made on first use for an ``L7Inputs`` built by hand)."""
        inputs = self.inputs
        pool = inputs.h2pool
        if pool is None:
            pool = inputs.h2pool = H2Pool(inputs.pool.connector, inputs.limits)
        return pool

    # ================================================================ control
    def drain(self) -> None:
        """Graceful: the next response says ``connection: close`` and ends the connection; one
        that stays idle for ``DRAIN_IDLE_CLOSE`` is closed. Not at once: closing an idle
        keep-alive connection races with a client that is just sending its next request,
        which then fails in a way it cannot safely retry (Envoy and nginx also let a
        draining keep-alive connection carry one more request)."""
        self.draining = True
        self.codec.must_close = True
        if self._idle():
            self.loop.call_later(DRAIN_IDLE_CLOSE, self._close_if_idle, self.activity)

    def _idle(self) -> bool:
        ex = self.ex
        return self.raw_up is None and (ex is None or ex.finished) and not self.codec.partial_head

    def _close_if_idle(self, activity: int) -> None:
        if not self.closing and not self.lost and self.activity == activity and self._idle():
            self._close()

    # ================================================================ internals
    def _pause(self, bit: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= bit

    def _unpause(self, bits: int) -> None:
        if not self.paused & bits:
            return
        self.paused &= ~bits
        if not self.paused and not self.closing:
            self.transport.resume_reading()

    def _arm(self, kind: int) -> None:
        """Switch the connection's clock to ``kind`` (the tick measures it; see ``_tick``)."""
        self.timer_kind = kind
        self.activity += 1  # a new phase: its idle time starts now
        if kind == _T_HEADER:
            self.head_since = _clock()

    def _start_ticks(self) -> None:
        lim = self.inputs.limits
        limits = [t for t in (lim.header_timeout, lim.idle_timeout, lim.stream_idle_timeout) if t]
        self.tick_every = max(0.05, min(limits) / 2)
        self.since = _clock()
        self.wake_at = self.since + self.tick_every
        self.timer = self.loop.call_later(self.tick_every, self._tick)

    def _stop_timer(self) -> None:
        self.timer_kind = _T_NONE
        self.wake_at = 0.0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def wake_for(self, when: float) -> None:
        """Move the tick earlier, to ``when`` (an exchange's deadline, ``_clock`` seconds, below
        ``wake_at``: the caller checks, so a deadline that is not the earliest costs a compare)."""
        if self.timer is not None:
            self.timer.cancel()
        self.wake_at = when
        self.timer = self.loop.call_later(max(when - _clock(), _MIN_WAKE), self._tick)

    def _arm_tick(self, now: float) -> None:
        """The next tick: ``tick_every`` from now, or the exchange's earliest deadline if sooner."""
        wake = now + self.tick_every
        ex = self.ex
        if ex is not None and not ex.finished:
            d = ex.next_deadline()
            if d and d < wake:
                wake = d
        self.wake_at = wake
        self.timer = self.loop.call_later(max(wake - now, _MIN_WAKE), self._tick)

    def _tick(self) -> None:
        """The connection's one timer: every ``tick_every`` s (half the smallest timeout), or
        sooner for the in-flight exchange's earliest deadline.

        Per request nothing touches a timer: reads on either side bump ``activity`` and
        phase changes set ``timer_kind``. A phase expires when ``activity`` (and, while
        streaming, the client's write-buffer size) did not change for its whole timeout,
        checked here: at most one tick late. The header timeout counts from the first byte
        of the head (``head_since``), so trickling bytes cannot extend it. The exchange's
        deadlines (route, backend-request, per-try: ``_Exchange.expire``) are absolute
        times; one earlier than the next wake moves the wake (``wake_for``), the rest cost
        nothing: a deadline fires no earlier than due and at most about a millisecond late
        (the event loop's timer resolution, plus whatever holds the loop up).
        """
        self.timer = None
        self.wake_at = 0.0  # deadlines set while the tick runs are in _arm_tick's choice
        if self.closing:
            return
        now = _clock()
        ex = self.ex
        if ex is not None and not ex.finished:
            ex.expire(now)
            if self.closing:
                return
        kind = self.timer_kind
        lim = self.inputs.limits
        if kind == _T_HEADER:
            if lim.header_timeout and now - self.head_since >= lim.header_timeout:
                return self._expire_head()
        elif kind != _T_NONE:
            mark = (self.activity, self.transport.get_write_buffer_size())
            if mark != self.mark:
                self.mark = mark
                self.since = now
            else:
                timeout = lim.idle_timeout if kind == _T_IDLE else lim.stream_idle_timeout
                if timeout and now - self.since >= timeout:
                    if kind == _T_IDLE:
                        return self._expire_idle()
                    self._stream_idle()  # the connection may live on (keep-alive after a 504)
                    if self.closing:
                        return
        self._arm_tick(now)

    def _expire_head(self) -> None:
        """Header-read timeout: 408 + close when part of a head arrived (slowloris)."""
        self.timer_kind = _T_NONE
        out = self.codec.on_timeout()
        if out:
            self.send(out)
            self._observe_protocol_error(408, "SI")
        self._close(linger=bool(out))

    def _expire_idle(self) -> None:
        """Keep-alive idle timeout: a silent close."""
        self.timer_kind = _T_NONE
        self.codec.on_timeout()
        self._close()

    def _stream_idle(self) -> None:
        """Nothing moved for ``stream_idle_timeout`` (no byte either way, the client's write
        buffer not draining): end the exchange (408 SI while the request is incomplete, 504
        UT while waiting for the upstream; a reset once the response started)."""
        self.timer_kind = _T_NONE
        if self.raw_up is not None:
            self.abort("stream idle timeout")
            return
        ex = self.ex
        if ex is not None and not ex.finished:
            ex.local("UT" if ex.req_done else "SI")

    def _events(self, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is Data:
                ex = self.ex
                if ex is not None:
                    ex.req_data(ev.data)
            elif t is RequestHead:
                self._request(ev)
            elif t is EndOfMessage:
                ex = self.ex
                if ex is not None:
                    ex.req_end(ev.trailers)
            elif t is Upgrade:
                self._raw_start(ev.data)
            elif t is ProtocolError:
                self._protocol_error(ev)
            if self.closing:
                return

    def _protocol_error(self, ev: ProtocolError) -> None:
        ex = self.ex
        if ex is not None and not ex.finished:
            ex.abandon_upstream()
        out = self.codec.send_error(ev)
        if out:
            self.send(out)
        if ex is not None and not ex.finished:
            ex.finish(ev.status if out else 0, ev.flag)
        elif out:
            self._observe_protocol_error(ev.status, ev.flag)
        if out:
            self._close(linger=True)
        else:  # the response had started: the client cannot be told; reset
            self.closing = True
            _rst(self.transport)

    def _observe_protocol_error(self, status: int, flag: str) -> None:
        self.inputs.metrics.observe(self.ctx.labels, status, flag, 0.0, 0, 0)
        if self.inputs.access_log is not None:
            self.inputs.access_log.http_error(self.ctx, status, flag, "HTTP/1.1")

    # ---------------------------------------------------------------- a request
    def _request(self, head: RequestHead) -> None:
        self.timer_kind = _T_STREAM  # _arm(_T_STREAM), inlined
        self.activity += 1
        self.requests += 1
        ex = self.ex = _Exchange(self, head)
        ctx = self.ctx
        router = ctx.router
        headers = head.headers
        authority = None
        for n, v in headers:  # _host, inlined
            if n == b"host":
                authority = v
                break
        had_host = authority is not None
        if router is None:
            ep = ctx.endpoint
            if ep is None:
                ex.direct(UNKNOWN_SERVICE)
                return
            ex.labels = self._labels_for(None, ep)
            if authority is None:
                authority = b"%s:%d" % (ctx.dst_ip.encode(), ctx.dst_port)
            target = head.target
            if ctx.gate_for is not None:
                gated = self._gate(ex, ep, head.method, target, authority, headers)
                if gated is None:
                    return
                target, headers = gated
            ex.dispatch(ep, self._upstream_head(head, target, authority, headers, None, had_host),
                        self.inputs.routes.default_pool_limits(), "")
            return
        if router.producer is None and not router.consumers:
            d = router.default  # no route attached: skip building the match input
        else:
            d = router.match(RequestInfo(head.method, head.target, headers, authority or b"", False,
                                         scheme=ctx.scheme, source_namespace=ctx.source_namespace,
                                         source_ip=ctx.src_ip, dst_ip=ctx.dst_ip, dst_port=ctx.dst_port))
        if type(d) is not RouteDecision:
            ex.direct(d)
            return
        ex.decision = d
        if ctx.table.faults:
            fault = ctx.table.fault_for(d)
            if fault is not None and self._fault(ex, fault, head, authority, had_host):
                return
        self._forward(ex, head, d, authority, had_host)

    def _fault(self, ex: "_Exchange", fault, head: RequestHead, authority, had_host: bool) -> bool:
        """A FaultInjection's draw for this request: True when it answered (abort) or holds it
        (delay: the request goes on with ``_forward`` when the delay is over)."""
        draw = self.inputs.random
        f = fault.decide(head.headers, draw(), draw())
        if f is NO_FAULT:
            return False
        d = ex.decision
        dest = self._destination(d.backend)
        if f.delay:
            if dest is not None:
                dest.faults_delayed_total += 1
            ex.flag = "DI"
            ex.pending = []  # the body waits with the request
            self._pause(_R_UPSTREAM)
            ex.dtimer = self.loop.call_later(f.delay, ex.delayed, f, head, authority, had_host)
            return True
        self._abort(ex, f)
        return True

    def _abort(self, ex: "_Exchange", f) -> None:
        d = ex.decision
        dest = self._destination(d.backend)
        if dest is not None:
            dest.faults_aborted_total += 1
        ex.labels = self._labels_for(d.backend, None)
        status = f.abort_status or http_status_for_grpc(f.abort_grpc)
        ex.local("FI", status, "fault filter abort")

    def _destination(self, backend):
        if backend is not self._memo_backend:
            return self.inputs.routes.destination(self.ctx.table, backend)
        return self._memo_dest

    def _forward(self, ex: "_Exchange", head: RequestHead, d: RouteDecision, authority, had_host: bool) -> None:
        """Pick the endpoint of a routed request and send it there."""
        ctx = self.ctx
        headers = head.headers
        backend = d.backend
        if backend is not self._memo_backend:
            self._memo_backend = backend
            self._memo_limits = self.inputs.routes.pool_limits(ctx.table, backend)
            self._memo_service = backend.hostname
            self._memo_h2 = speaks_h2(backend.port.app_protocol)
            self._memo_ep = None
            self._memo_dest = self.inputs.routes.destination(ctx.table, backend)
        bal = self.inputs.lb.get(backend)
        dest = self._memo_dest
        if dest is not None and not self._admit(ex, dest, bal, backend):
            return
        ep = bal.pick(headers, ctx.src_ip)
        if ep is None:
            ex.labels = self._labels_for(backend, None)
            ex.local("UH")
            return
        if bal.policy == LEAST_REQUEST:  # the only policy that reads in-flight counts
            ex.balancer = bal
        if ep is not self._memo_ep:
            self._memo_ep = ep
            self._memo_labels = self._labels_for(backend, ep)
        ex.labels = self._memo_labels
        if authority is None:
            authority = ctx.router._authority
        target = head.target
        if d.filters.request_ops:
            target, new_auth, headers = d.rewrite_request(target, authority, headers)
        else:
            new_auth = authority
        if ctx.gate_for is not None:  # a same-node destination with request checks: as it will see it
            gated = self._gate(ex, ep, head.method, target, new_auth, headers)
            if gated is None:
                return
            target, headers = gated
        t = d.timeouts
        if t.request or t.backend_request:
            ex.arm_timeouts(t)
            if ex.finished:
                return
        up_head = self._upstream_head(head, target, new_auth, headers, authority if new_auth != authority else None,
                                      had_host)
        if d.mirrors:
            ex.start_mirrors(d.mirrors, up_head)
        if self._memo_h2 and head.upgrade is None:  # an upgrade stays HTTP/1.1 (no RFC 8441 here)
            ex.dispatch_h2(ep, up_head, self._memo_limits, self._memo_service)
        else:
            ex.dispatch(ep, up_head, self._memo_limits, self._memo_service)

    def _admit(self, ex: "_Exchange", dest, bal, backend) -> bool:
        """Outlier reinstatements due, the rate limit (429 RL) and ``maxRequests`` (503 UO);
        True when the request may go on (it then counts in flight at ``dest``)."""
        o = dest.outlier
        if o is not None and o.next_review:
            now = _clock()
            if now >= o.next_review:
                reinstate(bal, o.review(now))
        if dest.policy.rate is not None:
            wait = dest.rate_limit(source_key(self.ctx.labels), _clock())
            if wait:
                ex.labels = self._labels_for(backend, None)
                ex.local("RL", 429, "local rate limit", extra=((b"retry-after", retry_after_value(wait)),))
                return False
        if not dest.admit():
            ex.labels = self._labels_for(backend, None)
            ex.local("UO", 503, f"too many requests to {backend.hostname} (connectionPool.maxRequests)")
            return False
        ex.dest = dest
        ex.retry = dest.policy.retry
        return True

    def _upstream_head(self, head: RequestHead, target: bytes, authority: bytes, headers: list,
                       forwarded_host: bytes | None, had_host: bool) -> RequestHead:
        """``forwarded_host``: the original Host when a URLRewrite changed it (then ``host`` is
        replaced); ``had_host``: the request carried one (HTTP/1.0 may not: it gets ``authority``)."""
        ctx = self.ctx
        headers, _rid = prepare_request(headers, client=ctx.src_ip, proto=ctx.scheme, upgrade=head.upgrade is not None,
                                        forwarded_host=forwarded_host, new_id=self.inputs.request_ids)
        if forwarded_host is not None or not had_host:
            headers = [(n, v) for n, v in headers if n != b"host"]
            headers.insert(0, (b"host", authority))
        return RequestHead(head.method, target, headers, b"1.1", True, head.content_length, head.chunked,
                           head.upgrade, head.expect_continue)

    def _labels_for(self, backend, ep):
        return labels_for(self._labels, self.ctx, backend, ep)

    def _exchange_done(self, ex: "_Exchange") -> None:
        """The response to ``ex`` ended (or was given up): close, or serve the next request."""
        if self.lost:
            self._maybe_done()
            return
        if self.paused & (_R_UPSTREAM | _R_UPWRITE):
            self._unpause(_R_UPSTREAM | _R_UPWRITE)
        if self.raw_up is not None:
            return
        codec = self.codec
        if codec.must_close or self.draining:
            self._close()
            return
        events = codec.next_events()
        if events:
            self._events(events)
        if self.ex is ex and not self.closing:  # nothing pipelined: wait for the next head
            if codec.partial_head:
                self._arm(_T_HEADER)
            else:
                self.timer_kind = _T_IDLE  # _arm(_T_IDLE), inlined
                self.activity += 1
        if self.paused & _R_PIPELINE and not codec.paused:
            self._unpause(_R_PIPELINE)

    def _close(self, linger: bool = False) -> None:
        """Close after the buffered reply is flushed (``linger``: the client may still send).

        When the client may still be sending (its request was not read to the end, or reading
        was paused with bytes possibly queued in the kernel), closing at once would make the
        kernel answer those bytes with a RST that can destroy the reply in flight: then only
        our side is shut down and the rest is read and dropped for up to ``LINGER`` seconds
        (nginx's lingering close).
        """
        if self.closing:
            return
        self.closing = True
        self._stop_timer()
        ex = self.ex
        if ex is not None:
            ex.drop_incomplete_mirrors()  # the rest of the request will not be read
        unread = linger or self.paused or (ex is not None and not ex.req_done) or self.codec.partial_head
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()  # read and drop what the client still sends
        if not unread or self.codec.eof_received or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.timer = self.loop.call_later(LINGER, self._close_now)

    def _close_now(self) -> None:
        self.timer = None
        self.wake_at = 0.0
        self.closing = True
        self.transport.close()

    def _maybe_done(self) -> None:
        if self.reported or not self.lost:
            return
        ex = self.ex
        if ex is not None and not ex.finished:
            return
        self.ex = None
        self._report_done()

    # ---------------------------------------------------------------- upgrade
    def _raw_start(self, tail: bytes) -> None:
        """The client side of a 101: from now on the connection is a byte relay."""
        up = self.raw_up
        if up is None:  # cannot happen: the exchange sets raw_up before the codec releases Upgrade
            self._close()
            return
        if tail:
            up.transport.write(tail)
        self._unpause(_R_PIPELINE | _R_UPSTREAM | _R_UPWRITE)

    def raw_from_upstream(self, data: bytes) -> None:
        self.activity += 1
        self.send(data)

    def raw_upstream_eof(self) -> None:
        self.raw_eofs |= 2
        if self.raw_eofs == 3:
            self._close_now()
        else:
            self.transport.write_eof()

    def raw_upstream_lost(self, exc: Exception | None) -> None:
        self.raw_up = None
        if self.lost:
            return
        self.closing = True
        if exc is None:
            self.transport.close()
        else:
            _rst(self.transport)


def _needs_stripping(headers: list) -> bool:
    """Whether ``prepare_response`` would change what ``send_response`` writes: the HTTP/1
    serializer drops every hop-by-hop field itself except ``te``, and the fields a
    ``Connection`` option nominates (the usual keep-alive / close nominate none)."""
    plain = _PLAIN_CONNECTION
    for n, v in headers:
        if n == b"te" or (n == b"connection" and v not in plain):
            return True
    return False


def _host(headers: list) -> bytes | None:
    for n, v in headers:
        if n == b"host":
            return v
    return None


class _Exchange:
    """One request/response through the proxy; the owner of its upstream connection."""

    __slots__ = ("down", "head", "decision", "balancer", "endpoint", "conn", "fut", "pending", "started",
                 "req_bytes", "resp_bytes", "status", "flag", "deadline", "bdeadline", "backend_timeout",
                 "finished", "req_done", "mirrors", "labels", "up_head", "h2", "limits", "service", "replay",
                 "dest", "retry", "tries", "tried", "retrying", "dtimer", "rtimer", "tdeadline", "retry_h2",
                 "reopened")

    def __init__(self, down: Http1Proxy, head: RequestHead) -> None:
        self.down = down
        self.head = head
        self.decision: RouteDecision | None = None
        self.balancer = None  # set when the balancer counts requests in flight (least request)
        self.endpoint = None
        self.conn: UpstreamConn | None = None
        self.fut: asyncio.Future | None = None
        self.pending: list | None = None  # request events waiting for the upstream connection
        self.started = _clock()
        self.req_bytes = 0
        self.resp_bytes = 0
        self.status = 0
        self.flag = NO_FLAGS
        # deadlines (``_clock`` seconds, 0.0: none), checked by the connection's tick
        # (``Http1Proxy._tick`` -> ``expire``): the route timeout (from the head), the
        # backend-request timeout (from the upstream request) and the per-try timeout
        self.deadline = 0.0
        self.bdeadline = 0.0
        self.backend_timeout = 0.0
        self.finished = False
        self.req_done = False
        self.mirrors: list[_Mirror] | None = None
        self.labels = down.ctx.labels
        self.up_head: RequestHead | None = None
        self.h2: _H2Leg | None = None  # the upstream side when it is an HTTP/2 stream
        # the body kept for a stale-connection retry: None (none so far), its pieces (bytes;
        # a list: the trailers), or False (no retry: too big, not idempotent, done once)
        self.replay: list | bool | None = None
        self.dest = None  # resilience.DestinationState: counts this request in flight (breaker, budget)
        self.retry = None  # resilience.RetryPolicy of the destination, when it has one
        self.tries = 0  # retries made (the policy's, not the stale-connection one)
        self.tried: tuple = ()  # endpoints that failed a try
        self.retrying = False  # a retry of this request holds a slot of the destination's budget
        self.dtimer: asyncio.TimerHandle | None = None  # an injected delay
        self.rtimer: asyncio.TimerHandle | None = None  # the backoff before a retry
        self.tdeadline = 0.0  # the per-try timeout (see deadline)
        self.retry_h2 = False  # the retry waiting for its backoff goes over an HTTP/2 stream
        self.reopened = False  # a connection handed over already closed was replaced once

    # ---------------------------------------------------------------- setup
    def arm_timeouts(self, timeouts) -> None:
        req, be = timeouts.request, timeouts.backend_request
        if req:  # from the head; a fault-delayed request's from the end of its delay
            when = self.deadline = (self.started if self.flag != "DI" else _clock()) + req
            down = self.down
            if when < down.wake_at:
                down.wake_for(when)
        if be:
            self.backend_timeout = be

    def arm_try(self) -> None:
        """A try goes upstream now: its per-try deadline, and the backend-request one unless it
        runs already (a stale-connection retry fits in the first try's; a policy retry
        cleared it: backendRequest is per try)."""
        now = _clock()
        when = 0.0
        if self.backend_timeout and not self.bdeadline:
            when = self.bdeadline = now + self.backend_timeout
        r = self.retry
        if r is not None and r.per_try_timeout:
            t = self.tdeadline = now + r.per_try_timeout
            if not when or t < when:
                when = t
        down = self.down
        if when and when < down.wake_at:
            down.wake_for(when)

    def next_deadline(self) -> float:
        """The earliest deadline still pending (0.0: none)."""
        d = self.deadline
        for t in (self.bdeadline, self.tdeadline):
            if t and (not d or t < d):
                d = t
        return d

    def expire(self, now: float) -> None:
        """The connection's tick at ``now``: a deadline that is due ends the exchange (504 UT,
        or a reset once the response started) or its try (retried, or 504 UT)."""
        if (self.deadline and now >= self.deadline) or (self.bdeadline and now >= self.bdeadline):
            self.on_timeout()
        elif self.tdeadline and now >= self.tdeadline:
            self.per_try_timeout()

    def dispatch(self, ep, up_head: RequestHead, limits, service: str) -> None:
        self.endpoint = ep
        self.up_head = up_head
        self.limits = limits
        self.service = service
        pending, self.pending = self.pending, None  # a delayed request's body so far
        self._acquire(pending, False)

    def delayed(self, fault, head: RequestHead, authority, had_host: bool) -> None:
        """An injected delay is over: abort now if the fault says so, else forward."""
        self.dtimer = None
        if self.finished:
            return
        down = self.down
        if not down.closing:
            down._unpause(_R_UPSTREAM)
        if fault.aborts:
            down._abort(self, fault)
            return
        down._forward(self, head, self.decision, authority, had_host)

    def _acquire(self, pending: list | None, fresh: bool) -> None:
        """An upstream connection (``fresh``: not an idle one), then ``_attach``; ``pending``: the
        request pieces to send after the head (a retry's replay)."""
        down = self.down
        try:
            r = down.inputs.pool.acquire(self.endpoint, self.limits, self, self.service, down.ctx, fresh)
        except PoolOverflow as exc:
            self.local("UO", None, str(exc))
            return
        if type(r) is UpstreamConn:
            self.pending = pending  # _attach sends them after the head
            self._attach(r)
            return
        self.fut = r
        self.pending = [] if pending is None else pending
        down._pause(_R_UPSTREAM)
        r.add_done_callback(self._on_conn)

    def dispatch_h2(self, ep, up_head: RequestHead, limits, service: str) -> None:
        """Send the request over an HTTP/2 stream (the backend's port speaks HTTP/2); a head
        HTTP/2 cannot carry stays on HTTP/1.1."""
        try:
            head = h1_request_to_h2(up_head, scheme=self.down.ctx.scheme)
        except TranslationError:
            self.dispatch(ep, up_head, limits, service)
            return
        self.endpoint = ep
        self.up_head = up_head
        self.limits = limits
        self.service = service
        leg = self.h2 = _H2Leg(self, head, limits, service)
        pending, self.pending = self.pending, None
        if pending:  # a delayed request's body so far: (True, bytes) / (False, trailers)
            for is_data, piece in pending:
                leg.data(piece) if is_data else leg.end(piece)
        leg.acquire(None)

    def _on_conn(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if self.finished:
            if exc is None:
                self.down.inputs.pool.release(fut.result())
            return
        self.fut = None
        if exc is not None:
            flag = getattr(exc, "flag", "UF")
            if flag == "UF" and self.dest is not None:
                self._observe(0)
                if self.retry is not None and self._try_again(None, CONNECT_FAILURE, "connect_failure"):
                    return
            self.local(flag, None, str(exc) if isinstance(exc, (ConnectFailed, PoolOverflow)) else None)
            return
        conn = fut.result()
        if conn.closed:  # closed between being handed over and this callback: nothing was sent
            if not self.reopened:  # once, on a new connection (any method: the upstream saw nothing)
                self.reopened = True
                self._acquire(self.pending, True)
                return
            self.local(*closed_before_sending(conn))
            return
        self._attach(conn)
        down = self.down
        if not self.finished and not down.closing:
            down._unpause(_R_UPSTREAM)

    def _attach(self, conn: UpstreamConn) -> None:
        conn.owner = self
        self.conn = conn
        if self.balancer is not None:
            self.balancer.on_request_start(self.endpoint)
        r = self.retry
        if self.backend_timeout or (r is not None and r.per_try_timeout):
            self.arm_try()
        codec = conn.codec
        try:
            head = codec.send_request(self.up_head)
        except LocalProtocolError as exc:  # a filter produced an invalid head
            log.warning("http1: cannot forward request: %s", exc)
            self.local("UPE", 500, "invalid request after filters")
            return
        pending, self.pending = self.pending, None
        if pending:
            out = [head]
            for kind, value in pending:
                out.append(codec.send_data(value) if kind else codec.send_end(value))
            _write(conn.transport, out)
        else:
            conn.transport.write(head)
        if self.down.write_paused and self.conn is conn:
            conn.pause_reading()

    def start_mirrors(self, backends, up_head: RequestHead) -> None:
        down = self.down
        for backend in backends:
            ep = down.inputs.lb.get(backend).pick(up_head.headers, down.ctx.src_ip)
            if ep is None:
                continue
            host = _host(up_head.headers) or b""
            headers = [(n, v) for n, v in up_head.headers if n != b"host"]
            headers.insert(0, (b"host", host + b"-shadow"))
            shadow = RequestHead(up_head.method, up_head.target, headers, b"1.1", True, up_head.content_length,
                                 up_head.chunked, None, False)
            m = None
            if speaks_h2(backend.port.app_protocol):
                try:
                    m = _H2Mirror(down, h1_request_to_h2(shadow, scheme=down.ctx.scheme))
                except TranslationError:
                    pass
            if m is None:
                m = _Mirror(down, shadow)
            if self.mirrors is None:
                self.mirrors = []
            self.mirrors.append(m)
            m.start(ep, down.inputs.routes.pool_limits(down.ctx.table, backend), backend.hostname)

    def drop_incomplete_mirrors(self) -> None:
        if self.mirrors and not self.req_done:
            for m in self.mirrors:
                m.kill()

    # ---------------------------------------------------------------- request body (from the client)
    def req_data(self, data: bytes) -> None:
        self.req_bytes += len(data)
        if self.mirrors:  # even after a local reply: a mirror gets the whole request or is killed
            for m in self.mirrors:
                m.data(data)
        if self.finished:
            return
        conn = self.conn
        if conn is not None:
            conn.transport.write(conn.codec.send_data(data))
            if self.replay is not False:
                self._keep(data)
        elif self.h2 is not None:
            self.h2.data(data)
        elif self.pending is not None:
            self.pending.append((True, data))
            if self.replay is not False:
                self._keep(data)

    def req_end(self, trailers) -> None:
        self.req_done = True
        if trailers:  # hop-by-hop fields are no one's to forward (and HTTP/2 refuses them)
            trailers = strip_hop_by_hop(trailers)
        if self.mirrors:
            for m in self.mirrors:
                m.end(trailers)
        if self.finished:
            return
        conn = self.conn
        if conn is not None:
            out = conn.codec.send_end(trailers)
            if out:
                conn.transport.write(out)
            if trailers and self.replay is not False:
                self._keep(trailers)
        elif self.h2 is not None:
            self.h2.end(trailers)
        elif self.pending is not None:
            self.pending.append((False, trailers))
            if trailers and self.replay is not False:
                self._keep(trailers)

    def _keep(self, piece) -> None:
        """Keep a body piece (bytes) or the trailers (a list) for a replay while one may come:
        an idempotent method, at most ``RETRY_BUFFER`` bytes, a connection from the pool."""
        conn = self.conn
        r = self.retry
        if (self.req_bytes > RETRY_BUFFER
                or (self.head.method not in IDEMPOTENT and (r is None or not r.non_idempotent))
                or (r is None and conn is not None and conn.served < 2)):
            self.replay = False  # and let go of what was kept
        elif self.replay is None:
            self.replay = [piece]
        else:
            self.replay.append(piece)

    # ---------------------------------------------------------------- upstream events
    def up_events(self, conn: UpstreamConn, events: list) -> None:
        down = self.down
        down.activity += 1
        codec = down.codec
        out: list[bytes] = []
        for ev in events:
            t = type(ev)
            if t is Data:
                self.resp_bytes += len(ev.data)
                out.append(codec.send_data(ev.data))
            elif t is ResponseHead:
                if self.dest is not None and ev.status >= 200 and self._answered(conn, ev.status, ev.headers):
                    down.send_all(out)
                    return  # retried: the rest of this answer is dropped with its connection
                out.append(self._response_head(ev))
            elif t is EndOfMessage:
                end = codec.send_end(ev.trailers)
                if end:
                    out.append(end)
                down.send_all(out)
                self._done_ok()
                return
            elif t is Upgrade:
                if ev.data:
                    out.append(ev.data)
                down.send_all(out)
                self._upgraded(conn)
                return
            elif t is ProtocolError:
                if ev.flag == "UC" and self._retry_stale(conn):  # EOF before the response
                    return
                if ev.flag == "UC" and self.dest is not None and self._failed(conn, RESET, "reset"):
                    return
                down.send_all(out)
                self.local(ev.flag, ev.status, ev.reason)
                return
        down.send_all(out)

    def _retry_stale(self, conn: UpstreamConn) -> bool:
        """Once, on a new connection, when ``conn`` came from the pool and died before one byte
        of the response (``pool.died_stale``), the method is idempotent (RFC 9112 9.3.1), the
        request was read to its end and kept whole, it is no upgrade and the client was sent
        nothing for it. The route and backend deadlines keep running: the retry fits in them."""
        head = self.up_head
        down = self.down
        if (self.replay is False or self.finished or not self.req_done or not died_stale(conn)
                or head.upgrade is not None or head.method not in IDEMPOTENT or down.lost
                or down.codec.response_started):
            return False
        body, self.replay = self.replay, False
        pending = [(True, p) for p in body if type(p) is bytes] if body else []
        pending.append((False, body[-1] if body and type(body[-1]) is list else ()))
        self.conn = None
        if self.balancer is not None:
            self.balancer.on_request_end(self.endpoint)  # _attach counts the new attempt
        down.inputs.pool.discard(conn)
        down.inputs.metrics.retry("stale_keepalive")
        log.debug("http1: reused upstream connection closed before the response: retrying on a new one")
        self._acquire(pending, True)
        return True

    # ---------------------------------------------------------------- retries and outlier detection
    def _answered(self, conn: UpstreamConn | None, status: int, headers) -> bool:
        """A final response head from the upstream (``conn`` None: over the HTTP/2 leg):
        outlier bookkeeping, then True when the retry policy sends the request again instead
        (this answer is dropped)."""
        o = self.dest.outlier
        if o is not None and (status >= 500 or o.records):  # a success with no errors on record: nothing to do
            self._observe(status)
        self.tdeadline = 0.0  # the try is answered
        r = self.retry
        if r is None or (status < 500 and not r.codes) or not r.retriable_status(status):
            return False
        if self._try_again(conn, status, "5xx" if status >= 500 else "status", retry_after_seconds(headers)):
            return True
        if self.tries:
            self.flag = "URX"
        return False

    def _failed(self, conn: UpstreamConn | None, reason: str, metric: str) -> bool:
        """A try ended without an answer (reset, per-try timeout): True when it is retried."""
        self._observe(0)
        return self.retry is not None and self._try_again(conn, reason, metric)

    def _observe(self, status: int) -> None:
        dest = self.dest
        if dest is None or dest.outlier is None or self.endpoint is None:
            return
        ep = self.endpoint
        backend = self.decision.backend
        if dest.observe((ep.address, ep.port), status, len(backend.endpoints), _clock()):
            self.down.inputs.lb.get(backend).set_healthy(ep, False)
            log.info("http1: outlier detection ejected %s:%d of %s", ep.address, ep.port, backend.hostname)

    def _try_again(self, conn: UpstreamConn | None, why, metric: str, retry_after: float | None = None) -> bool:
        """Retry when the policy, the request and the destination's budget allow it: on
        another endpoint, after the backoff. ``why``: the status, or a failure reason."""
        r = self.retry
        down = self.down
        leg = self.h2
        # the HTTP/2 leg keeps the body (None: too big); after its own refused-stream retry
        # what it kept may miss later pieces, so that request is not retried again
        body = self.replay if leg is None else (None if leg.retried else leg.retry_body)
        if (self.finished or not self.req_done or body is False or (leg is not None and body is None)
                or self.tries >= r.attempts or down.lost
                or down.codec.response_started or self.up_head.upgrade is not None
                or not r.method_ok(self.up_head.method)
                or (type(why) is str and not r.retriable_failure(why))):
            return False
        delay = r.backoff(self.tries + 1, down.inputs.random(), retry_after)
        if delay is None:
            return False
        dest = self.dest
        if self.retrying:  # the previous retry is over
            self.retrying = False
            dest.retry_done()
        if not dest.may_retry():
            log.debug("http1: retry budget of %s exhausted", self.decision.backend.hostname)
            return False
        self.retrying = True
        self.tries += 1
        self.bdeadline = 0.0  # timeouts.backendRequest is per try (Gateway API GEP-1742)
        self.tdeadline = 0.0
        dest.count_retry(metric)
        down.inputs.metrics.retry(metric)
        if conn is not None:
            self.conn = None
            if self.balancer is not None:
                self.balancer.on_request_end(self.endpoint)
            down.inputs.pool.discard(conn)
        self.retry_h2 = leg is not None
        if leg is not None:
            body = list(body)
            bal = self.balancer
            leg.abandon()  # the stream is reset; the next leg counts in flight anew
            self.balancer = bal
            self.h2 = None
            if leg.blocked:
                leg.blocked = False
                down._unpause(_R_UPWRITE)
        if self.endpoint not in self.tried:
            self.tried += (self.endpoint,)
        pending = [(True, p) for p in body if type(p) is bytes] if body else []
        pending.append((False, body[-1] if body and type(body[-1]) is list else ()))
        self.pending = pending
        down._pause(_R_UPSTREAM)
        self.rtimer = down.loop.call_later(delay, self._retry_now)
        return True

    def _retry_now(self) -> None:
        self.rtimer = None
        if self.finished:
            return
        down = self.down
        backend = self.decision.backend
        bal = down.inputs.lb.get(backend)
        ep = bal.pick(self.up_head.headers, down.ctx.src_ip)
        if ep is None:
            self.local("UH")
            return
        if ep in self.tried:
            fresh = [c for c in bal.candidates() if c not in self.tried]
            if fresh:
                ep = fresh[int(down.inputs.random() * len(fresh)) % len(fresh)]
        if ep is not self.endpoint:
            self.endpoint = ep
            self.labels = down._labels_for(backend, ep)
        if self.retry_h2:  # the pending pieces go to the new leg
            self.dispatch_h2(ep, self.up_head, self.limits, self.service)
            return
        pending, self.pending = self.pending, None
        self._acquire(pending, False)
        if self.conn is not None and not self.finished and not down.closing:
            down._unpause(_R_UPSTREAM)

    def per_try_timeout(self) -> None:
        self.tdeadline = 0.0
        if self.finished:
            return
        conn = self.conn
        if self._failed(conn, TIMEOUT, "per_try_timeout"):
            return
        self.local("UT")

    def _response_head(self, ev: ResponseHead) -> bytes:
        status = ev.status
        if status >= 200:
            self.status = status
            headers = ev.headers
            d = self.decision
            if d is not None and d.filters.response_ops:
                headers = d.rewrite_response_headers(prepare_response(headers))
            elif _needs_stripping(headers):  # else the serializer drops the hop-by-hop fields itself
                headers = prepare_response(headers)
        else:
            headers = prepare_response(ev.headers, upgrade=status == 101)
            if status == 101:
                self.status = 101
        ev.headers = headers
        return self.down.codec.send_response(ev)

    def _upgraded(self, conn: UpstreamConn) -> None:
        down = self.down
        conn.raw = True
        conn.ep_pool.forget(conn)  # never back to the pool
        conn.owner = _RawUpstream(down)
        self.conn = None
        down.raw_up = conn
        self.finish(101, NO_FLAGS)
        if down.write_paused:
            conn.pause_reading()
        down._events(down.codec.next_events())  # -> Upgrade(tail): the client's held bytes

    def up_raw(self, conn, data) -> None:  # pragma: no cover - raw connections have a _RawUpstream owner
        conn.close()

    up_raw_eof = up_raw

    def up_lost(self, conn: UpstreamConn, exc: Exception | None) -> None:
        if self.finished or conn is not self.conn:
            return
        if getattr(exc, "response_flags", "") == "RBAC":  # the destination's AuthorizationPolicy said no
            self.conn = None
            self.local("RBAC")
            return
        if self._retry_stale(conn):
            return
        if self.dest is not None and not self.down.codec.response_started and self._failed(conn, RESET, "reset"):
            return
        self.conn = None
        self.local("UC", 503, "upstream connection reset before the response" if exc is not None
                   else "upstream closed the connection before responding")

    def up_pause_writing(self, conn: UpstreamConn) -> None:
        self.down._pause(_R_UPWRITE)

    def up_resume_writing(self, conn: UpstreamConn) -> None:
        self.down._unpause(_R_UPWRITE)

    # ---------------------------------------------------------------- outcomes
    def direct(self, d: DirectResponse) -> None:
        """Answer a routing decision that is not a forward: a redirect or an error."""
        codec = self.down.codec
        if d.location is not None:
            out = codec.send_response(ResponseHead(d.status, list(d.headers), content_length=0))
            out += codec.send_end()
            self.down.send(out)
            self.finish(d.status, NO_FLAGS)
            return
        self.local(d.flag, d.status, d.message or None)

    def local(self, flag: str, status: int | None = None, message: str | None = None,
              extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """A proxy-made error response (or a reset once the response has started)."""
        if self.finished:
            return
        self.abandon_upstream()
        down = self.down
        codec = down.codec
        if down.lost:
            self.finish(0, flag)
            return
        if codec.response_started:
            self.finish(0, flag)
            down.closing = True
            _rst(down.transport)
            return
        out = codec.send_local_reply(flag, status, message, extra=extra)
        down.send(out)
        self.finish(status if status is not None else FLAGS[flag].status, flag)

    def on_timeout(self) -> None:
        self.deadline = self.bdeadline = 0.0
        self.local("UT")

    def client_gone(self) -> None:
        """The client connection closed or reset mid-exchange."""
        self.abandon_upstream()
        self.finish(0 if not self.status else self.status, "DC")

    def abandon_upstream(self) -> None:
        fut, self.fut = self.fut, None
        if fut is not None:
            fut.cancel()
        self.tdeadline = 0.0
        t = self.dtimer
        if t is not None:
            t.cancel()
            self.dtimer = None
        t = self.rtimer
        if t is not None:
            t.cancel()
            self.rtimer = None
        if self.h2 is not None:
            self.h2.abandon()
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.balancer is not None:
                self.balancer.on_request_end(self.endpoint)
                self.balancer = None
            self.down.inputs.pool.discard(conn)

    def _done_ok(self) -> None:
        conn, self.conn = self.conn, None
        if self.balancer is not None:
            self.balancer.on_request_end(self.endpoint)
            self.balancer = None
        if conn is not None:
            self.down.inputs.pool.release(conn)
        self.finish(self.status, self.flag)

    def finish(self, status: int, flag: str) -> None:
        if self.finished:
            return
        self.finished = True  # its deadlines are void: the tick skips a finished exchange
        dest = self.dest
        if dest is not None:
            self.dest = None
            dest.request_done()
            if self.retrying:
                dest.retry_done()
        down = self.down
        labels = self.labels
        memo = down._memo_series
        if memo is not None and memo[0] is labels and memo[1] == status and memo[2] == flag:
            series = memo[3]
        else:
            series = down.inputs.metrics.series(labels, status, flag)
            down._memo_series = (labels, status, flag, series)
        HttpMetrics.record(series, _clock() - self.started, self.req_bytes, self.resp_bytes)
        if down.inputs.access_log is not None:
            down.inputs.access_log.http1(self, status, flag)
        down._exchange_done(self)


class _RawUpstream:
    """The owner of an upgraded upstream connection: forwards to the client as bytes."""

    __slots__ = ("down",)

    def __init__(self, down: Http1Proxy) -> None:
        self.down = down

    def up_raw(self, conn, data: bytes) -> None:
        self.down.raw_from_upstream(data)

    def up_raw_eof(self, conn) -> None:
        self.down.raw_upstream_eof()

    def up_events(self, conn, events) -> None:  # pragma: no cover - raw connections are not parsed
        pass

    def up_lost(self, conn, exc) -> None:
        self.down.raw_upstream_lost(exc)

    def up_pause_writing(self, conn) -> None:
        self.down._pause(_R_UPWRITE)

    def up_resume_writing(self, conn) -> None:
        self.down._unpause(_R_UPWRITE)


_H2_DATA, _H2_HEAD, _H2_END, _H2_RESET, _H2_WRITABLE, _H2_ERROR = (
    http2.Data, http2.ResponseHead, http2.EndOfMessage, http2.StreamReset, http2.Writable, http2.ProtocolError)


class _H2Leg:
    """The upstream side of an exchange over an HTTP/2 stream (a ``pool_h2`` stream owner).

    The HTTP/1.1 request goes out as ``translate.h1_request_to_h2`` made it, its body as
    DATA (chunked or length-delimited alike), the end as END_STREAM (with the last DATA
    frame of a length-delimited body, with the chunked body's trailers); the response comes back through ``h2_response_to_h1`` and the
    client's codec, which frames it (content-length when known, else chunked, close-
    delimited for HTTP/1.0); trailers reach the client only when it sent ``TE: trailers``.

    Flow control: reading the client pauses while the stream is being acquired and while
    the stream is ``blocked`` (its window is used up and ``stream_buffer`` bytes queued, or
    the connection's transport is above high water), and resumes on ``Writable`` /
    ``up2_writable``. Response DATA is acknowledged upstream (``consumed``) at once while
    the client's transport is below high water, else held and acknowledged when it drains
    (``client_writable``): memory is bounded by the stream window.

    Output to the client goes through the pool's ``WriteBatch`` (as the HTTP/2 driver's):
    a response whose head, body and end arrive in one upstream read is one write; it is
    flushed before the exchange ends or fails, so pipelined answers keep their order.

    A stream the upstream never processed (REFUSED_STREAM, above a GOAWAY's last stream
    id, its connection lost unprocessed) is retried once on another connection while
    nothing was answered and the body so far is at most ``RETRY_BUFFER`` bytes.
    """

    __slots__ = ("ex", "down", "head", "limits", "service", "up", "usid", "fut", "pending", "held_resp",
                 "blocked", "retry_body", "kept", "retried", "answered", "counted", "ended", "transport", "_out",
                 "_dirty")

    def __init__(self, ex: "_Exchange", head: http2.RequestHead, limits, service: str) -> None:
        self.ex = ex
        self.down = ex.down
        self.head = head
        self.limits = limits
        self.service = service
        self.up: H2Upstream | None = None
        self.usid = 0
        self.fut: asyncio.Future | None = None
        self.pending: list | None = []  # request pieces (bytes; a list = the end's trailers) before the stream opens
        self.held_resp = 0  # response bytes sent to the client, not yet acknowledged upstream
        self.blocked = False  # the client's reading is paused on this stream (_R_UPWRITE)
        self.retry_body: list | None = []  # request pieces kept for one replay
        self.kept = 0
        self.retried = False
        self.answered = False  # a final response head arrived
        self.counted = False  # the balancer counts this request in flight
        self.ended = False  # END_STREAM went with the last DATA frame of a length-delimited body
        self.transport = self.down.transport  # WriteBatch's view: this leg writes to the client
        self._out: list[bytes] = []
        self._dirty = False

    # ---------------------------------------------------------------- the stream
    def acquire(self, avoid) -> None:
        down = self.down
        try:
            r = down.h2pool.acquire(self.ex.endpoint, self.limits, self.service, down.ctx, avoid)
        except PoolOverflow as exc:
            self.ex.local("UO", None, str(exc))
            return
        if type(r) is H2Upstream:
            self._attach(r, False)
            return
        self.fut = r
        down._pause(_R_UPSTREAM)
        r.add_done_callback(self._on_conn)

    def _on_conn(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        ex = self.ex
        if fut is not self.fut or ex.finished:
            if exc is None:
                fut.result().unreserve()
            return
        self.fut = None
        if exc is not None:
            flag = getattr(exc, "flag", "UF")
            if flag == "UF" and ex.dest is not None and ex._failed(None, CONNECT_FAILURE, "connect_failure"):
                return
            ex.local(flag, None, str(exc) if isinstance(exc, (ConnectFailed, PoolOverflow)) else None)
            return
        conn = fut.result()
        if conn.closed:
            conn.unreserve()
            if not ex.reopened:  # nothing was sent: once more, on another connection
                ex.reopened = True
                self.acquire(conn)
                return
            ex.local(*closed_before_sending(conn))
            return
        self._attach(conn, True)

    def _attach(self, conn: H2Upstream, reserved: bool) -> None:
        ex = self.ex
        if conn.codec.capacity <= 0:
            # the peer lowered SETTINGS_MAX_CONCURRENT_STREAMS (or sent GOAWAY) since the slot
            # was handed out: queue again, elsewhere
            if reserved:
                conn.unreserve()
            self.acquire(conn)
            return
        try:
            self.usid = conn.open(self, self.head, reserved)  # takes the reserved slot, even when it raises
        except LocalProtocolError as exc:  # a filter produced a head HTTP/2 refuses
            log.warning("http1: cannot forward request over HTTP/2: %s", exc)
            ex.local("UPE", 500, "invalid request after filters")
            return
        self.up = conn
        if not self.counted:
            self.counted = True
            if ex.balancer is not None:
                ex.balancer.on_request_start(ex.endpoint)
            r = ex.retry
            if ex.backend_timeout or (r is not None and r.per_try_timeout):
                ex.arm_try()
        pending, self.pending = self.pending, None
        if self.retried and self.retry_body:
            pending = self.retry_body + (pending or [])
        sid = self.usid
        for piece in pending or ():
            if type(piece) is bytes:
                conn.send_data(sid, piece)
            else:
                self._send_end(conn, piece)
        self.down._unpause(_R_UPSTREAM)
        if conn.blocked(sid) and not ex.req_done:
            self._block()
        else:
            self._unblock()

    def _retry(self, up: H2Upstream) -> bool:
        """Once, on another connection, when nothing was answered and the body so far is kept."""
        if self.retried or self.answered or self.retry_body is None or self.ex.finished:
            return False
        self.retried = True
        self.ended = False
        self.pending = []
        log.debug("http1: retrying a request on another HTTP/2 connection")
        self.acquire(up)
        return True

    def abandon(self, code: int = http2.CANCEL) -> None:
        """Give the stream up (RST_STREAM ``code``) after flushing what the client is owed."""
        flush(self)
        fut, self.fut = self.fut, None
        if fut is not None:
            fut.cancel()
        up, self.up = self.up, None
        if up is not None:
            up.done(self.usid, code)
        self._lb_end()

    def _lb_end(self) -> None:
        ex = self.ex
        if self.counted and ex.balancer is not None:
            ex.balancer.on_request_end(ex.endpoint)
            ex.balancer = None

    # ---------------------------------------------------------------- request (client -> upstream)
    def data(self, data: bytes) -> None:
        body = self.retry_body
        if body is not None and not self.retried:
            self.kept += len(data)
            if self.kept <= RETRY_BUFFER:
                body.append(data)
            else:
                self.retry_body = None
        up = self.up
        if up is None:
            self.pending.append(data)
            return
        length = self.head.content_length
        if length is not None and self.ex.req_bytes == length:  # the last piece: one frame with END_STREAM
            self.ended = True
            up.send_data(self.usid, data, True)
            self._unblock()  # nothing more to read for this request
            return
        up.send_data(self.usid, data)
        if not self.blocked and up.blocked(self.usid):
            self._block()

    def end(self, trailers) -> None:
        if self.head.end_stream:  # the head went out with END_STREAM
            return
        trailers = list(trailers)
        if self.retry_body is not None and not self.retried:
            self.retry_body.append(trailers)
        if self.ended:  # went with the last DATA frame
            return
        up = self.up
        if up is None:
            self.pending.append(trailers)
            return
        self._send_end(up, trailers)
        self._unblock()  # nothing more to read for this request

    def _send_end(self, up: H2Upstream, trailers: list) -> None:
        try:
            up.send_end(self.usid, trailers)
        except LocalProtocolError:  # a trailer field HTTP/2 refuses: end without them
            up.send_end(self.usid)

    def _block(self) -> None:
        self.blocked = True
        self.down._pause(_R_UPWRITE)

    def _unblock(self) -> None:
        if self.blocked:
            up = self.up
            if up is None or not up.blocked(self.usid) or self.ex.req_done:
                self.blocked = False
                self.down._unpause(_R_UPWRITE)

    # ---------------------------------------------------------------- response (upstream -> client)
    def _send(self, out: bytes) -> None:
        down = self.down
        down.tx += len(out)
        down.h2pool.batch.write(self, out)

    def client_writable(self) -> None:
        """The client's transport drained: acknowledge the response bytes held back."""
        n = self.held_resp
        up = self.up
        if n and up is not None:
            self.held_resp = 0
            up.consumed(self.usid, n)

    def up2_event(self, up: H2Upstream, ev) -> None:
        ex = self.ex
        if ex.finished or up is not self.up:
            return
        down = self.down
        down.activity += 1
        t = type(ev)
        if t is _H2_DATA:
            data = ev.data
            n = len(data)
            ex.resp_bytes += n
            try:
                out = down.codec.send_data(data)
            except LocalProtocolError:  # more than the content-length it announced
                ex.local("UPE", 502, "upstream response body longer than its content-length")
                return
            if out:
                self._send(out)
            if down.write_paused:
                self.held_resp += n
            else:
                up.consumed(self.usid, n)
        elif t is _H2_HEAD:
            self._head(ev)
        elif t is _H2_END:
            self._end(ev.trailers)
        elif t is _H2_WRITABLE:
            self._unblock()
        elif t is _H2_RESET:
            self.up = None  # the pool forgot the stream
            if ev.retryable and self._retry(up):
                return
            if not self.answered and ex.dest is not None and ex._failed(None, RESET, "reset"):
                return
            ex.local("UC", 503, f"upstream reset the stream (error code {ev.error_code})")
        elif t is _H2_ERROR:
            up.done(self.usid)
            self.up = None
            ex.local(ev.flag, ev.status, ev.reason)

    def _head(self, ev: http2.ResponseHead) -> None:
        ex = self.ex
        codec = self.down.codec
        status = ev.status
        if status < 200:  # 100 Continue, 103 Early Hints: passed on (the codec skips them for HTTP/1.0)
            out = codec.send_response(ResponseHead(status, prepare_response(ev.headers)))
            if out:
                self._send(out)
            return
        if ex.dest is not None and ex._answered(None, status, ev.headers):
            return  # retried on another stream (this one was reset)
        self.answered = True
        self.retry_body = None  # answered: never retried
        ex.status = status
        head = h2_response_to_h1(ev)
        d = ex.decision
        if d is not None and d.filters.response_ops:
            head.headers = d.rewrite_response_headers(head.headers)
        try:
            out = codec.send_response(head)
        except LocalProtocolError as exc:
            log.debug("http1: bad response head from an HTTP/2 upstream: %s", exc)
            ex.local("UPE", 502, "invalid response from upstream")
            return
        self._send(out)

    def _end(self, trailers) -> None:
        ex = self.ex
        down = self.down
        if trailers:
            trailers = h1_trailers(trailers, ex.head.headers)
        try:
            out = down.codec.send_end(trailers)
        except LocalProtocolError:  # shorter than its content-length
            ex.local("UPE", 502, "upstream response body shorter than its content-length")
            return
        if out:
            self._send(out)
        flush(self)  # before the next pipelined request can be answered
        up, self.up = self.up, None
        # the response is complete: a request still streaming is not wanted any more
        up.done(self.usid, None if ex.req_done else http2.CANCEL)
        self._lb_end()
        ex.finish(ex.status, ex.flag)

    def up2_lost(self, up: H2Upstream, retryable: bool) -> None:
        ex = self.ex
        if ex.finished or up is not self.up:
            return
        self.up = None
        if up.lost_flag == "RBAC":  # the destination's AuthorizationPolicy said no
            ex.local("RBAC")
            return
        if retryable and self._retry(up):
            return
        if not self.answered and ex.dest is not None and ex._failed(None, RESET, "reset"):
            return
        ex.local("UC", 503, "upstream connection closed before the response")

    def up2_writable(self, up: H2Upstream, writable: bool) -> None:
        if up is not self.up or self.ex.finished:
            return
        if writable:
            self._unblock()
        elif not self.ex.req_done and not self.blocked:
            self._block()


class _Mirror:
    """A fire-and-forget copy of one request; never affects the main exchange."""

    __slots__ = ("down", "head", "conn", "fut", "pending", "held", "dead", "timer")

    def __init__(self, down: Http1Proxy, head: RequestHead) -> None:
        self.down = down
        self.head = head
        self.conn: UpstreamConn | None = None
        self.fut: asyncio.Future | None = None
        self.pending: list | None = []
        self.held = 0
        self.dead = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self, ep, limits, service: str) -> None:
        down = self.down
        self.timer = down.loop.call_later(down.inputs.limits.mirror_timeout, self.kill)
        try:
            r = down.inputs.pool.acquire(ep, limits, self, service, down.ctx)
        except PoolOverflow:
            self.kill()
            return
        if type(r) is UpstreamConn:
            self._attach(r)
        else:
            self.fut = r
            r.add_done_callback(self._on_conn)

    def _on_conn(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            self.fut = None
            self.kill()
            return
        conn = fut.result()
        if self.dead:
            self.down.inputs.pool.release(conn)
            return
        self.fut = None
        if conn.closed:
            self.kill()
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConn) -> None:
        conn.owner = self
        self.conn = conn
        codec = conn.codec
        try:
            out = [codec.send_request(self.head)]
            pending, self.pending = self.pending, None
            for kind, value in pending:
                out.append(codec.send_data(value) if kind else codec.send_end(value))
        except LocalProtocolError:
            self.kill()
            return
        _write(conn.transport, out)

    def data(self, data: bytes) -> None:
        if self.dead:
            return
        conn = self.conn
        if conn is None:
            self.held += len(data)
            if self.held > self.down.inputs.limits.mirror_buffer:
                self.kill()
                return
            self.pending.append((True, data))
            return
        if conn.transport.get_write_buffer_size() > self.down.inputs.limits.write_buffer_high:
            self.kill()  # a slow mirror must never hold the main request back
            return
        conn.transport.write(conn.codec.send_data(data))

    def end(self, trailers) -> None:
        if self.dead:
            return
        conn = self.conn
        if conn is None:
            self.pending.append((False, trailers))
            return
        out = conn.codec.send_end(trailers)
        if out:
            conn.transport.write(out)

    def up_events(self, conn, events) -> None:
        for ev in events:
            t = type(ev)
            if t is EndOfMessage:
                self.conn = None
                self._stop_timer()
                self.dead = True
                self.down.inputs.pool.release(conn)
                return
            if t is ProtocolError or t is Upgrade:
                self.kill()
                return

    def up_raw(self, conn, data) -> None:  # pragma: no cover - mirrors never upgrade
        self.kill()

    up_raw_eof = up_raw

    def up_lost(self, conn, exc) -> None:
        self.conn = None
        self.kill()

    def up_pause_writing(self, conn) -> None:
        self.kill()

    def up_resume_writing(self, conn) -> None:
        pass

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def kill(self) -> None:
        """Abandon the mirror (its failure is nobody's problem)."""
        self.dead = True
        self._stop_timer()
        self.pending = None
        fut, self.fut = self.fut, None
        if fut is not None:
            fut.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            self.down.inputs.pool.discard(conn)


async def listen_http1(inputs: L7Inputs, snapshot, host: str, port: int, *, dst: tuple[str, int],
                       reporter: str = "source", on_done=lambda driver: None, backlog: int = 1024, prepare=None):
    """A plain HTTP/1 listener that treats every connection as captured for ``dst`` (a Service
    VIP:port of ``snapshot()``): the driver without capture, for tests and benchmarks."""
    return await listen(serve_http1, inputs, snapshot, host, port, dst=dst, reporter=reporter, on_done=on_done,
                        backlog=backlog, prepare=prepare)
