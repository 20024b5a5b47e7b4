"""Upstream HTTP/2 connections: streams multiplexed over a few connections per endpoint.

``H2Pool.acquire(endpoint, limits, service, conn, avoid=None)`` returns at once

* an ``H2Upstream`` with free stream capacity (the hot path: no task, no future), or
* an ``asyncio.Future`` resolving to one (a new dial, or a place in the endpoint's queue
  when every connection is at its peer's SETTINGS_MAX_CONCURRENT_STREAMS) — ``cancel()``
  it when the stream is no longer wanted — or it
* raises ``PoolOverflow`` (flag ``UO``) when the queue (``max_pending``) is full.

Then ``up.open(owner, head)`` -> upstream stream id, and the owner drives the stream with
``send_data`` / ``send_end`` / ``reset`` / ``consumed`` (each writes what the codec made).
Dial failures reach the future as ``ConnectFailed`` (flag ``UF``), as in ``pool``.

Connections per endpoint: at most ``min(max_connections, MAX_H2_CONNECTIONS)`` (HTTP/2
multiplexes; a few connections spread the load of a busy endpoint over several TCP
flows); a new one is dialed only when every open one is at capacity. A connection that
received GOAWAY (or whose codec died) takes no new streams and is closed once its last
stream ended; idle connections (no stream) are closed after ``idle_timeout`` by one
sweeper per pool. ``avoid``: never hand out that connection (retrying a refused stream
"on another connection").

The owner of a stream receives its events (``http2.ClientConnection`` events)::

    owner.up2_event(up, ev)        # ResponseHead, Data, EndOfMessage, StreamReset,
                                   # Writable, ProtocolError of its stream
    owner.up2_lost(up, retryable)  # the connection died (retryable: the peer never saw it)
    owner.up2_writable(up, bool)   # the transport's write buffer crossed high/low water

The connector is the one of ``pool`` (``connector(endpoint, DialContext, factory)``):
dials go through it only (the mTLS tunnel plugs in there). As in ``pool``: pools are keyed
by ``(address, port)`` plus ``partition(endpoint, conn)`` when given (a tunnel stream
authenticates one source workload, so its connection carries only that client's
streams), and a connector may set ``H2Upstream.reuse_ok`` (``() -> bool``): once False
the connection takes no new streams and closes when its last one ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable

from nodeagent.proxy.l7.context import L7Limits, PoolLimits
from nodeagent.proxy.l7.detect import _FIXED, HTTP2_PRIOR_KNOWLEDGE
from nodeagent.proxy.l7.http2 import (DEFAULT_LIMITS, ConnectionTerminated, Http2Limits, ClientConnection,
                                      RequestHead, StreamReset)
from nodeagent.proxy.l7.pool import Connector, DialContext, PoolOverflow, connect_error, endpoint_name, sweep_interval
from nodeagent.state import Endpoint

log = logging.getLogger(__name__)

MAX_H2_CONNECTIONS = 4


def speaks_h2(app_protocol: str | None) -> bool:
    """A Service port whose ``appProtocol`` says HTTP/2 (http2, h2c, grpc, kubernetes.io/h2c)."""
    return _FIXED.get((app_protocol or "").strip().lower()) is HTTP2_PRIOR_KNOWLEDGE


class H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to an upstream and the owners of its streams."""

    __slots__ = ("ep", "codec", "transport", "owners", "closed", "write_paused", "idle_since", "read_paused", "reserved",
                 "_out", "_dirty", "reuse_ok", "opened", "lost_flag")

    def __init__(self, ep: "H2EndpointPool", limits: Http2Limits) -> None:
        self.ep = ep
        self.codec = ClientConnection(limits, clock=time.monotonic)
        self.transport: asyncio.Transport | None = None
        self.owners: dict[int, Any] = {}
        self.closed = False
        self.lost_flag = ""  # the flag the transport's end carried (a tunnel reset: RBAC when denied)
        self.write_paused = False
        self.read_paused = False
        self.idle_since = time.monotonic()
        self.reserved = 0  # slots handed to waiting streams that have not opened yet
        self._out: list[bytes] = []
        self._dirty = False
        self.reuse_ok: Any = None  # a connector's () -> bool: False = take no new streams (tunnel rules)
        self.opened = 0  # streams opened (a fresh connection is not judged by reuse_ok)

    # -------------------------------------------------------------- asyncio
    def connection_made(self, transport) -> None:
        self.transport = transport
        lim = self.ep.pool.limits
        transport.set_write_buffer_limits(lim.write_buffer_high, lim.write_buffer_low)
        transport.write(self.codec.data_to_send())  # preface + SETTINGS

    def data_received(self, data: bytes) -> None:
        batch = self.ep.pool.batch
        batch.depth += 1
        try:
            self._received(data)
        finally:
            batch.end()

    def _received(self, data: bytes) -> None:
        codec = self.codec
        events = codec.receive_data(data)
        self._write(codec.data_to_send())
        owners = self.owners
        for ev in events:
            t = type(ev)
            if t is ConnectionTerminated:
                self._terminated(ev)
                continue
            sid = getattr(ev, "stream_id", None)
            owner = owners.get(sid) if sid is not None else None
            if owner is None:
                continue
            if t is StreamReset:
                self._release(sid)  # the codec forgot the stream
            owner.up2_event(self, ev)
        self._write(codec.data_to_send())
        if codec.closed:
            self.close()
            return
        self.ep.capacity_changed(self)

    def eof_received(self) -> bool:
        # HTTP/2 has no half-close: close (a tunnel stream transport does not close on False)
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_flag = getattr(exc, "response_flags", "")
        self.ep.forget(self)
        owners, self.owners = self.owners, {}
        for owner in owners.values():
            owner.up2_lost(self, False)

    def pause_writing(self) -> None:
        self.write_paused = True
        for owner in list(self.owners.values()):
            owner.up2_writable(self, False)

    def resume_writing(self) -> None:
        self.write_paused = False
        for owner in list(self.owners.values()):
            owner.up2_writable(self, True)

    def _terminated(self, ev: ConnectionTerminated) -> None:
        """GOAWAY (graceful: the listed streams finish) or a dead connection (they fail)."""
        self.ep.forget(self)
        if ev.remote and not ev.error_code and not self.codec.closed:
            return
        owners, self.owners = self.owners, {}
        for sid, owner in owners.items():
            owner.up2_lost(self, sid > ev.last_stream_id)

    # -------------------------------------------------------------- streams
    def unreserve(self) -> None:
        """Give back a slot handed out through a future without opening a stream."""
        if self.reserved:
            self.reserved -= 1
            self.ep.capacity_changed(self)

    def open(self, owner: Any, head: RequestHead, reserved: bool = False) -> int:
        """Open a stream for ``head`` (``reserved``: on a slot handed out through a future).

        The reserved slot is taken even when the codec refuses the head (``LocalProtocolError``
        propagates): the caller must not ``unreserve()`` it then."""
        if reserved and self.reserved:
            self.reserved -= 1
        sid = self.codec.send_request(head)
        self.opened += 1
        self.owners[sid] = owner
        self._write(self.codec.data_to_send())
        return sid

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self._write(self.codec.send_data(sid, data, end_stream=end_stream))

    def send_end(self, sid: int, trailers=()) -> None:
        self._write(self.codec.send_end(sid, trailers))

    def consumed(self, sid: int, n: int) -> None:
        self._write(self.codec.consumed(sid, n))

    def blocked(self, sid: int) -> bool:
        return self.write_paused or self.codec.blocked(sid)

    def done(self, sid: int, reset: int | None = None) -> None:
        """The owner is finished with stream ``sid`` (``reset``: RST_STREAM with that code first)."""
        if reset is not None:
            self._write(self.codec.reset(sid, reset))
        self._release(sid)

    def _release(self, sid: int) -> None:
        if self.owners.pop(sid, None) is None:
            return
        if not self.owners:
            self.idle_since = time.monotonic()
            if not self.codec.reusable or self not in self.ep.conns:  # GOAWAY'd or retired: closed once idle
                self.close()
                return
        self.ep.capacity_changed(self)

    def _write(self, out: bytes) -> None:
        if out and not self.closed:
            self.ep.pool.batch.write(self, out)

    @property
    def capacity(self) -> int:
        if self.closed or self.transport is None:
            return 0
        return self.codec.capacity - self.reserved

    def peer_draining(self) -> None:
        """The tunnel carrying this connection is going away (GOAWAY): no new streams; the
        open ones finish, then it closes (now, when there are none)."""
        self.ep.forget(self)
        if not self.owners:
            self.close()

    def close(self) -> None:
        self.ep.forget(self)
        if not self.closed and self.transport is not None:
            flush(self)
            self.closed = True
            self.transport.close()


