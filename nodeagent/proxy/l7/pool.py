"""Upstream HTTP/1.1 connections: keep-alive pool per endpoint, limits, the injected connector.

``UpstreamPool.acquire(endpoint, limits, owner, service, conn)`` returns at once

* an idle ``UpstreamConn`` (the hot path: no task, no future), with ``owner`` set, or
* an ``asyncio.Future`` resolving to an ``UpstreamConn`` (a new dial, or a place in the
  endpoint's queue of pending requests when ``max_connections`` are busy) — the caller
  sets ``conn.owner`` when it completes and ``cancel()``s it when it no longer wants it;
  a dial that completes for nobody parks its connection in the pool — or it
* raises ``PoolOverflow`` (flag ``UO``) when the queue is full too.

``acquire(..., fresh=True)`` skips the idle stack (a retry after a stale keep-alive
connection died under a request: its idle siblings are as old and likely as dead): a new
dial, or — when ``max_connections`` are busy — the next connection released after a
completed exchange, which is known to be alive.

Dial failures reach the future as ``ConnectFailed`` (flag ``UF``, with the reason:
``connect_timeout``, ``connect_refused``, ``connect_error``).

``release(conn)`` gives a connection back after an exchange: it is kept only when the
codec says ``reusable`` (response complete, request sent, keep-alive on both sides, no
unsolicited bytes, no EOF), it has served fewer than ``max_requests_per_connection`` and
the transport is not closing; every protocol doubt closes it (a close-delimited response,
an early response, a parser error, bytes while idle). A released connection goes to the
oldest waiting request first, else onto the endpoint's idle stack (LIFO: warm
connections are reused, cold ones age out). ``discard(conn)`` closes one mid-exchange.

The owner of a busy connection receives its events (the driver's exchange or mirror)::

    owner.up_events(conn, events)     # http1.ClientConnection events
    owner.up_raw(conn, data) / owner.up_raw_eof(conn)   # after an Upgrade (conn.raw)
    owner.up_lost(conn, exc)          # the transport is gone
    owner.up_pause_writing(conn) / owner.up_resume_writing(conn)   # its write buffer

Idle connections read (so a close or a stray byte is noticed and the connection
dropped); one sweeper timer per pool closes those idle longer than ``idle_timeout``.

The connector: ``connector(endpoint, dial: DialContext, protocol_factory)`` ->
awaitable ``(transport, protocol)``, the shape of ``loop.create_connection``. The default
``tcp_connector`` makes the socket like the L4 relay (non-blocking, ``TCP_NODELAY``,
``SO_MARK`` when configured), dials with ``relay._dial`` (connect timeout included) and
wraps it with ``create_connection(sock=...)``. The mTLS tunnel plugs in here: it gets the
endpoint, the Service and the client's ``ConnContext`` (identity) and returns a transport
of its own. Pools are keyed by ``(address, port)``, plus ``partition(endpoint, conn)``
when one is given: connections that must not be shared between clients (a tunnel stream
authenticates its source workload) live in a pool of their own. A connector may set
``UpstreamConn.reuse_ok`` (a ``() -> bool``): an idle connection for which it returns
False is closed instead of handed out (the tunnel's own age and certificate-rotation
rules). After the upstream's EOF the connection closes its transport itself (a tunnel
stream does not close on the protocol's ``False`` as a socket transport does).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from nodeagent.proxy.l7.context import L7Limits, PoolLimits
from nodeagent.proxy.l7.http1 import ClientConnection
from nodeagent.proxy.relay import _dial
from nodeagent.state import Endpoint

log = logging.getLogger(__name__)

# RFC 9110 9.2.2; RFC 9112 9.3.1: a client MUST NOT automatically retry any other method
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))



def sweep_interval(limits) -> float:
    """How often a pool looks for idle connections past the idle timeout (both pools)."""
    return max(0.05, min(limits.pool_idle_timeout / 2, 5.0))


def endpoint_name(key: tuple) -> str:
    """A pool key (address, port, partition...) as shown by ``stats()``."""
    return f"{key[0]}:{key[1]}" + "".join(f" {part}" for part in key[2:] if part)

def died_stale(conn: "UpstreamConn") -> bool:
    """``conn`` had served a request before this one (it came back from the pool) and closed
    or reset before one byte of this response: the server timed the idle keep-alive
    connection out as the request went in. The request may be sent again on a new
    connection when it is safe to replay (the driver decides: method, body, client)."""
    return conn.served > 1 and conn.codec.response_untouched


class ConnectFailed(Exception):
    """The upstream could not be reached (flag UF)."""

    flag = "UF"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UpstreamDenied(ConnectFailed):
    """An AuthorizationPolicy of the (same-node) upstream workload denies this client (flag RBAC)."""

    flag = "RBAC"

    def __init__(self) -> None:
        super().__init__("authz_denied", "RBAC: access denied")


class PoolOverflow(Exception):
    """Every connection of the endpoint is busy and its pending queue is full (flag UO)."""

    flag = "UO"


def closed_before_sending(conn: Any) -> tuple[str, int | None, str | None]:
    """The local reply (flag, status, message) for a pooled connection that closed before the
    request went out: 403 RBAC when the destination's AuthorizationPolicy refused it."""
    if getattr(conn, "lost_flag", "") == "RBAC":
        return "RBAC", None, None
    return "UC", 503, "upstream closed the connection before the request was sent"


