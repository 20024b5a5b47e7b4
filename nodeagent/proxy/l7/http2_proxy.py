"""The asyncio driver of HTTP/2 and gRPC proxying: one client connection, many streams.

Wiring: exactly as ``http1_proxy`` (same ``L7Inputs``, ``ConnContext`` and ``on_done``
contract); the listener calls this one when detection said HTTP/2 prior knowledge::

    driver = serve_http2(transport, detected.data, ctx, inputs)   # data: the preface and more
    ...driver.drain()          # GOAWAY(NO_ERROR): open streams finish, then close
    ...driver.abort("drain")   # close everything now

``ctx.on_done(driver)`` is called exactly once, after the client connection is closed and
every stream of it is finished; ``driver.rx`` / ``driver.tx`` count the bytes read from /
written to the client (the connection's TCP metrics are the caller's, as with HTTP/1.1). ``listen_http2`` (end of this module) is the driver behind
a plain listener, for tests and ``bench/l7.py``.

Downstream: one ``http2.ServerConnection`` per connection. Each request stream is
independent (a ``_Stream``): routed with ``ctx.router`` (HTTPRoute, or GRPCRoute on the
gRPC service/method), an endpoint picked with ``inputs.lb``, the head prepared like the
HTTP/1.1 driver's (filters, hop-by-hop, x-forwarded-*, x-request-id), then sent

* over HTTP/2 (``inputs.h2pool``, streams multiplexed over a few connections per endpoint)
  when the request is gRPC or the backend's Service port has ``appProtocol`` http2 / h2c /
  grpc / kubernetes.io/h2c, and always for a fixed destination without routing (the
  client spoke HTTP/2 prior knowledge to that very address);
* otherwise over HTTP/1.1 (``inputs.pool``) with ``translate.h2_request_to_h1`` /
  ``h1_response_to_h2`` (HTTP/2 client -> HTTP/1.1 upstream).

Flow control, both ways, per stream: a client DATA frame is acknowledged to the client
(``consumed()``, which reopens its windows) only once the upstream took it — its codec
did not queue it past its window (``blocked``) and its transport is below high water;
otherwise the bytes are held and acknowledged when the upstream drains (``Writable``,
``resume_writing``). The other way, upstream DATA is acknowledged upstream (HTTP/2) or
the upstream connection keeps being read (HTTP/1.1) only while the client stream is not
``blocked`` and the client transport is below high water. So memory per connection is
bounded by the codecs' windows and per-stream buffers, whatever the peers do, and a slow
stream only stalls itself.

gRPC: trailers pass through; the deadline is the smaller of ``grpc-timeout`` and the
route's request timeout, and the upstream gets the remaining time in its
``grpc-timeout``; when it expires the client gets DEADLINE_EXCEEDED (trailers-only, or
trailers after a started response) and the upstream stream RST_STREAM(CANCEL). Proxy
errors are trailers-only with the flag's gRPC status (UH/UF/UC/UO UNAVAILABLE, UT
DEADLINE_EXCEEDED, NR UNIMPLEMENTED); a non-gRPC answer to a gRPC request becomes one
too (``grpc.non_grpc_reply``).

Retries: a stream the upstream never processed (REFUSED_STREAM, above a GOAWAY's
last-stream-id, or its connection died with it unprocessed) is retried once on another
connection while no response byte was sent and the request body sent so far is at most
``RETRY_BUFFER`` bytes (kept for the replay). Over HTTP/1.1 (``_Stream._retry_stale``):
a reused connection that closed or reset before one byte of the response (a stale
keep-alive connection, ``pool.died_stale``) gets the request once more on a connection
that was not idle, as the HTTP/1.1 driver does — idempotent methods only, the request
read to its end and kept, nothing answered; counted in
``hostmesh_agent_upstream_retries_total{reason="stale_keepalive"}``.

Resilience (``resilience.py``; only for a destination whose TrafficPolicy has retries,
outlier detection, a rate limit or ``maxRequests`` — ``routes.destination`` is not None —
or a request a FaultInjection may apply to; other requests pay one ``is None`` check and
one truth test): after routing, before the endpoint pick, in this order

* fault injection (``table.fault_for``): a delay holds the request (its body queued and
  not acknowledged to the client: flow-controlled) for one timer, then goes on (flag
  ``DI`` when nothing else happens); an abort answers ``FI`` with the configured status —
  a gRPC client gets a trailers-only reply with ``grpcStatus``, or the gRPC status of
  ``httpStatus``; a client that is not gRPC ``httpStatus``, or the HTTP status of
  ``grpcStatus``. Delay then abort when both fire.
* rate limit: 429 ``RL`` (gRPC RESOURCE_EXHAUSTED) with ``retry-after``.
* ``maxRequests``: 503 ``UO`` (UNAVAILABLE); an admitted request is counted until its
  stream finishes, however it finishes.
* outlier detection: ended ejections are reviewed before each pick; each try's outcome (its
  status — a gRPC trailers-only UNAVAILABLE counts as 503 — or 0 for a connect failure,
  reset or timeout) is observed, and an ejected endpoint is marked unhealthy in the
  balancer.
* retries (``retries``): a try answered with a retriable status (or a trailers-only
  retriable grpc-status), or ended before any response byte by a connect failure, a reset,
  a refused stream or the per-try timeout (``perTryTimeout``, from dispatch to the response
  head), is dropped (upstream stream reset, or HTTP/1.1 connection closed) and sent again
  after the backoff, on an endpoint not tried yet when the balancer has one — when the
  method may be retried (``retryNonIdempotent`` for POST, so for every gRPC call), the
  whole request was read within ``RETRY_BUFFER``, nothing was answered, retries are left
  and the budget allows. Otherwise the last answer goes to the client as it is (``URX`` in
  the metrics when a retry was made and that answer still failed). The route timeout and
  the gRPC deadline keep running across tries; the backend-request timeout is per try.
  Counted in ``hostmesh_agent_upstream_retries_total`` by reason (``5xx``, ``status``,
  ``grpc``, ``connect_failure``, ``reset``, ``per_try_timeout``, ``refused_stream``) and on
  the destination. The transparent retries above (refused stream, stale keep-alive) come
  first and stay as they are.

Timers: one timer per connection, the tick. Every half of the smallest timeout it checks
the header timeout (no request within ``header_timeout`` of the connection start: a
client that sends the preface and nothing else), the idle timeout (no stream for
``idle_timeout``) and, per stream, the stream idle timeout (nothing moved for
``stream_idle_timeout``: 408 SI while the request is incomplete, 504 UT while waiting for
the upstream); each at most one tick late. The streams' deadlines — the route timeout or
gRPC deadline (from the request head, from the end of a fault delay; covering retries),
the backend-request timeout and the per-try timeout (both from each try's dispatch),
only when configured — are entries of a per-connection heap (``schedule``); the tick
fires at the earliest (``_expire``): a new deadline earlier than its next wake re-arms it,
any other costs a push and a compare, so no timer is created or cancelled per request in
the common case. A deadline fires no earlier than due and at most about 1 ms late
(uvloop's timer resolution) plus event-loop lag. Entries of finished streams are void
and dropped lazily (from the top at each wake, all at once when the heap outgrows twice
its live entries: ``_compact``). Fault delays and retry backoffs (rare) are event-loop
timers; the ``_Resilience`` state of a stream is made only when one happens.

Metrics: as HTTP/1.1 (``inputs.metrics``), ``request_protocol`` ``http2`` or ``grpc``,
``response_code`` the HTTP status sent (200 for gRPC, whose status travels in
``grpc-status``: ARCHITECTURE.md has no label for it, so none is added).

Mirrors (``RequestMirror``): fire and forget, ``host``/``:authority`` + ``-shadow`` as
Envoy and Istio do; over HTTP/2 (``_H2Mirror``) for gRPC or an HTTP/2 mirror backend,
else over HTTP/1.1 with the HTTP/1.1 driver's ``_Mirror``. A mirror never holds the main
request back (bounded buffer while connecting, abandoned when blocked, failing or slow).
"""

from __future__ import annotations