class WriteBatch:
    """Output held while one read is handled (HTTP/2 connections of one loop, both sides).

    A read from a client can open a hundred streams toward one upstream connection and a
    read from an upstream can finish a hundred responses: their frames are held and each
    connection written once (one writev) when the outermost ``data_received`` returns —
    synchronously, so flow control (write-buffer high water) still sees every byte at
    once. Outside a read (timers, dial callbacks) writes go straight to the transport.
    """

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list = []

    def write(self, conn, out: bytes) -> None:
        """``conn`` (``transport``, ``_out``, ``_dirty``): write ``out`` now, or hold it until ``end``."""
        if self.depth:
            conn._out.append(out)
            if not conn._dirty:
                conn._dirty = True
                self.dirty.append(conn)
        else:
            conn.transport.write(out)

    def end(self) -> None:
        self.depth -= 1
        if self.depth:
            return
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                flush(conn)


def flush(conn) -> None:
    """Write what ``WriteBatch.write`` held for ``conn`` (before closing it, too)."""
    conn._dirty = False
    out = conn._out
    if out:
        conn._out = []
        if not conn.transport.is_closing():
            conn.transport.writelines(out)


class H2EndpointPool:
    """The HTTP/2 connections to one endpoint, the dials in progress and the waiting streams."""

    __slots__ = ("pool", "endpoint", "limits", "conns", "dialing", "waiters", "dial", "key")

    def __init__(self, pool: "H2Pool", endpoint: Endpoint, limits: PoolLimits, key: tuple) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.key = key
        self.limits = limits
        self.conns: list[H2Upstream] = []
        self.dialing = 0
        self.waiters: deque[tuple[asyncio.Future, Any]] = deque()
        self.dial = DialContext(limits.connect_timeout)

    @property
    def max_connections(self) -> int:
        return max(1, min(self.limits.max_connections, MAX_H2_CONNECTIONS))

    def pick(self, avoid: Any = None) -> H2Upstream | None:
        best = None
        for c in list(self.conns):
            if c.opened and c.reuse_ok is not None and not c.reuse_ok():  # retired: streams finish, no new ones
                self.conns.remove(c)
                if not c.owners and not c.reserved:
                    c.close()
                continue
            if c is not avoid and c.capacity > 0 and (best is None or len(c.owners) < len(best.owners)):
                best = c
        return best

    def forget(self, conn: H2Upstream) -> None:
        """``conn`` takes no new streams (GOAWAY, dead, closing)."""
        try:
            self.conns.remove(conn)
        except ValueError:
            return
        self.serve()

    def capacity_changed(self, conn: H2Upstream) -> None:
        if self.waiters:
            self.serve()

    def serve(self) -> None:
        """Hand connections with capacity to waiting streams; dial when all are full."""
        waiters = self.waiters
        while waiters:
            fut, avoid = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            c = self.pick(avoid)
            if c is not None:
                waiters.popleft()
                c.reserved += 1  # until the owner opens its stream (or gives the slot back)
                c.idle_since = time.monotonic()
                fut.set_result(c)
                continue
            if self.dialing == 0 and len(self.conns) < self.max_connections:
                self.pool._dial(self)
            break
        if not self.conns and not self.dialing and not waiters:
            self.pool._drop(self)