def connect_error(endpoint: Endpoint, exc: Exception) -> ConnectFailed:
    """The ``ConnectFailed`` (flag UF, or the connector's own) for a connector's exception."""
    if isinstance(exc, ConnectFailed):  # the connector already said why (UpstreamDenied)
        return exc
    where = f"{endpoint.address}:{endpoint.port}"
    if isinstance(exc, TimeoutError):
        return ConnectFailed("connect_timeout", f"upstream connect timeout ({where})")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailed("connect_refused", f"upstream connect refused ({where})")
    log.debug("connect to %s failed: %r", where, exc)
    return ConnectFailed("connect_error", f"upstream connect error ({where})")


@dataclass(frozen=True, slots=True)
class DialContext:
    """What a connector gets besides the endpoint: the timeout, the mark, who is calling."""

    connect_timeout: float
    socket_mark: int = 0
    service: str = ""  # the destination Service's hostname ("" when not a Service)
    conn: Any = None  # the client's ConnContext (source identity for a tunnel)


Connector = Callable[[Endpoint, DialContext, Callable[[], asyncio.Protocol]],
                     Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]]]


async def dialed_socket(address: tuple[str, int], dial: DialContext) -> socket.socket:
    """A connected non-blocking socket to ``address`` made like the L4 relay's (``TCP_NODELAY``,
    ``SO_MARK``), or the dial's exception (TimeoutError, ConnectionRefusedError, OSError)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if dial.socket_mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, dial.socket_mark)
        await _dial(loop, sock, address, dial.connect_timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def tcp_connector(endpoint: Endpoint, dial: DialContext,
                        factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    """Plain TCP, the way the L4 relay dials (see the module doc)."""
    sock = await dialed_socket((endpoint.address, endpoint.port), dial)
    return await asyncio.get_running_loop().create_connection(factory, sock=sock)


class UpstreamConn(asyncio.Protocol):
    """One upstream connection: the codec and whoever uses it now (``owner``)."""

    __slots__ = ("ep_pool", "codec", "transport", "owner", "served", "idle_since", "closed", "raw",
                 "read_paused", "counted", "reuse_ok", "lost_flag")

    def __init__(self, ep_pool: "EndpointPool") -> None:
        self.ep_pool = ep_pool
        self.codec = ClientConnection()
        self.transport: asyncio.Transport | None = None
        self.owner: Any = None
        self.served = 0
        self.idle_since = 0.0
        self.closed = False
        self.lost_flag = ""  # the flag the transport's end carried (a tunnel reset: RBAC when denied)
        self.raw = False  # upgraded: bytes relayed as they are
        self.read_paused = False
        self.counted = True  # counted in ep_pool.total
        self.reuse_ok: Callable[[], bool] | None = None  # set by a connector with reuse rules of its own

    # -------------------------------------------------------------- asyncio
    def connection_made(self, transport) -> None:
        self.transport = transport
        lim = self.ep_pool.pool.limits
        transport.set_write_buffer_limits(lim.write_buffer_high, lim.write_buffer_low)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # idle (or not handed out yet): a 408, garbage, ... never reuse it
            self.close()
            return
        if self.raw:
            owner.up_raw(self, data)
            return
        events = self.codec.receive_data(data)
        if events:
            owner.up_events(self, events)

    def eof_received(self) -> bool:
        owner = self.owner
        if self.raw and owner is not None:
            owner.up_raw_eof(self)
            return True  # half-close: the other direction may still carry bytes
        self.ep_pool.forget(self)
        if owner is not None:
            events = self.codec.receive_eof()
            if events:
                owner.up_events(self, events)
        if not self.closed and self.transport is not None:
            self.transport.close()  # a socket transport would on False; a tunnel stream does not
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_flag = getattr(exc, "response_flags", "")
        self.ep_pool.forget(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.up_lost(self, exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.up_pause_writing(self)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.up_resume_writing(self)

    # -------------------------------------------------------------- helpers
    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def peer_draining(self) -> None:
        """The tunnel carrying this connection is going away (GOAWAY): the exchange in flight
        finishes, then the connection closes; an idle one closes now."""
        self.reuse_ok = _never
        if self.owner is None:
            self.close()

    def close(self) -> None:
        """Close now (no reuse); buffered bytes are dropped."""
        self.ep_pool.forget(self)
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()


def _never() -> bool:
    return False


class EndpointPool:
    """The connections to one endpoint."""

    __slots__ = ("pool", "endpoint", "limits", "idle", "total", "waiters", "key")

    def __init__(self, pool: "UpstreamPool", endpoint: Endpoint, limits: PoolLimits, key: tuple = ()) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.key = key or (endpoint.address, endpoint.port)
        self.limits = limits
        self.idle: list[UpstreamConn] = []
        self.total = 0  # open or dialing
        self.waiters: deque[tuple[asyncio.Future, DialContext]] = deque()

    def forget(self, conn: UpstreamConn) -> None:
        """``conn`` will not be reused (closing or closed): uncount it, serve the queue."""
        if not conn.counted:
            return
        conn.counted = False
        self.total -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self.pool._serve_waiters(self)


class UpstreamPool:
    """Every endpoint's pool of one proxy (one event loop)."""

    def __init__(self, connector: Connector, limits: L7Limits, *,
                 partition: Callable[[Endpoint, Any], Any] | None = None) -> None:
        self.connector = connector
        self.limits = limits
        self.partition = partition
        self._pools: dict[tuple, EndpointPool] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._dials: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first acquire (one loop owns a pool)
        self.dialed = 0  # connections dialed (for tests and /debug)

    # ------------------------------------------------------------------ acquire
    def acquire(self, endpoint: Endpoint, limits: PoolLimits, owner: Any, service: str = "",
                conn: Any = None, fresh: bool = False) -> UpstreamConn | asyncio.Future:
        """See the module doc; ``fresh``: never an idle connection (a retry after a stale one)."""
        key = (endpoint.address, endpoint.port)
        if self.partition is not None:
            key = key + (self.partition(endpoint, conn),)
        ep = self._pools.get(key)
        if ep is None:
            ep = self._pools[key] = EndpointPool(self, endpoint, limits, key)
        else:
            ep.limits = limits
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        idle = ep.idle
        while idle and not fresh:
            c = idle.pop()
            if c.closed or c.transport.is_closing():
                continue
            if c.reuse_ok is not None and not c.reuse_ok():
                c.close()
                continue
            c.owner = owner
            c.served += 1
            return c
        loop = asyncio.get_running_loop()
        if ep.total < limits.max_connections:
            fut = loop.create_future()
            self._dial(ep, fut, DialContext(limits.connect_timeout, self.limits.socket_mark, service, conn))
            return fut
        if len(ep.waiters) >= limits.max_pending:
            raise PoolOverflow(f"upstream {key[0]}:{key[1]}: {ep.total} connections busy and "
                               f"{len(ep.waiters)} requests pending")
        fut = loop.create_future()
        ep.waiters.append((fut, DialContext(limits.connect_timeout, self.limits.socket_mark, service, conn)))
        return fut

    def _dial(self, ep: EndpointPool, fut: asyncio.Future, dial: DialContext) -> None:
        ep.total += 1
        self.dialed += 1
        task = asyncio.get_running_loop().create_task(self._connect(ep, fut, dial))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _connect(self, ep: EndpointPool, fut: asyncio.Future, dial: DialContext) -> None:
        endpoint = ep.endpoint
        try:
            transport, conn = await self.connector(endpoint, dial, lambda: UpstreamConn(ep))
        except asyncio.CancelledError:
            ep.total -= 1
            if not fut.done():
                fut.cancel()
            raise
        except Exception as exc:
            ep.total -= 1
            err = connect_error(endpoint, exc)
            if not fut.done():
                fut.set_exception(err)
            self._serve_waiters(ep)
            return
        conn.served = 1
        if fut.done():  # nobody wants it any more: park it
            conn.served = 0
            self.release(conn)
        else:
            fut.set_result(conn)

    def _serve_waiters(self, ep: EndpointPool) -> None:
        """A slot became free: dial for the oldest waiting request."""
        waiters = ep.waiters
        while waiters and ep.total < ep.limits.max_connections:
            fut, dial = waiters.popleft()
            if not fut.done():
                self._dial(ep, fut, dial)
        if not ep.total and not ep.waiters and self._pools.get(ep.key) is ep:
            del self._pools[ep.key]

    # ------------------------------------------------------------------ release
    def release(self, conn: UpstreamConn) -> None:
        """Give ``conn`` back after an exchange (kept only if clean and reusable)."""
        conn.owner = None
        ep = conn.ep_pool
        lim = ep.limits
        if (conn.closed or not conn.codec.reusable or conn.raw or conn.transport.is_closing()
                or (conn.reuse_ok is not None and not conn.reuse_ok())
                or (lim.max_requests_per_connection and conn.served >= lim.max_requests_per_connection)):
            conn.close()
            return
        conn.resume_reading()
        waiters = ep.waiters
        while waiters:
            fut, _ = waiters.popleft()
            if not fut.done():
                conn.served += 1
                fut.set_result(conn)
                return
        conn.idle_since = (self._loop or asyncio.get_running_loop()).time()
        ep.idle.append(conn)
        if self._sweeper is None:
            self._arm_sweeper()

    def discard(self, conn: UpstreamConn) -> None:
        """Close a connection mid-exchange (its owner gave up)."""
        conn.owner = None
        conn.close()

    # ------------------------------------------------------------------ idle sweep
    def _arm_sweeper(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(sweep_interval(self.limits), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        any_idle = False
        for ep in list(self._pools.values()):
            deadline = now - ep.limits.idle_timeout
            for c in [c for c in ep.idle if c.idle_since <= deadline]:
                c.close()
            any_idle = any_idle or bool(ep.idle)
        if any_idle:
            self._arm_sweeper()

    # ------------------------------------------------------------------ introspection / shutdown
    def stats(self) -> dict[str, dict[str, int]]:
        """Per endpoint: open (incl. dialing), idle and pending counts."""
        out: dict[str, dict[str, int]] = {}
        for key, ep in self._pools.items():
            out[endpoint_name(key)] = {"total": ep.total, "idle": len(ep.idle), "pending": len(ep.waiters)}
        return out

    def close(self) -> None:
        """Close every idle connection and stop dialing (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._dials):
            task.cancel()
        for ep in list(self._pools.values()):
            for c in list(ep.idle):
                c.close()
            for fut, _ in ep.waiters:
                if not fut.done():
                    fut.cancel()
            ep.waiters.clear()