import asyncio
import logging
import time
from heapq import heapify, heappop, heappush
from time import perf_counter as _clock  # uvloop's loop.time() counts milliseconds

from nodeagent.proxy.l7 import http1, translate
from nodeagent.proxy.l7.context import ConnContext, L7Inputs
from nodeagent.proxy.l7.errors import (FLAGS, GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE, grpc_error,
                                       grpc_message_encode, grpc_status_for_http, http_status_for_grpc)
from nodeagent.proxy.l7.grpc import non_grpc_reply, request_timeout, with_timeout
from nodeagent.proxy.l7.headers import prepare_request, prepare_response
from nodeagent.proxy.l7.http1 import LocalProtocolError
from nodeagent.proxy.l7.http2 import (CANCEL, DEFAULT_LIMITS, NO_ERROR, ConnectionTerminated, Data, EndOfMessage,
                                      Http2Limits, ProtocolError, RequestHead, ResponseHead, ServerConnection,
                                      StreamReset, Writable)
from nodeagent.proxy.l7.lb import LEAST_REQUEST, endpoint_key
from nodeagent.proxy.l7.metrics import NO_FLAGS
from nodeagent.proxy.l7.pool import (IDEMPOTENT, ConnectFailed, PoolOverflow, UpstreamConn, closed_before_sending,
                                     died_stale)
from nodeagent.proxy.l7.pool_h2 import H2Pool, H2Upstream, flush, speaks_h2
from nodeagent.proxy.l7.resilience import (CONNECT_FAILURE, REFUSED_STREAM, RESET, TIMEOUT, retry_after_seconds,
                                           reinstate, retry_after_value, source_key)
from nodeagent.proxy.l7.routing import UNKNOWN_SERVICE, RequestInfo, RouteDecision
from nodeagent.proxy.l7.shared import DriverLifecycle, labels_for, listen

log = logging.getLogger(__name__)

RETRY_BUFFER = 64 * 1024  # request body bytes kept to replay a refused stream

_K_H2, _K_H1 = 1, 2
_MIN_WAKE = 0.001  # s: the event loop's timer resolution (uvloop counts milliseconds)
_COMPACT_MIN = 256  # deadline entries a connection keeps before dropping finished streams' ones


def serve_http2(transport: asyncio.Transport, first_bytes: bytes, ctx: ConnContext, inputs: L7Inputs,
                *, limits: Http2Limits = DEFAULT_LIMITS) -> "Http2Proxy":
    """Take over an accepted transport whose first bytes were detected as HTTP/2 (see module doc)."""
    proto = Http2Proxy(inputs, ctx, limits)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    transport.resume_reading()
    if first_bytes:
        proto.data_received(first_bytes)
    return proto


def _h2pool(inputs: L7Inputs) -> H2Pool:
    pool = inputs.h2pool
    if pool is None:  # an L7Inputs built by hand: share the HTTP/1.1 pool's connector
        pool = inputs.h2pool = H2Pool(inputs.pool.connector, inputs.limits)
    return pool