class H2Pool:
    """Every endpoint's HTTP/2 connections of one proxy (one event loop)."""

    def __init__(self, connector: Connector, limits: L7Limits, h2_limits: Http2Limits = DEFAULT_LIMITS, *,
                 partition: Callable[[Endpoint, Any], Any] | None = None) -> None:
        self.connector = connector
        self.partition = partition
        self.limits = limits
        self.h2_limits = h2_limits
        self._pools: dict[tuple[str, int], H2EndpointPool] = {}
        self._dials: set[asyncio.Task] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.dialed = 0
        self.batch = WriteBatch()

    def acquire(self, endpoint: Endpoint, limits: PoolLimits, service: str = "", conn: Any = None,
                avoid: Any = None) -> H2Upstream | asyncio.Future:
        key = (endpoint.address, endpoint.port)
        if self.partition is not None:  # connections that must not be shared between clients
            key = key + (self.partition(endpoint, conn),)
        ep = self._pools.get(key)
        if ep is None:
            ep = self._pools[key] = H2EndpointPool(self, endpoint, limits, key)
        else:
            ep.limits = limits
        if not ep.waiters:
            c = ep.pick(avoid)
            if c is not None:
                return c
        if len(ep.waiters) >= limits.max_pending:
            raise PoolOverflow(f"upstream {key[0]}:{key[1]}: {len(ep.conns)} HTTP/2 connections at their "
                               f"stream limit and {len(ep.waiters)} streams pending")
        fut = asyncio.get_running_loop().create_future()
        ep.waiters.append((fut, avoid))
        # the connection is shared by many clients' streams: the latest caller's context dials
        ep.dial = DialContext(limits.connect_timeout, self.limits.socket_mark, service, conn)
        ep.serve()
        return fut

    def _dial(self, ep: H2EndpointPool) -> None:
        ep.dialing += 1
        self.dialed += 1
        task = asyncio.get_running_loop().create_task(self._connect(ep))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _connect(self, ep: H2EndpointPool) -> None:
        endpoint = ep.endpoint
        dial = ep.dial
        try:
            _, up = await self.connector(endpoint, dial, lambda: H2Upstream(ep, self.h2_limits))
        except asyncio.CancelledError:
            ep.dialing -= 1
            raise
        except Exception as exc:
            ep.dialing -= 1
            err = connect_error(endpoint, exc)
            waiters, ep.waiters = ep.waiters, deque()
            for fut, _ in waiters:  # every stream waiting on this endpoint learns the dial failed
                if not fut.done():
                    fut.set_exception(err)
            ep.serve()
            return
        ep.dialing -= 1
        if up.closed:  # gone before we got it (connection_lost already ran)
            ep.serve()
            return
        ep.conns.append(up)
        up.idle_since = time.monotonic()
        if self._sweeper is None:
            self._arm_sweeper()
        ep.serve()

    def _drop(self, ep: H2EndpointPool) -> None:
        if self._pools.get(ep.key) is ep:
            del self._pools[ep.key]

    # ------------------------------------------------------------------ idle sweep
    def _arm_sweeper(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(sweep_interval(self.limits), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        left = False
        for ep in list(self._pools.values()):
            for c in list(ep.conns):
                if not c.owners and not c.reserved and now - c.idle_since >= ep.limits.idle_timeout:
                    c.close()
            left = left or bool(ep.conns)
        if left:
            self._arm_sweeper()

    # ------------------------------------------------------------------ introspection / shutdown
    def stats(self) -> dict[str, dict[str, int]]:
        """Per endpoint: connections, dials in progress, open streams, free stream slots and waiting streams."""
        out: dict[str, dict[str, int]] = {}
        for key, ep in self._pools.items():
            out[endpoint_name(key)] = {"connections": len(ep.conns), "dialing": ep.dialing,
                         "streams": sum(len(c.owners) for c in ep.conns),
                         "capacity": sum(c.capacity for c in ep.conns), "pending": len(ep.waiters)}
        return out

    def close(self) -> None:
        """Close idle connections, stop dialing, fail waiting streams (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._dials):
            task.cancel()
        for ep in list(self._pools.values()):
            for c in list(ep.conns):
                if not c.owners:
                    c.close()
            for fut, _ in ep.waiters:
                if not fut.done():
                    fut.cancel()
            ep.waiters.clear()
