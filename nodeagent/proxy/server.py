"""The node proxy's listeners behind one start / drain / close.

Outbound (15001) and inbound (15006) always; with workload certificates
(``ProxyInputs.identities``) also the node-addressed mTLS tunnel listener (15008), whose
connections are served by the inbound side's ``TunnelServer``. When a snapshot changes
what authorization decisions depend on (``authz.authz_epoch``), both listeners re-check
their relayed connections to local workloads and close those no longer allowed. A drain
ends by flushing the access log (bounded: ``ACCESS_LOG_FLUSH``).
"""

from __future__ import annotations

import asyncio
import socket

from nodeagent.proxy.authz import authz_epoch
from nodeagent.proxy.inbound import InboundProxy
from nodeagent.proxy.listener import INBOUND_PORT, OUTBOUND_PORT, ProxyInputs
from nodeagent.proxy.outbound import OutboundProxy
from nodeagent.proxy.tunnel import TunnelListener

ACCESS_LOG_FLUSH = 2.0  # seconds a drain waits for the access log's queued lines to be written


class NodeProxy:
    """The outbound (15001), inbound (15006) and tunnel (15008) listeners sharing one ``ProxyInputs``."""

    def __init__(self, inputs: ProxyInputs, *, host: str = "0.0.0.0",
                 outbound_port: int = OUTBOUND_PORT, inbound_port: int = INBOUND_PORT,
                 tunnel_port: int | None = None) -> None:
        self.inputs = inputs
        self.outbound = OutboundProxy(inputs, host, outbound_port)
        self.inbound = InboundProxy(inputs, host, inbound_port)
        self.tunnel: TunnelListener | None = None
        if self.inbound.tunnel is not None:
            self.tunnel = TunnelListener(self.inbound.tunnel, host,
                                         inputs.tunnel_port if tunnel_port is None else tunnel_port)
        self._configured = {"outbound": f"{host}:{outbound_port}", "inbound": f"{host}:{inbound_port}"}
        if self.tunnel is not None:
            self._configured["tunnel"] = f"{host}:{self.tunnel.port}"
        self._authz_epoch = authz_epoch(inputs.state.snapshot)
        inputs.state.subscribe(self._snapshot_applied)

    def _snapshot_applied(self, snapshot) -> None:
        epoch = authz_epoch(snapshot)
        if epoch == self._authz_epoch:
            return
        self._authz_epoch = epoch
        self.outbound.recheck_authz(snapshot)
        self.inbound.recheck_authz(snapshot)

    async def start(self, inherited: dict[str, list[socket.socket]] | None = None) -> list[asyncio.AbstractServer]:
        """Start the listeners, on the ``inherited`` listening sockets by name where given (a
        hand-off, or a worker's share); if one cannot start, those already started are closed."""
        inherited = inherited or {}
        servers = [await self.outbound.start(inherited.get("outbound"))]
        try:
            servers.append(await self.inbound.start(inherited.get("inbound")))
            if self.tunnel is not None:
                servers.append(await self.tunnel.start(inherited.get("tunnel")))
        except BaseException:
            await asyncio.gather(self.outbound.drain(0), self.inbound.drain(0))
            raise
        return servers

    def listening_sockets(self) -> dict[str, list[socket.socket]]:
        """The listening sockets by listener name (what a hand-off passes on)."""
        out = {"outbound": self.outbound.socks, "inbound": self.inbound.socks}
        if self.tunnel is not None:
            out["tunnel"] = self.tunnel.socks
        return {name: socks for name, socks in out.items() if socks}

    def listener_addresses(self) -> dict[str, str]:
        """name -> "host:port" as configured (what a hand-off compares)."""
        return dict(self._configured)

    def stop_accepting(self) -> None:
        """Close every listening socket (a successor accepts on its copies); connections stay."""
        if self.tunnel is not None:
            self.tunnel.close()
        self.outbound.stop_accepting()
        self.inbound.stop_accepting()

    def connection_counts(self) -> dict[str, int]:
        return {"outbound": self.outbound.active_connections, "inbound": self.inbound.active_connections,
                "tunnel": len(self.inbound.tunnel.connections) if self.inbound.tunnel is not None else 0}

    @property
    def active_connections(self) -> int:
        return self.outbound.active_connections + self.inbound.active_connections

    async def drain(self, grace: float) -> int:
        """Stop accepting everywhere, wait up to ``grace`` s, abort the rest; returns aborted count."""
        if self.tunnel is not None:
            self.tunnel.close()
        out, inb = await asyncio.gather(self.outbound.drain(grace), self.inbound.drain(grace))
        if self.inputs.access_log is not None and self.inputs.access_log.writing:  # the last lines, off the loop
            await asyncio.to_thread(self.inputs.access_log.flush, ACCESS_LOG_FLUSH)
        return out + inb

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        self.outbound.close()
        self.inbound.close()
        if self.inputs.access_log is not None and self.inputs.access_log.writing:  # about to exit: bounded wait
            self.inputs.access_log.flush(ACCESS_LOG_FLUSH / 4)