class Http2Proxy(DriverLifecycle, asyncio.Protocol):
    """The client side of one proxied HTTP/2 connection (the downstream protocol)."""

    name = "http2"  # DriverLifecycle's log prefix

    def __init__(self, inputs: L7Inputs, ctx: ConnContext, limits: Http2Limits = DEFAULT_LIMITS) -> None:
        self.inputs = inputs
        self.ctx = ctx
        self.h2pool = _h2pool(inputs)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self.codec = ServerConnection(limits, clock=time.monotonic)
        self.streams: dict[int, _Stream] = {}
        self.write_paused = False
        self.lost = False
        self.closing = False
        self.reported = False
        self.draining = False
        self.had_request = False
        self.started = 0.0
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        # when the tick fires (``_clock``); 0.0 while no deadline may move it (inside the tick,
        # closing): a deadline earlier than this re-arms it (``schedule``)
        self.wake_at = 0.0
        self.tick_every = 1.0
        # the streams' deadlines: a heap of (when, seq, stream, attribute) — ``attribute``
        # names the _Stream field holding ``when`` (``deadline``, ``bdeadline``, ``tdeadline``);
        # an entry whose stream finished or whose field changed since is void
        self.deadlines: list = []
        self.seq = 0
        self.compact_at = _COMPACT_MIN
        self.requests = 0
        self._labels: dict = {}
        self._out: list[bytes] = []
        self._dirty = False
        self.rx = 0  # bytes read from the client (the connection's TCP metrics)
        self.tx = 0  # bytes written to the client

    # ================================================================ asyncio (client side)
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        lim = self.inputs.limits
        transport.set_write_buffer_limits(lim.write_buffer_high, lim.write_buffer_low)
        self.started = self.idle_since = _clock()
        self.write(self.codec.data_to_send())  # our SETTINGS and connection WINDOW_UPDATE
        timeouts = [t for t in (lim.header_timeout, lim.idle_timeout, lim.stream_idle_timeout) if t]
        self.tick_every = max(0.05, min(timeouts) / 2)
        self.wake_at = self.started + self.tick_every
        self.timer = self.loop.call_later(self.tick_every, self._tick)

    def data_received(self, data: bytes) -> None:
        self.rx += len(data)
        if self.closing:
            return
        batch = self.h2pool.batch
        batch.depth += 1
        try:
            self._received(data)
        finally:
            batch.end()

    def _received(self, data: bytes) -> None:
        codec = self.codec
        for ev in codec.receive_data(data):
            t = type(ev)
            if t is Data:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.req_data(ev.data, ev.end_stream)
                else:  # a stream we are done with: nobody else acknowledges it
                    self.write(codec.consumed(ev.stream_id, len(ev.data)))
            elif t is RequestHead:
                self._request(ev)
            elif t is EndOfMessage:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.req_end(ev.trailers)
            elif t is StreamReset:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.client_reset()
            elif t is Writable:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.down_writable()
            elif t is ProtocolError:
                log.debug("http2: %s: stream %d: %s", self.ctx.src_ip, ev.stream_id, ev.reason)
                st = self.streams.get(ev.stream_id)
                if st is not None:  # e.g. malformed trailers: the codec reset the stream
                    st.client_reset("DPE")
                    continue
                self.inputs.metrics.observe(self.ctx.labels._replace(request_protocol="http2"), ev.status,
                                            ev.flag, 0.0, 0, 0)
                if self.inputs.access_log is not None:
                    self.inputs.access_log.http_error(self.ctx, ev.status, ev.flag, "HTTP/2")
            elif t is ConnectionTerminated:
                self._terminated(ev)
            if self.closing:
                return
        self.write(codec.data_to_send())
        if codec.closed:
            self._close()

    def eof_received(self) -> bool:
        # no half-close in HTTP/2: close ourselves (a tunnel stream transport does not on False)
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._stop_timer()
        for st in list(self.streams.values()):
            st.client_gone()
        self.deadlines.clear()
        self._maybe_done()

    def pause_writing(self) -> None:
        # the client does not read: stop reading it too (bounds the ACKs we would owe it)
        # and stop taking upstream bytes for its streams (each checks write_paused)
        self.write_paused = True
        if not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closing:
            self.transport.resume_reading()
        for st in list(self.streams.values()):
            st.down_writable()

    # ================================================================ control
    def drain(self) -> None:
        """Graceful: GOAWAY(NO_ERROR); open streams finish, new ones are refused; then close."""
        if self.closing:
            return
        self.draining = True
        self.write(self.codec.drain())
        if not self.streams:
            self._close()

    # ================================================================ internals
    def write(self, out: bytes) -> None:
        """Write now, or at the end of the read being handled (``pool_h2.WriteBatch``): the
        frames of every stream produced by one read share one writev."""
        if out and not self.lost:
            self.tx += len(out)
            self.h2pool.batch.write(self, out)

    def _terminated(self, ev: ConnectionTerminated) -> None:
        if ev.remote and not ev.error_code and not self.codec.closed:
            self.draining = True  # the client's graceful GOAWAY: finish what is open
            if not self.streams:
                self._close()
            return
        log.debug("http2: connection from %s terminated: %s", self.ctx.src_ip, ev.reason)
        for st in list(self.streams.values()):
            st.client_gone()
        self._close()

    def _close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._stop_timer()
        self.write(self.codec.close(NO_ERROR, "closing") if not self.codec.closed else self.codec.data_to_send())
        flush(self)
        self.transport.close()

    def _maybe_done(self) -> None:
        if self.reported or not self.lost or self.streams:
            return
        self._report_done()

    def stream_done(self, st: "_Stream") -> None:
        self.streams.pop(st.sid, None)
        if self.lost:
            self._maybe_done()
            return
        if not self.streams:
            self.idle_since = _clock()
            if self.draining:
                self._close()

    # ---------------------------------------------------------------- the clock: one timer, deadlines on a heap
    def _stop_timer(self) -> None:
        self.wake_at = 0.0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def schedule(self, when: float, st: "_Stream", attr: str) -> None:
        """A deadline of ``st`` (``_clock`` seconds, also in its field ``attr``): the tick fires
        for it, moved earlier only when it is the earliest (one compare otherwise)."""
        self.seq += 1
        dl = self.deadlines
        heappush(dl, (when, self.seq, st, attr))
        if when < self.wake_at:
            self.timer.cancel()
            self.wake_at = when
            self.timer = self.loop.call_later(max(when - _clock(), _MIN_WAKE), self._tick)
        if len(dl) > self.compact_at:
            self._compact()

    def _compact(self) -> None:
        """Drop the entries of finished streams (most of them: a stream usually ends long
        before its deadlines): amortized O(1) per entry, the heap stays O(streams open)."""
        dl = self.deadlines
        dl[:] = [e for e in dl if not e[2].finished]  # in place: _expire may be iterating it
        heapify(dl)
        self.compact_at = 2 * len(dl) + _COMPACT_MIN

    def _expire(self, now: float) -> None:
        """Every deadline due by ``now``, in order: the route / gRPC deadline and the backend
        request timeout end the stream (504 UT, DEADLINE_EXCEEDED), the per-try timeout its try."""
        dl = self.deadlines
        while dl and dl[0][0] <= now:
            when, _, st, attr = heappop(dl)
            if st.finished or getattr(st, attr) != when:
                continue  # void: answered, retried, or done
            setattr(st, attr, 0.0)
            if attr == "tdeadline":
                st._per_try_timeout()
            else:
                st.on_timeout()
            if self.closing:
                return

    def _arm_tick(self, now: float) -> None:
        """The next tick: ``tick_every`` from now, or the earliest pending deadline if sooner
        (void entries on top are dropped on the way)."""
        wake = now + self.tick_every
        dl = self.deadlines
        while dl:
            when, _, st, attr = dl[0]
            if not st.finished and getattr(st, attr) == when:
                if when < wake:
                    wake = when
                break
            heappop(dl)
        self.wake_at = wake
        self.timer = self.loop.call_later(max(wake - now, _MIN_WAKE), self._tick)

    def _tick(self) -> None:
        """The connection's one timer: every half of the smallest timeout (header, idle, stream
        idle: each at most one tick late), or sooner for the earliest stream deadline (no
        earlier than due, at most about 1 ms late — the event loop's timer resolution — plus
        event-loop lag)."""
        self.timer = None
        self.wake_at = 0.0  # deadlines scheduled while the tick runs are in _arm_tick's choice
        if self.closing:
            return
        now = _clock()
        dl = self.deadlines
        if dl and dl[0][0] <= now:
            self._expire(now)
            if self.closing:
                return
        lim = self.inputs.limits
        if not self.streams:
            if not self.had_request:
                if now - self.started >= lim.header_timeout:
                    log.debug("http2: %s sent no request within %.1fs", self.ctx.src_ip, lim.header_timeout)
                    return self._close()
            elif lim.idle_timeout and now - self.idle_since >= lim.idle_timeout:
                return self._close()
        elif lim.stream_idle_timeout:
            for st in list(self.streams.values()):
                if st.activity != st.mark:
                    st.mark = st.activity
                    st.since = now
                elif now - st.since >= lim.stream_idle_timeout:
                    st.local("UT" if st.req_done else "SI")
        if not self.closing:
            self._arm_tick(now)

    # ---------------------------------------------------------------- a request
    def _request(self, head: RequestHead) -> None:
        self.had_request = True
        self.requests += 1
        st = self.streams[head.stream_id] = _Stream(self, head)
        ctx = self.ctx
        router = ctx.router
        proto = "grpc" if head.grpc else "http2"
        if router is None:
            ep = ctx.endpoint
            if ep is None:
                st.labels = labels_for(self._labels, ctx, None, None, proto)
                st.direct(UNKNOWN_SERVICE)
                return
            st.labels = labels_for(self._labels, ctx, None, ep, proto)
            path, headers = head.path, head.headers
            if ctx.gate_for is not None:
                gated = self._gate(st, ep, head.method, path, head.authority, headers)
                if gated is None:
                    return
                path, headers = gated
            st.arm_deadline(None)
            if not st.finished:
                st.dispatch(ep, self._upstream_head(head, path, head.authority, headers, None),
                            self.inputs.routes.default_pool_limits(), "", True)
            return
        if router.producer is None and not router.consumers:
            d = router.default  # no route attached: skip building the match input
        else:
            d = router.match(RequestInfo(head.method, head.path, head.headers, head.authority, head.grpc,
                                         scheme=ctx.scheme, source_namespace=ctx.source_namespace,
                                         source_ip=ctx.src_ip, dst_ip=ctx.dst_ip, dst_port=ctx.dst_port))
        if type(d) is not RouteDecision:
            st.labels = labels_for(self._labels, ctx, None, None, proto)
            st.direct(d)
            return
        st.decision = d
        table = ctx.table
        dest = self.inputs.routes.destination(table, d.backend)
        if dest is not None or table.faults:
            self._resilient(st, head, d, dest, proto)
            return
        self._forward(st, head, d, proto)

    def _forward(self, st: "_Stream", head: RequestHead, d: RouteDecision, proto: str) -> None:
        """Pick the endpoint of a routed request and send it (after the resilience checks)."""
        ctx = self.ctx
        backend = d.backend
        bal = self.inputs.lb.get(backend)
        dest = st.dest
        if dest is not None:
            o = dest.outlier
            if o is not None and o.next_review:  # ejections that ended are reviewed first
                now = _clock()
                if now >= o.next_review:
                    reinstate(bal, o.review(now))
        ep = bal.pick(head.headers, ctx.src_ip)
        if ep is None:
            st.labels = labels_for(self._labels, ctx, backend, None, proto)
            st.local("UH")
            return
        if bal.policy == LEAST_REQUEST:
            st.balancer = bal
        st.labels = labels_for(self._labels, ctx, backend, ep, proto)
        target, new_auth, headers = d.rewrite_request(head.path, head.authority, head.headers)
        if ctx.gate_for is not None:  # a same-node destination with request checks: as it will see it
            gated = self._gate(st, ep, head.method, target, new_auth, headers)
            if gated is None:
                return
            if st.retry is not None:  # a retry's endpoint is gated too
                res = st.retry_state()
                res.pre = (target, new_auth, headers)
                res.gated = gated
            target, headers = gated
        st.arm_deadline(d.timeouts)
        if st.finished:
            return
        up_head = self._upstream_head(head, target, new_auth, headers,
                                      head.authority if new_auth != head.authority else None)
        if d.mirrors:
            st.start_mirrors(d.mirrors, up_head)
            if st.pending:  # the body that arrived during a fault delay
                st.feed_mirrors(st.pending)
        st.dispatch(ep, up_head, self.inputs.routes.pool_limits(ctx.table, backend), backend.hostname,
                    head.grpc or speaks_h2(backend.port.app_protocol))

    # ---------------------------------------------------------------- resilience (TrafficPolicy, FaultInjection)
    def _resilient(self, st: "_Stream", head: RequestHead, d: RouteDecision, dest, proto: str) -> None:
        """The slow path of a routed request whose destination has a resilience policy
        (``dest``) or whose route/Service may have a FaultInjection: fault (delay, abort),
        rate limit, circuit breaker, then ``_forward``. The fault's draws (``inputs.random``)
        are made only when a FaultInjection applies."""
        table = self.ctx.table
        fault = table.fault_for(d) if table.faults else None
        if dest is None and fault is None:
            self._forward(st, head, d, proto)
            return
        if dest is not None:
            st.dest = dest
            st.retry = dest.policy.retry
        if fault is not None:
            rnd = self.inputs.random
            fd = fault.decide(head.headers, rnd(), rnd())
            if fd.delay:
                if dest is not None:
                    dest.faults_delayed_total += 1
                st.labels = labels_for(self._labels, self.ctx, d.backend, None, proto)  # until an endpoint is picked
                st.flag = "DI"  # the flag of the response if nothing else goes wrong
                st.pending = []  # the body waits (unacknowledged: flow-controlled) for the delay
                st.retry_state().timer = self.loop.call_later(fd.delay, self._delayed, st, head, d, fd, proto)
                return
            if fd.aborts:
                self._fault_abort(st, fd)
                return
        self._admit(st, head, d, proto)

    def _delayed(self, st: "_Stream", head: RequestHead, d: RouteDecision, fd, proto: str) -> None:
        st.res.timer = None
        if st.finished:
            return
        if fd.aborts:  # delay, then abort (Envoy: both may fire)
            self._fault_abort(st, fd)
            return
        self._admit(st, head, d, proto)

    def _fault_abort(self, st: "_Stream", fd) -> None:
        dest = st.dest
        if dest is not None:
            dest.faults_aborted_total += 1
        st.labels = labels_for(self._labels, self.ctx, st.decision.backend, None, "grpc" if st.grpc else "http2")
        if st.grpc:
            code = fd.abort_grpc if fd.abort_grpc >= 0 else grpc_status_for_http(fd.abort_status)
            st.local("FI", None, "fault filter abort", grpc_status=code)
            return
        status = fd.abort_status
        if not status:  # only a grpcStatus configured, asked by a client that is not gRPC
            status = http_status_for_grpc(fd.abort_grpc)
        if not 200 <= status <= 599 or status in (204, 304):
            status = 503  # a local reply needs a status with a body (the control plane checks it too)
        st.local("FI", status, "fault filter abort")

    def _admit(self, st: "_Stream", head: RequestHead, d: RouteDecision, proto: str) -> None:
        """The destination's local rate limit (429 RL) and ``maxRequests`` (503 UO)."""
        dest = st.dest
        if dest is not None:
            if dest.policy.rate is not None:
                wait = dest.rate_limit(source_key(self.ctx.labels), _clock())
                if wait > 0:
                    st.labels = labels_for(self._labels, self.ctx, d.backend, None, proto)
                    st.local("RL", 429, "local rate limit", ((b"retry-after", retry_after_value(wait)),))
                    return
            if not dest.admit():
                st.labels = labels_for(self._labels, self.ctx, d.backend, None, proto)
                st.local("UO", 503, f"too many requests to {d.backend.hostname} (connectionPool.maxRequests)")
                return
            st.admitted = True  # request_done() when the stream finishes, however
        self._forward(st, head, d, proto)

    def _upstream_head(self, head: RequestHead, path: bytes, authority: bytes, headers: list,
                       forwarded_host: bytes | None) -> RequestHead:
        ctx = self.ctx
        headers, _rid = prepare_request(headers, client=ctx.src_ip, proto=ctx.scheme, forwarded_host=forwarded_host,
                                        new_id=self.inputs.request_ids)
        return RequestHead(0, head.method, head.scheme or b"http", authority, path, headers, head.end_stream,
                           head.content_length, head.grpc)


_RETRY_REASONS = {CONNECT_FAILURE: "connect_failure", RESET: "reset", TIMEOUT: "per_try_timeout",
                  REFUSED_STREAM: "refused_stream"}


class _Resilience:
    """What a stream needs once it is delayed by a fault or retried (made then:
    ``_Stream.retry_state``; a stream answered at its first try has none): the delay or
    backoff timer, the endpoints tried, the retries made. ``dest``: the
    ``resilience.DestinationState`` (None when only a FaultInjection applies)."""

    __slots__ = ("dest", "tried", "retries", "timer", "retry_active", "failed", "pre", "gated")

    def __init__(self, dest) -> None:
        self.dest = dest
        self.tried: set = set()  # endpoint keys
        self.retries = 0
        self.timer: asyncio.TimerHandle | None = None  # the fault delay, then a retry's backoff
        self.retry_active = False  # counted by dest.may_retry(): retry_done() when that try ends
        self.failed = False  # the last try failed in a retriable way and got no retry (URX)
        self.pre = None  # (target, authority, headers) before the gate: a retry's endpoint is gated too
        self.gated = None  # what the first endpoint's gate made of them

    def pick(self, bal, headers, source_ip: str, now: float):
        """A retry's endpoint: ejections that ended are reviewed first; one not tried yet when
        the balancer has one."""
        dest = self.dest
        if dest is not None:
            o = dest.outlier
            if o is not None and o.next_review and now >= o.next_review:
                reinstate(bal, o.review(now))
        ep = bal.pick(headers, source_ip)
        if ep is not None:
            tried = self.tried
            k = endpoint_key(ep)
            if k in tried:
                for c in bal.candidates():
                    ck = endpoint_key(c)
                    if ck not in tried:
                        ep, k = c, ck
                        break
            tried.add(k)
        return ep

    def try_ended(self) -> None:
        if self.retry_active:
            self.retry_active = False
            self.dest.retry_done()

    def close(self, flag: str) -> str:
        """The stream finished: the timer and the retry count released; the flag for the metrics."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.try_ended()
        if self.retries and self.failed and flag != "DC":
            return "URX"
        return flag


class _Stream:
    """One request stream through the proxy: the owner of its upstream stream or connection."""

    __slots__ = ("down", "sid", "head", "grpc", "decision", "balancer", "endpoint", "labels", "kind", "up",
                 "usid", "fut", "pending", "held_req", "held_resp", "up_paused", "resp_started", "resp_ended",
                 "status", "flag", "req_bytes", "resp_bytes", "req_done", "finished", "deadline", "bdeadline",
                 "tdeadline", "backend_timeout", "retry_body", "retried", "started", "activity", "mark", "since",
                 "up_head", "limits", "service", "mirrors", "up_ended", "dest", "retry", "admitted", "res", "replay")

    def __init__(self, down: Http2Proxy, head: RequestHead) -> None:
        self.down = down
        self.sid = head.stream_id
        self.head = head
        self.grpc = head.grpc
        self.decision: RouteDecision | None = None
        self.balancer = None
        self.endpoint = None
        self.labels = down.ctx.labels
        self.kind = 0
        self.up: H2Upstream | UpstreamConn | None = None
        self.usid = 0
        self.fut: asyncio.Future | None = None
        self.pending: list | None = None  # request events waiting for the upstream
        self.held_req = 0  # client bytes forwarded, not yet acknowledged to the client
        self.held_resp = 0  # upstream bytes forwarded, not yet acknowledged upstream
        self.up_paused = False  # the HTTP/1.1 upstream's write buffer is above high water
        self.resp_started = False
        self.resp_ended = False
        self.status = 0
        self.flag = NO_FLAGS
        self.req_bytes = 0
        self.resp_bytes = 0
        self.req_done = head.end_stream
        self.finished = False
        # deadlines (``_clock`` seconds, 0.0: none) on the connection's heap (``schedule``): the
        # route timeout or gRPC deadline (the smaller), the backend-request and per-try timeouts
        self.deadline = 0.0
        self.bdeadline = 0.0
        self.tdeadline = 0.0
        self.backend_timeout = 0.0
        self.retry_body: list | None = []  # request pieces kept for one replay
        self.retried = False
        self.started = _clock()
        self.activity = 0
        self.mark = -1
        self.since = 0.0
        self.up_head: RequestHead | None = None
        self.limits = None
        self.service = ""
        self.mirrors: list | None = None
        self.up_ended = False  # the request's END_STREAM went upstream with its last DATA frame
        self.dest = None  # resilience.DestinationState of a destination with a policy
        self.retry = None  # its resilience.RetryPolicy, when it has one
        self.admitted = False  # counted by dest.admit(): request_done() at the end
        self.res: _Resilience | None = None  # made when a fault delays or a retry happens: retry_state()
        self.replay: list | None = None  # request pieces to send again on the next upstream (a retry)

    # ---------------------------------------------------------------- setup
    def arm_deadline(self, timeouts) -> None:
        """Route timeouts (from the request head; from the end of a fault delay); for gRPC the
        smaller of grpc-timeout and the route's request timeout."""
        req = timeouts.request if timeouts is not None else None
        if timeouts is not None and timeouts.backend_request:
            self.backend_timeout = timeouts.backend_request
        if self.grpc:
            req = request_timeout(self.head.headers, req or None)
            if req is not None and req <= 0:
                self.local("UT")
                return
        if req:
            when = self.deadline = (self.started if self.flag != "DI" else _clock()) + req
            self.down.schedule(when, self, "deadline")

    def retry_state(self) -> _Resilience:
        res = self.res
        if res is None:
            res = self.res = _Resilience(self.dest)
        return res

    def _arm_try(self) -> None:
        """A try is dispatched now: its backend-request and per-try deadlines."""
        now = _clock()
        down = self.down
        if self.backend_timeout:
            when = self.bdeadline = now + self.backend_timeout
            down.schedule(when, self, "bdeadline")
        r = self.retry
        if r is not None and r.per_try_timeout:
            when = self.tdeadline = now + r.per_try_timeout
            down.schedule(when, self, "tdeadline")

    def dispatch(self, ep, up_head: RequestHead, limits, service: str, h2: bool) -> None:
        self.endpoint = ep
        self.up_head = up_head
        self.limits = limits
        self.service = service
        self.kind = _K_H2 if h2 else _K_H1
        r = self.retry
        if not h2 and up_head.method not in IDEMPOTENT and (r is None or not r.non_idempotent):
            self.retry_body = None  # RFC 9112 9.3.1: never replayed over HTTP/1.1 (unless retryNonIdempotent)
        if self.balancer is not None:
            self.balancer.on_request_start(ep)  # in flight from now until _finish
        if self.backend_timeout or (r is not None and r.per_try_timeout):
            self._arm_try()
        self._acquire(None)

    def _acquire(self, avoid) -> None:
        """``avoid``: the HTTP/2 connection not to use; for HTTP/1.1, any (a retry): no idle one."""
        down = self.down
        try:
            if self.kind == _K_H2:
                r = down.h2pool.acquire(self.endpoint, self.limits, self.service, down.ctx, avoid)
            else:
                r = down.inputs.pool.acquire(self.endpoint, self.limits, self, self.service, down.ctx,
                                             avoid is not None)
        except PoolOverflow as exc:
            self.local("UO", None, str(exc))
            return
        if isinstance(r, asyncio.Future):
            self.fut = r
            if self.pending is None:
                self.pending = []
            r.add_done_callback(self._on_conn)
            return
        self._attach(r, False)

    def _on_conn(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None and (self.finished or fut is not self.fut):
            conn = fut.result()
            if self.kind == _K_H2:
                conn.unreserve()
            else:
                self.down.inputs.pool.release(conn)
            return
        if self.finished:
            return
        self.fut = None
        if exc is not None:
            flag = getattr(exc, "flag", "UF")
            if flag == "UF" and self.dest is not None and self._try_failed(CONNECT_FAILURE):
                return
            self.local(flag, None, str(exc) if isinstance(exc, (ConnectFailed, PoolOverflow)) else None)
            return
        conn = fut.result()
        if conn.closed:
            if self.kind == _K_H2:
                conn.unreserve()
            reply = closed_before_sending(conn)
            if reply[0] == "UC" and self.dest is not None and self._try_failed(CONNECT_FAILURE):
                return
            self.local(*reply)
            return
        self._attach(conn, True)

    def _attach(self, conn, reserved: bool) -> None:
        """Send the head (and what arrived meanwhile) on the upstream connection."""
        if self.kind == _K_H2 and conn.codec.capacity <= 0:
            # the peer lowered SETTINGS_MAX_CONCURRENT_STREAMS (or sent GOAWAY) since the slot
            # was handed out: queue again, elsewhere
            if reserved:
                conn.unreserve()
            self._acquire(conn)
            return
        head = self.up_head
        if self.grpc and self.deadline:
            remaining = self.deadline - _clock()
            if remaining <= 0:
                if self.kind == _K_H2:
                    conn.unreserve() if reserved else None
                else:
                    self.down.inputs.pool.release(conn)
                self.local("UT")
                return
            head = RequestHead(0, head.method, head.scheme, head.authority, head.path,
                               with_timeout(head.headers, remaining), head.end_stream, head.content_length, head.grpc)
        try:
            if self.kind == _K_H2:
                self.usid = conn.open(self, head, reserved)
            else:
                conn.owner = self
                out = conn.codec.send_request(translate.h2_request_to_h1(head))
                if head.end_stream:  # no body: the request is complete (b""), the connection reusable
                    conn.codec.send_end()
        except LocalProtocolError as exc:  # a filter produced an invalid head
            log.warning("http2: cannot forward request: %s", exc)
            if self.kind == _K_H1:  # (open() took a reserved HTTP/2 slot even though it raised)
                self.down.inputs.pool.discard(conn)
            self.up = None
            self.local("UPE", 500, "invalid request after filters")
            return
        self.up = conn
        if self.kind == _K_H1:
            conn.transport.write(out)
        pending, self.pending = self.pending, None
        replay, self.replay = self.replay, None
        if replay:  # a retry: the request kept so far, then what arrived since
            pending = replay + (pending or [])
        if pending:
            last = len(pending) - 1
            if self.kind == _K_H2 and last > 0 and pending[last] == [] and type(pending[last - 1]) is bytes:
                # the body ended without trailers while we waited: its END_STREAM goes with
                # the last DATA frame
                data = pending[last - 1]
                pending = pending[:last - 1]
            else:
                data = None
            for piece in pending:
                if type(piece) is bytes:
                    self._up_send(piece)
                else:
                    self._up_end(piece)
            if data is not None:
                conn.send_data(self.usid, data, True)
        if self.kind == _K_H1 and self.down.write_paused:
            conn.pause_reading()
        self.release_req()

    # ---------------------------------------------------------------- mirrors
    def start_mirrors(self, backends, up_head: RequestHead) -> None:
        """Fire-and-forget copies: over HTTP/2 (``_H2Mirror``) when the request is gRPC or the
        mirror backend speaks HTTP/2, else with the HTTP/1.1 driver's ``_Mirror``."""
        from nodeagent.proxy.l7.http1_proxy import _Mirror
        down = self.down
        for backend in backends:
            ep = down.inputs.lb.get(backend).pick(up_head.headers, down.ctx.src_ip)
            if ep is None:
                continue
            h2 = self.grpc or speaks_h2(backend.port.app_protocol)
            shadow = RequestHead(0, up_head.method, up_head.scheme, up_head.authority + b"-shadow", up_head.path,
                                 up_head.headers, up_head.end_stream, up_head.content_length, up_head.grpc)
            m = _H2Mirror(down, shadow) if h2 else _Mirror(down, translate.h2_request_to_h1(shadow))
            if self.mirrors is None:
                self.mirrors = []
            self.mirrors.append(m)
            m.start(ep, down.inputs.routes.pool_limits(down.ctx.table, backend), backend.hostname)

    # ---------------------------------------------------------------- request (client -> upstream)
    def req_data(self, data: bytes, end: bool = False) -> None:
        """A piece of the request body (``end``: the last one, no trailers: req_end follows)."""
        n = len(data)
        self.req_bytes += n
        self.activity += 1
        if self.mirrors:
            for m in self.mirrors:
                m.data(data)
        down = self.down
        if self.finished:
            down.write(down.codec.consumed(self.sid, n))
            return
        body = self.retry_body
        if body is not None:  # kept for a retry (each takes a snapshot: ``replay``)
            if self.req_bytes <= RETRY_BUFFER:
                body.append(data)
            else:
                self.retry_body = None
        self.held_req += n
        if self.up is None:
            self.pending.append(data)
            return
        if end and self.kind == _K_H2:  # one DATA frame with END_STREAM instead of two
            self.up.send_data(self.usid, data, True)
            self.up_ended = True
        else:
            self._up_send(data)
        self.release_req()

    def req_end(self, trailers) -> None:
        self.req_done = True
        self.activity += 1
        if self.mirrors:
            for m in self.mirrors:
                m.end(trailers)
        if self.finished or self.head.end_stream:  # a head with END_STREAM went upstream as such
            return
        trailers = list(trailers)
        if self.retry_body is not None:
            self.retry_body.append(trailers)
        if self.up_ended:  # went with the last DATA frame
            return
        if self.up is None:
            if self.pending is not None:
                self.pending.append(trailers)
            return
        self._up_end(trailers)

    def _up_send(self, data: bytes) -> None:
        up = self.up
        if self.kind == _K_H2:
            up.send_data(self.usid, data)
        else:
            up.transport.write(up.codec.send_data(data))

    def _up_end(self, trailers) -> None:
        up = self.up
        if self.kind == _K_H2:
            up.send_end(self.usid, trailers)
        else:
            out = up.codec.send_end(trailers)
            if out:
                up.transport.write(out)

    def _up_blocked(self) -> bool:
        if self.kind == _K_H2:
            return self.up.blocked(self.usid)
        return self.up_paused

    def release_req(self) -> None:
        """Acknowledge held client bytes once the upstream took them (reopens the client's window)."""
        if self.held_req and self.up is not None and not self._up_blocked():
            n, self.held_req = self.held_req, 0
            down = self.down
            down.write(down.codec.consumed(self.sid, n))

    # ---------------------------------------------------------------- response (upstream -> client)
    def _down_blocked(self) -> bool:
        down = self.down
        return down.write_paused or down.codec.blocked(self.sid)

    def down_writable(self) -> None:
        """The client stream (or transport) drained: take upstream bytes again."""
        if self.finished or self._down_blocked():
            return
        up = self.up
        if up is None:
            return
        if self.kind == _K_H2:
            if self.held_resp:
                n, self.held_resp = self.held_resp, 0
                up.consumed(self.usid, n)
        else:
            up.resume_reading()

    def _resp_head(self, status: int, headers: list, end_stream: bool) -> None:
        if self.dest is not None and self._check_head(status, headers, end_stream):
            return  # retried: this answer is dropped
        self.retry_body = None  # answered: never retried, the replay copy can go
        down = self.down
        headers = prepare_response(headers)
        if self.grpc:
            reply = non_grpc_reply(status, headers)
            if reply is not None:
                self._abandon_upstream(CANCEL)
                down.write(down.codec.send_response(self.sid, 200, reply[1:], end_stream=True))
                self.resp_started = True
                self._finish(200, "UPE")
                return
        d = self.decision
        if d is not None and d.filters.response_ops:
            headers = d.rewrite_response_headers(headers)
        self.status = status
        self.resp_started = True
        try:
            down.write(down.codec.send_response(self.sid, status, headers, end_stream=end_stream))
        except LocalProtocolError as exc:
            log.debug("http2: bad response head from upstream: %s", exc)
            self.resp_started = False
            self.local("UPE", 502, "invalid response from upstream")
            return
        self.resp_ended = end_stream

    def _resp_data(self, data: bytes, end: bool = False) -> None:
        """A piece of the response body (``end``: the last, without trailers, in the same frame)."""
        self.resp_bytes += len(data)
        down = self.down
        down.write(down.codec.send_data(self.sid, data, end_stream=end))
        if end:
            self.resp_ended = True

    def _resp_end(self, trailers) -> None:
        down = self.down
        if not self.resp_ended:
            try:
                down.write(down.codec.send_end(self.sid, trailers))
            except LocalProtocolError as exc:  # invalid trailers from the upstream
                log.debug("http2: bad trailers from upstream: %s", exc)
                down.write(down.codec.reset(self.sid, CANCEL))
                self._abandon_upstream(CANCEL)
                self._finish(self.status, "UPE")
                return
        self.resp_ended = True
        self._done_ok()

    # HTTP/2 upstream events (pool_h2 owner protocol)
    def up2_event(self, up: H2Upstream, ev) -> None:
        if self.finished or up is not self.up:
            return
        self.activity += 1
        t = type(ev)
        if t is Data:
            self._resp_data(ev.data, ev.end_stream)
            if self._down_blocked():
                self.held_resp += len(ev.data)
            else:
                up.consumed(self.usid, len(ev.data))
        elif t is ResponseHead:
            if not ev.informational:
                self._resp_head(ev.status, ev.headers, ev.end_stream)
        elif t is EndOfMessage:
            self._resp_end(ev.trailers)
        elif t is Writable:
            self.release_req()
        elif t is StreamReset:
            self.up = None  # the pool forgot the stream
            if ev.retryable and self._retry(up):
                return
            if not self.resp_started:
                if self.dest is not None and self._try_failed(REFUSED_STREAM if ev.retryable else RESET):
                    return
                self.local("UC", 503, f"upstream reset the stream (error code {ev.error_code})")
            elif ev.error_code == NO_ERROR and self.resp_ended:
                self._done_ok()
            else:
                self._reset_client()
        elif t is ProtocolError:
            up.done(self.usid)
            self.up = None
            self.local(ev.flag, ev.status, ev.reason)

    def up2_lost(self, up: H2Upstream, retryable: bool) -> None:
        if self.finished or up is not self.up:
            return
        self.up = None
        if up.lost_flag == "RBAC" and not self.resp_started:  # the destination's AuthorizationPolicy said no
            self.local("RBAC")
            return
        if retryable and self._retry(up):
            return
        if not self.resp_started:
            if self.dest is not None and self._try_failed(REFUSED_STREAM if retryable else RESET):
                return
            self.local("UC", 503, "upstream connection closed before the response")
        else:
            self._reset_client()

    def up2_writable(self, up: H2Upstream, writable: bool) -> None:
        if writable and up is self.up:
            self.release_req()

    def _retry(self, up: H2Upstream) -> bool:
        """Once, on another connection, when nothing was answered and the body so far is kept."""
        if self.retried or self.resp_started or self.retry_body is None or self.finished:
            return False
        self.retried = True
        self.replay = list(self.retry_body)
        log.debug("http2: retrying stream %d on another connection", self.sid)
        self._acquire(up)
        return True

    # HTTP/1.1 upstream events (pool owner protocol)
    def up_events(self, conn: UpstreamConn, events: list) -> None:
        if self.finished or conn is not self.up:
            return
        self.activity += 1
        for ev in events:
            t = type(ev)
            if t is http1.Data:
                self._resp_data(ev.data)
            elif t is http1.ResponseHead:
                if ev.status < 200:
                    continue
                try:
                    status, headers = translate.h1_response_to_h2(ev)
                except translate.TranslationError:
                    self.local("UPE", 502, "upstream switched protocols")
                    return
                self._resp_head(status, headers, False)
                if conn is not self.up:  # retried (or answered locally): the rest is not ours
                    return
            elif t is http1.EndOfMessage:
                self._resp_end(ev.trailers)
                return
            elif t is http1.ProtocolError or t is http1.Upgrade:
                if t is http1.ProtocolError and ev.flag == "UC" and (
                        self._retry_stale(conn)
                        or (self.dest is not None and not self.resp_started and self._try_failed(RESET))):
                    return
                self.local(getattr(ev, "flag", "UPE"), getattr(ev, "status", 502), getattr(ev, "reason", None))
                return
            if self.finished:
                return
        if not self.finished and self._down_blocked():
            conn.pause_reading()

    def up_raw(self, conn, data) -> None:  # pragma: no cover - no upgrade is requested over HTTP/2
        conn.close()

    up_raw_eof = up_raw

    def up_lost(self, conn: UpstreamConn, exc) -> None:
        if self.finished or conn is not self.up:
            return
        if getattr(exc, "response_flags", "") == "RBAC":  # the destination's AuthorizationPolicy said no
            self.up = None
            self.local("RBAC")
            return
        if self._retry_stale(conn):
            return
        self.up = None
        if not self.resp_started:
            if self.dest is not None and self._try_failed(RESET):
                return
            self.local("UC", 503, "upstream connection reset before the response" if exc is not None
                       else "upstream closed the connection before responding")
        else:
            self._reset_client()

    def _retry_stale(self, conn: UpstreamConn) -> bool:
        """Once, on a new HTTP/1.1 connection, when ``conn`` came from the pool and died before
        one byte of the response (``pool.died_stale``), the method is idempotent (``retry_body``
        is None otherwise), the request was read to its end within ``RETRY_BUFFER`` and nothing
        was answered. The route and backend timers keep running: the retry fits in them."""
        if (self.retried or self.retry_body is None or self.finished or self.resp_started or not self.req_done
                or not died_stale(conn)):
            return False
        self.retried = True
        self.up = None
        self.up_paused = False
        down = self.down
        down.inputs.pool.discard(conn)
        down.inputs.metrics.retry("stale_keepalive")
        self.replay = list(self.retry_body)
        log.debug("http2: reused HTTP/1.1 upstream connection of stream %d closed first: retrying", self.sid)
        self._acquire(conn)  # a new connection (pool: fresh), the body replayed by _attach
        return True

    def up_pause_writing(self, conn) -> None:
        self.up_paused = True

    def up_resume_writing(self, conn) -> None:
        self.up_paused = False
        self.release_req()

    # ---------------------------------------------------------------- resilience: tries and retries
    def feed_mirrors(self, pieces: list) -> None:
        """Request pieces that arrived before the mirrors started (a fault delay)."""
        for m in self.mirrors:
            for piece in pieces:
                if type(piece) is bytes:
                    m.data(piece)
                else:
                    m.end(piece)

    def _per_try_timeout(self) -> None:
        self.tdeadline = 0.0
        if self.finished or self.resp_started:
            return
        if self._try_failed(TIMEOUT):
            return
        self.local("UT")

    def _try_ended(self) -> None:
        self.tdeadline = 0.0  # the per-try timeout is over
        res = self.res
        if res is not None:
            res.try_ended()

    def _observe(self, status: int) -> None:
        """Outlier detection: the outcome of the try at ``endpoint`` (an HTTP status, 0: no
        answer); an ejected endpoint is marked unhealthy in the balancer."""
        dest = self.dest
        o = dest.outlier
        ep = self.endpoint
        if o is None or ep is None or (status and status < 500 and not o.records):
            return  # (a success with no errors on record changes nothing)
        backend = self.decision.backend
        if dest.observe(endpoint_key(ep), status, len(backend.endpoints), _clock()):
            self.down.inputs.lb.get(backend).set_healthy(ep, False)
            log.info("http2: outlier detection ejected %s:%d of %s", ep.address, ep.port, backend.hostname)

    def _try_failed(self, reason: str) -> bool:
        """A try ended without an answer (``reason``: resilience.CONNECT_FAILURE, RESET,
        TIMEOUT, REFUSED_STREAM): outlier detection counts it, and it is retried when the
        policy allows (True: the retry is under way; False: the caller answers the client)."""
        if self.finished:
            return False
        self._try_ended()
        self._observe(0)
        r = self.retry
        if r is None or not r.retriable_failure(reason):
            if self.res is not None:
                self.res.failed = False
            return False
        return self._retry_policy(_RETRY_REASONS[reason], None)

    def _check_head(self, status: int, headers: list, end_stream: bool) -> bool:
        """The response head of a try: outlier detection counts it (a gRPC trailers-only
        UNAVAILABLE as a 503), and a retriable one is retried when the policy allows (True)."""
        self._try_ended()
        grpc_code = -1
        if self.grpc and end_stream and status == 200:  # trailers-only: its grpc-status is the answer
            for n, v in headers:
                if n == b"grpc-status":
                    grpc_code = int(v) if v.isdigit() and len(v) < 4 else -1
                    break
        self._observe(503 if grpc_code == GRPC_UNAVAILABLE else status)
        r = self.retry
        if r is None:
            return False
        if r.retriable_status(status):
            reason = "5xx" if status >= 500 else "status"
        elif grpc_code >= 0 and r.retriable_grpc(grpc_code):
            reason = "grpc"
        else:
            if self.res is not None:
                self.res.failed = False
            return False
        return self._retry_policy(reason, retry_after_seconds(headers))

    def _retry_policy(self, reason: str, retry_after: float | None) -> bool:
        """Retry a failed try (the TrafficPolicy's ``retries``) when: the method may be retried,
        the whole request was read and kept (``RETRY_BUFFER``), nothing was answered, retries
        are left, the backoff allows it (a long Retry-After does not) and so does the budget.
        The try is dropped (its upstream stream reset, or its HTTP/1.1 connection closed) and
        the next one goes, after the backoff, to an endpoint not tried yet when there is one."""
        res = self.res
        r = self.retry
        retries = res.retries if res is not None else 0
        down = self.down
        if (self.resp_started or not self.req_done or self.retry_body is None or retries >= r.attempts
                or not r.method_ok(self.head.method, self.grpc)):
            delay = None
        else:
            delay = r.backoff(retries + 1, down.inputs.random(), retry_after)
        if delay is None or not self.dest.may_retry():
            if res is not None:
                res.failed = True  # URX, as a retry was made
            return False
        res = self.retry_state()
        res.failed = False
        res.retries += 1
        res.retry_active = True  # until that try ends (try_ended)
        if self.endpoint is not None:
            res.tried.add(endpoint_key(self.endpoint))
        self.dest.count_retry(reason)
        down.inputs.metrics.retry(reason)
        self._abandon_upstream(CANCEL)
        self.bdeadline = 0.0  # the backend timeout is per try
        self.pending = None  # all of it is in retry_body (the request was read to its end)
        self.up_paused = False
        self.held_resp = 0
        self.up_ended = False
        self.status = 0
        log.debug("http2: stream %d: retry %d (%s) in %.3fs", self.sid, res.retries, reason, delay)
        res.timer = down.loop.call_later(delay, self._retry_now)
        return True

    def _retry_now(self) -> None:
        res = self.res
        res.timer = None
        if self.finished:
            return
        down = self.down
        ctx = down.ctx
        d = self.decision
        ep = res.pick(down.inputs.lb.get(d.backend), self.head.headers, ctx.src_ip, _clock())
        if ep is None:
            self.local("UH")
            return
        up_head = self.up_head
        if ctx.gate_for is not None and res.pre is not None:  # the new endpoint's request checks too
            target, authority, headers = res.pre
            gated = down._gate(self, ep, self.head.method, target, authority, headers)
            if gated is None:
                return  # answered
            if gated != res.gated:
                head = self.head
                up_head = down._upstream_head(head, gated[0], authority, gated[1],
                                              head.authority if authority != head.authority else None)
        if self.balancer is not None:
            self.balancer.on_request_end(self.endpoint)  # dispatch counts the new one
        self.replay = list(self.retry_body)
        self.labels = labels_for(down._labels, ctx, d.backend, ep, "grpc" if self.grpc else "http2")
        self.dispatch(ep, up_head, self.limits, self.service, self.kind == _K_H2)

    # ---------------------------------------------------------------- outcomes
    def direct(self, d) -> None:
        """A routing decision that is not a forward: a redirect or an error."""
        down = self.down
        codec = down.codec
        if self.grpc:  # trailers-only with the decision's own gRPC status
            flag = d.flag or NO_FLAGS
            down.write(codec.send_response(self.sid, 200, grpc_error(flag, d.grpc_status, d.message or None)[1:],
                                           end_stream=True))
        elif d.location is not None:
            headers = [(n, v) for n, v in d.headers if n not in (b"content-length", b"connection")]
            down.write(codec.send_response(self.sid, d.status, headers, end_stream=True))
            flag = NO_FLAGS
        else:
            self.local(d.flag, d.status, d.message or None)
            return
        self.resp_started = True
        if not self.req_done:
            down.write(codec.reset(self.sid, NO_ERROR))
        self._finish(200 if self.grpc else d.status, flag)

    def local(self, flag: str, status: int | None = None, message: str | None = None,
              extra: tuple[tuple[bytes, bytes], ...] = (), grpc_status: int | None = None) -> None:
        """A proxy-made reply (trailers-only for gRPC, with ``grpc_status`` or the flag's), or an
        end/reset once the response started."""
        if self.finished:
            return
        self._abandon_upstream(CANCEL)
        down = self.down
        if down.lost:
            self._finish(0, flag)
            return
        codec = down.codec
        if self.resp_started:
            if self.grpc and flag == "UT" and not self.resp_ended:
                down.write(codec.send_end(self.sid, [
                    (b"grpc-status", b"%d" % GRPC_DEADLINE_EXCEEDED),
                    (b"grpc-message", grpc_message_encode("deadline exceeded (proxy)"))]))
                self._finish(self.status, flag)
                if not self.req_done:
                    down.write(codec.reset(self.sid, NO_ERROR))
                return
            self._reset_client(flag)
            return
        down.write(codec.send_local_reply(self.sid, flag, status, message, extra, grpc_status))
        self.resp_started = True
        self._finish(200 if self.grpc else (status if status is not None else FLAGS[flag].status), flag)

    def _reset_client(self, flag: str = "UC") -> None:
        down = self.down
        down.write(down.codec.reset(self.sid, CANCEL))
        self._abandon_upstream(CANCEL)
        self._finish(self.status, flag)

    def on_timeout(self) -> None:
        self.deadline = self.bdeadline = 0.0
        if self.dest is not None and not self.resp_started and (self.up is not None or self.fut is not None):
            self._observe(0)  # the endpoint did not answer in time
        self.local("UT")

    def client_reset(self, flag: str = "DC") -> None:
        """The client reset the stream (or the codec did): drop the upstream side."""
        self._abandon_upstream(CANCEL)
        self._drop_mirrors()
        self._finish(self.status, flag)

    def client_gone(self) -> None:
        self._abandon_upstream(CANCEL)
        self._drop_mirrors()
        self._finish(self.status, "DC")

    def _drop_mirrors(self) -> None:
        if self.mirrors and not self.req_done:
            for m in self.mirrors:
                m.kill()

    def _abandon_upstream(self, code: int) -> None:
        fut, self.fut = self.fut, None
        if fut is not None:
            fut.cancel()
        up, self.up = self.up, None
        if up is None:
            return
        if self.kind == _K_H2:
            up.done(self.usid, code)
        else:
            self.down.inputs.pool.discard(up)

    def _done_ok(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            if self.kind == _K_H2:
                # the response is complete: a request still streaming is not wanted any more
                up.done(self.usid, None if self.req_done else CANCEL)
            else:
                self.down.inputs.pool.release(up)
        down = self.down
        if not self.req_done:  # RFC 9113 8.1: stop sending, without error
            down.write(down.codec.reset(self.sid, NO_ERROR))
        self._finish(self.status, self.flag)

    def _finish(self, status: int, flag: str) -> None:
        if self.finished:
            return
        self.finished = True  # its deadlines are void (the connection's heap drops them lazily)
        if self.balancer is not None and self.kind:
            self.balancer.on_request_end(self.endpoint)
            self.balancer = None
        res = self.res
        if res is not None:
            flag = res.close(flag)
        if self.admitted:
            self.admitted = False
            self.dest.request_done()
        down = self.down
        down.inputs.metrics.observe(self.labels, status, flag, _clock() - self.started, self.req_bytes,
                                    self.resp_bytes)
        if down.inputs.access_log is not None:
            down.inputs.access_log.http2(self, status, flag)
        down.stream_done(self)


class _H2Mirror:
    """A fire-and-forget copy of one request over HTTP/2 (``pool_h2`` owner); its response is
    read and dropped, and it never holds the main request back: abandoned when its buffer
    (while connecting) is over ``mirror_buffer``, when its stream is blocked, on any failure
    and after ``mirror_timeout``."""

    __slots__ = ("down", "head", "up", "usid", "fut", "pending", "held", "dead", "timer")

    def __init__(self, down: Http2Proxy, head: RequestHead) -> None:
        self.down = down
        self.head = head
        self.up: H2Upstream | None = None
        self.usid = 0
        self.fut: asyncio.Future | None = None
        self.pending: list | None = []
        self.held = 0
        self.dead = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self, ep, limits, service: str) -> None:
        down = self.down
        self.timer = down.loop.call_later(down.inputs.limits.mirror_timeout, self.kill)
        try:
            r = down.h2pool.acquire(ep, limits, service, down.ctx)
        except PoolOverflow:
            self.kill()
            return
        if isinstance(r, asyncio.Future):
            self.fut = r
            r.add_done_callback(self._on_conn)
        else:
            self._attach(r, False)

    def _on_conn(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        self.fut = None
        if fut.exception() is not None:
            self.kill()
            return
        conn = fut.result()
        if self.dead or conn.closed:
            conn.unreserve()
            self.kill()
            return
        self._attach(conn, True)

    def _attach(self, conn: H2Upstream, reserved: bool) -> None:
        if conn.codec.capacity <= 0:
            if reserved:
                conn.unreserve()
            self.kill()
            return
        try:
            self.usid = conn.open(self, self.head, reserved)
        except LocalProtocolError:
            self.kill()
            return
        self.up = conn
        pending, self.pending = self.pending, None
        for piece in pending:
            if type(piece) is bytes:
                conn.send_data(self.usid, piece)
            else:
                conn.send_end(self.usid, piece)

    def data(self, data: bytes) -> None:
        if self.dead:
            return
        up = self.up
        if up is None:
            self.held += len(data)
            if self.held > self.down.inputs.limits.mirror_buffer:
                self.kill()
            else:
                self.pending.append(data)
            return
        if up.blocked(self.usid):
            self.kill()  # a slow mirror must never hold the main request back
            return
        up.send_data(self.usid, data)

    def end(self, trailers) -> None:
        if self.dead or self.head.end_stream:
            return
        if self.up is None:
            self.pending.append(list(trailers))
        else:
            self.up.send_end(self.usid, list(trailers))

    def up2_event(self, up: H2Upstream, ev) -> None:
        t = type(ev)
        if t is Data:
            up.consumed(self.usid, len(ev.data))
        elif t is EndOfMessage:
            self.up = None
            up.done(self.usid)
            self.kill()
        elif t is StreamReset or t is ProtocolError:
            self.up = None  # the codec already reset or forgot the stream
            if t is ProtocolError:
                up.done(self.usid)
            self.kill()

    def up2_lost(self, up: H2Upstream, retryable: bool) -> None:
        self.up = None
        self.kill()

    def up2_writable(self, up: H2Upstream, writable: bool) -> None:
        pass

    def kill(self) -> None:
        """Abandon the mirror (its failure is nobody's problem)."""
        self.dead = True
        self.pending = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        fut, self.fut = self.fut, None
        if fut is not None:
            fut.cancel()
        up, self.up = self.up, None
        if up is not None:
            up.done(self.usid, CANCEL)


async def listen_http2(inputs: L7Inputs, snapshot, host: str, port: int, *, dst: tuple[str, int],
                       reporter: str = "source", on_done=lambda driver: None, backlog: int = 1024,
                       limits: Http2Limits = DEFAULT_LIMITS):
    """A plain HTTP/2 (prior knowledge) listener treating every connection as captured for
    ``dst`` (a Service VIP:port of ``snapshot()``): the driver without capture, for tests
    and benchmarks."""
    def serve(transport, first, ctx, inputs):
        return serve_http2(transport, first, ctx, inputs, limits=limits)
    return await listen(serve, inputs, snapshot, host, port, dst=dst, reporter=reporter, on_done=on_done,
                        backlog=backlog)
